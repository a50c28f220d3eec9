"""A gateway stand-in for the kill -9 test: loads [dsxflex] from a config file, sets one target, waits.

Run as ``python -m tests.dsx_isv_child CONFIG FEED WATTS`` from the repository root; it prints
``SET <correlation id>`` once the target is on the bus and then runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from gateway.clock import SystemClock
from gateway.config import load_config
from protocols.dsx.build import flex_client_from_config
from tests.doubles import RecordingAudit


async def main(path: str, feed: str, watts: float) -> None:
    client = flex_client_from_config(load_config(path).dsxflex, RecordingAudit(), SystemClock(), path)
    await client.start()
    cid = (await client.set_constraints({feed: watts}, hold_s=3600.0))[feed]
    print(f"SET {cid}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))

"""Flood an HTTP endpoint from a process of its own: keep-alive GETs on N connections for S seconds.

Usage: python tests/httpflood.py HOST PORT SECONDS CONNECTIONS [PATH,PATH...]. Prints "ready" when it
starts and, at the end, the number of responses it read. Tests run it as a child so that the load
does not share the event loop (or the GIL) of the gateway under test.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _one(host: str, port: int, paths: list[str], stop_at: float, answered: list[int]) -> None:
    """Ask on one connection, one request at a time, until ``stop_at``."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    i = 0
    try:
        while time.monotonic() < stop_at:
            writer.write(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            answered[0] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(argv: list[str]) -> None:
    """Flood as ``argv`` says and print how many responses came back."""
    host, port, seconds, connections = argv[0], int(argv[1]), float(argv[2]), int(argv[3])
    paths = argv[4].split(",") if len(argv) > 4 else ["/metrics"]
    answered = [0]
    print("ready", flush=True)
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*[_one(host, port, paths, stop_at, answered) for _ in range(connections)])
    print(answered[0], flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

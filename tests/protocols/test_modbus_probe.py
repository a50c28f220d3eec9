"""`drgw probe modbus` through the installed CLI entry point, against simulators on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.cli import build_parser, main
from gateway.errors import InputRejected
from protocols.modbus.probe import split_target
from protocols.modbus.simulator import BatterySimulator
from protocols.modbus.sunspec_sim import SunspecSimulator


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """Undo the logging setup `drgw` does in-process (it would filter info logs out of later tests)."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@contextmanager
def serving(make: Callable[[], Awaitable[Any]]) -> Iterator[Any]:
    """Run a simulator on an event loop in a thread (the CLI runs its own loop), yield it, stop it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sim = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
    try:
        yield sim
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _sunspec() -> SunspecSimulator:
    sim = SunspecSimulator(base=50000)
    sim.set("124.MinRsvPct", None)
    await sim.start()
    return sim


async def _bess() -> BatterySimulator:
    sim = BatterySimulator("bess_generic")
    await sim.start()
    return sim


def test_probe_sunspec_json_lists_models_and_decodes_points(capsys: pytest.CaptureFixture[str]) -> None:
    """Discover the models, apply scale factors, and mark not-implemented points invalid (one JSON object)."""
    with serving(_sunspec) as sim:
        code = main(["probe", "modbus", f"127.0.0.1:{sim.port}", "--sunspec", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["sunspec"]["base"] == 50000
    assert [m["id"] for m in report["sunspec"]["models"]] == [1, 124, 704, 802, 713, 715]
    assert report["points"]["802.SoC"] == {"value": 80.0, "unit": "%WHRtg", "valid": True}
    assert report["points"]["802.WHRtg"]["value"] == 1_000_000.0  # 10 000 x 10**2
    assert report["points"]["1.Mn"]["value"] == "drgw"
    assert report["points"]["124.MinRsvPct"] == {"value": None, "unit": "% WChaMax", "valid": False}


def test_probe_with_a_mapping_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Print every point of the map with value, unit and validity."""
    with serving(_bess) as sim:
        code = main(["probe", "modbus", f"127.0.0.1:{sim.port}", "--mapping", "bess_generic"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("soc_pct"))
    assert line.split()[1:] == ["80", "%", "yes"]
    assert "12 points, 0 not valid" in out


def test_probe_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 when the device does not answer, 2 for a bad mapping or target."""
    assert main(["probe", "modbus", "127.0.0.1:9", "--mapping", "bess_generic", "--timeout", "0.5"]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n", encoding="utf-8")
    assert main(["probe", "modbus", "127.0.0.1:9", "--mapping", str(bad)]) == 2
    assert main(["probe", "modbus", "127.0.0.1:99999", "--sunspec"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "port must be" in err


def test_probe_needs_sunspec_or_a_mapping() -> None:
    """Refuse a probe that says neither --sunspec nor --mapping, or both."""
    parser = build_parser()
    for argv in (["probe", "modbus", "h"], ["probe", "modbus", "h", "--sunspec", "--mapping", "m"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    args = parser.parse_args(["probe", "opcua", "opc.tcp://127.0.0.1:4840/", "--mapping", "opcua_substation"])
    assert args.mapping == "opcua_substation"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("10.0.0.5", ("10.0.0.5", 502)),
        ("10.0.0.5:1502", ("10.0.0.5", 1502)),
        ("[::1]", ("::1", 502)),
        ("[::1]:5020", ("::1", 5020)),
        ("bess.local:502", ("bess.local", 502)),
    ],
)
def test_targets(target: str, expected: tuple[str, int]) -> None:
    """Split HOST[:PORT] with IPv6 in brackets; 502 by default."""
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["", ":502", "h:0", "h:x", "[::1", "[::1]x"])
def test_bad_targets(target: str) -> None:
    """Refuse an empty host, a bad port, an unclosed bracket."""
    with pytest.raises(InputRejected):
        split_target(target)

"""The lease guard on the devices: writes pass only while the node acts; reads always pass. And
`drgw bench standby` refuses bad arguments, naming them, before it starts anything."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.model import BatteryState, GpuState
from gateway.standby.guard import GuardedBattery, GuardedFleet, NotActing

DRGW = str(Path(sys.executable).parent / "drgw")


class Battery:
    device_id = "bess1"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def read(self) -> BatteryState:
        self.calls.append("read")
        return None  # type: ignore[return-value]

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        self.calls.append(f"set {power_w:g}")
        return power_w

    async def release(self) -> None:
        self.calls.append("release")


class Fleet:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def read(self) -> tuple[GpuState, ...]:
        self.calls.append("read")
        return ()

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        self.calls.append("caps")
        return dict(caps_w)

    async def release(self) -> None:
        self.calls.append("release")


async def test_writes_pass_only_while_acting_reads_always() -> None:
    acting = [True]
    bat, fleet = Battery(), Fleet()
    gb, gf = GuardedBattery(bat, lambda: acting[0]), GuardedFleet(fleet, lambda: acting[0])
    assert gb.device_id == "bess1"
    assert await gb.set_discharge_w(3000.0, 10.0) == 3000.0
    await gb.release()
    assert await gf.set_caps({"g0": 500.0}, 10.0) == {"g0": 500.0}
    await gf.release()
    acting[0] = False  # the deadline passed, or the node stood by
    for write in (
        lambda: gb.set_discharge_w(1.0, 10.0),
        gb.release,
        lambda: gf.set_caps({"g0": 1.0}, 10.0),
        gf.release,
    ):
        with pytest.raises(NotActing, match="does not hold the active lease"):
            await write()
    await gb.read()
    await gf.read()
    assert bat.calls == ["set 3000", "release", "read"]
    assert fleet.calls == ["caps", "release", "read"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--db", "sqlite:///x.db"], "--db must be a PostgreSQL server URL"),
        (["--db", "postgresql://127.0.0.1/x", "--failovers", "0"], "--failovers must be >= 1"),
        (["--db", "postgresql://127.0.0.1/x", "--lease-s", "2", "--margin-s", "1.5"], "--margin-s in (0, lease_s / 2]"),
    ],
)
def test_bench_standby_refuses_bad_arguments(args: list[str], says: str) -> None:
    res = subprocess.run([DRGW, "bench", "standby", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr


def test_role_status_for_the_console() -> None:
    from types import SimpleNamespace

    from gateway.standby.role import role_status

    assert role_status(None) == {"role": "active", "node": None, "token": None, "standby": False}
    active = SimpleNamespace(node="gw-a", token=7)
    assert role_status(active) == {"role": "active", "node": "gw-a", "token": 7, "standby": True}  # type: ignore[arg-type]
    standby = SimpleNamespace(node="gw-b", token=None)
    assert role_status(standby)["role"] == "standby"  # type: ignore[arg-type]

"""Hot standby end to end: two real `drgw run` processes on one PostgreSQL, openleadr's VTN, a Modbus battery.

The active is killed with SIGKILL mid-event: the standby takes over (after the killed lease
expired by the database's clock), reconciles the battery with the event book (no release notch:
every setpoint the battery receives after the dispatch is the event's), resumes the event, and
polls the VTN with the same registration. The VTN never gets a second, different answer, and
`drgw audit verify` passes over the one chain both wrote, with a row per role change. A former
active partitioned from the database (the TCP fault proxy) stops acting; its writes are refused.
Skipped, with the reason, when DRGW_TEST_PG_URL is unset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from drgw_tools.bench.standby_pair import DRGW, VEN_NAME, GwNode, kill_all, node_config
from gateway.clock import SystemClock
from gateway.model import Opt
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.faults.proxy import FaultProxy
from tests.gwproc import until
from tests.pgdb import fetch, fresh_pg_database
from tests.protocols.standby_helpers import allow_connections

LEASE_S = 3.0
MARGIN_S = 0.75
BATTERY_W = 3000.0
WAIT_S = 60.0  # a bound on each wait, far beyond a takeover: not a speed target


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_pg_database() as url:
        yield url


async def _rows(url: str) -> list[tuple[int, str, dict[str, Any]]]:
    return [
        (int(s), str(k), json.loads(str(d)))
        for s, k, d in await fetch(url, "SELECT seq, kind, data FROM audit_log ORDER BY seq")
    ]


async def _verify(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        DRGW, "audit", "verify", "--db", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120.0)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


async def _active_of(nodes: list[GwNode]) -> GwNode | None:
    for n in nodes:
        if n.running and await n.role() == "active":
            return n
    return None


def _logs(nodes: list[GwNode]) -> str:
    return "\n".join(f"--- {n.name}\n{n.log_text()[-12000:]}" for n in nodes)


class Battery:
    """The pymodbus battery simulator, with every setpoint write the server saw."""

    def __init__(self) -> None:
        self.sim = BatterySimulator(
            "bess_generic", capacity_wh=40_000.0, soc_pct=80.0, max_discharge_w=BATTERY_W,
            max_charge_w=BATTERY_W, clock=SystemClock(),
        )  # fmt: skip
        self.setpoints: list[float] = []

    async def start(self) -> int:
        port = await self.sim.start()
        seen = self.sim.server.on_write
        assert seen is not None

        def on_write(names: frozenset[str]) -> None:
            seen(names)
            if "setpoint_w" in names:
                self.setpoints.append(self.sim.setpoint_w)

        self.sim.server.on_write = on_write
        return port


async def test_kill_9_the_active_mid_event_the_standby_resumes_it_once(pg_url: str, tmp_path: Path) -> None:
    vtn = SimVtn(poll_interval_s=1.0)
    vtn_url = await vtn.start()
    bat = Battery()
    bport = await bat.start()
    nodes = [
        node_config(tmp_path, name, db_url=pg_url, vtn_url=vtn_url, battery_port=bport, lease_s=LEASE_S,
                    margin_s=MARGIN_S)
        for name in ("gw-a", "gw-b")
    ]  # fmt: skip
    try:
        for n in nodes:  # both at once: one becomes active
            await n.start()
        first = await until(lambda: _active_of(nodes), WAIT_S, "one node active", lambda: _logs(nodes))
        other = next(n for n in nodes if n is not first)
        await until(lambda: _is(other, "standby"), WAIT_S, "the other node standby", lambda: _logs(nodes))
        ready = await other.readyz()
        assert ready is not None and ready["ok"], ready  # a standby is ready, and says what it is
        assert "drgw_standby_active 0.0" in await other.metrics()
        assert "drgw_standby_active 1.0" in await first.metrics()
        frozen = "startup heap frozen"  # each node, once started, whichever role it took (gateway.heap)
        await until(lambda: all(frozen in n.log_text() for n in nodes), WAIT_S, frozen, lambda: _logs(nodes))
        ven_id = await vtn.wait_for_registration(VEN_NAME, timeout_s=WAIT_S)
        event_id = vtn.add_event(ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0,
                                 start=datetime.now(UTC) + timedelta(seconds=2), duration_s=600.0)  # fmt: skip
        assert await vtn.wait_for_response(event_id, timeout_s=WAIT_S) is Opt.IN
        await until(lambda: bat.sim.setpoint_w >= BATTERY_W - 1, WAIT_S, "battery dispatched", lambda: _logs(nodes))
        await until(lambda: _kept(pg_url), WAIT_S, "the accounting kept in the store")
        dispatched = len(bat.setpoints)

        answered = len(vtn.responses)
        first.kill()  # SIGKILL: no release, no hand-over row
        assert first.proc is not None
        await first.proc.wait()
        await until(lambda: _is(other, "active"), WAIT_S, "the standby takes over", lambda: _logs(nodes))
        n_after = len(bat.setpoints)
        await until(lambda: len(bat.setpoints) > n_after + 1, WAIT_S, "the new active renews the battery setpoint")
        await until(lambda: _polled_since(other), WAIT_S, "the new active polls the VTN")
        after = bat.setpoints[dispatched:]
        assert after and min(after) >= 0.95 * BATTERY_W, f"a release notch on the battery: {after}"
        assert bat.sim.setpoint_w >= BATTERY_W - 1 and bat.sim.control_mode == 1
        assert await other.stop() == 0, _logs(nodes)
    finally:
        await kill_all(nodes)
        await vtn.stop()
        await bat.sim.stop()

    answers = [(eid, mod, opt) for eid, mod, opt in vtn.responses if eid == event_id]
    assert set(answers) == {(event_id, 0, Opt.IN)}, answers  # never a different answer
    # Each oadrDistributeEvent that asks for a response gets one (2.0b rule 62): the new active, polling
    # with the stored registration, answers the VTN's next distribution of the event again, from the
    # store, with the same opt and modification number; it never sends an opt of its own (oadrCreateOpt).
    repeats = [r for r in vtn.event_responses[answered:] if str(r["event_id"]) == event_id]
    assert all(int(r["response_code"]) == 200 for r in repeats), repeats
    assert vtn.opts == [], vtn.opts  # no opt change sent, by either node
    print(f"VTN answers for the event: {answered} before the kill, {len(repeats)} after (repeats from the store)")
    log = await _rows(pg_url)
    kinds = [k for _, k, _ in log]
    actives = [d for _, k, d in log if k == "standby.active"]
    tokens = [a["token"] for a in actives]
    assert tokens == sorted(set(tokens)), actives  # every term under a new, larger token
    assert actives[-1]["node"] == other.name and actives[-1]["previous_node"] == first.name, actives
    assert actives[-1]["reason"] == "expired" and actives[-1]["previous_token"] == actives[-2]["token"]
    takeover = max(i for i, k in enumerate(kinds) if k == "standby.active")
    assert kinds[takeover + 1 :].count("gateway.start") == 1  # the new term starts like a restart
    tail = kinds[takeover:]
    assert "reconcile.kept" in tail and "release.battery" not in tail[: tail.index("standby.standby")]
    assert len([d for _, k, d in log if k == "opt.decided"]) == 1  # decided once, across both nodes
    assert kinds[-1] == "standby.standby"
    assert _releases_after_dispatch(log) == [], "a device was released after the dispatch"
    await _verify(pg_url)


async def test_a_partitioned_active_stops_acting_and_its_writes_are_refused(pg_url: str, tmp_path: Path) -> None:
    u = make_url(pg_url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    via_proxy = u.set(port=proxy.port).render_as_string(hide_password=False)
    vtn = SimVtn(poll_interval_s=1.0)
    vtn_url = await vtn.start()
    bat = Battery()
    bport = await bat.start()
    a = node_config(tmp_path, "gw-a", db_url=via_proxy, vtn_url=vtn_url, battery_port=bport, lease_s=LEASE_S,
                    margin_s=MARGIN_S)  # fmt: skip
    b = node_config(tmp_path, "gw-b", db_url=pg_url, vtn_url=vtn_url, battery_port=bport, lease_s=LEASE_S,
                    margin_s=MARGIN_S)  # fmt: skip
    nodes = [a, b]
    try:
        await a.start()
        await until(lambda: _is(a, "active"), WAIT_S, "gw-a active", lambda: _logs(nodes))
        await b.start()
        await until(lambda: _is(b, "standby"), WAIT_S, "gw-b standby", lambda: _logs(nodes))
        ven_id = await vtn.wait_for_registration(VEN_NAME, timeout_s=WAIT_S)
        event_id = vtn.add_event(ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0,
                                 start=datetime.now(UTC) + timedelta(seconds=2), duration_s=600.0)  # fmt: skip
        assert await vtn.wait_for_response(event_id, timeout_s=WAIT_S) is Opt.IN
        await until(lambda: bat.sim.setpoint_w >= BATTERY_W - 1, WAIT_S, "battery dispatched", lambda: _logs(nodes))
        dispatched = len(bat.setpoints)

        await proxy.set_mode("blackhole")  # gw-a keeps running, but nothing it sends reaches the database
        await until(lambda: _is(b, "active"), WAIT_S, "gw-b takes over", lambda: _logs(nodes))
        assert await a.role() == "standby", "the partitioned node stopped acting before the takeover"
        await until(lambda: len(bat.setpoints) > dispatched + 2, WAIT_S, "gw-b renews the battery setpoint")
        await proxy.set_mode("reset")  # the partition heals: stale connections are cut, new ones pass
        await proxy.set_mode("pass")
        await asyncio.sleep(0)  # the healed node reads the lease again as a standby; it must stay standby
        await until(lambda: _standby_seen(a, b.name), WAIT_S, "gw-a sees gw-b active", lambda: _logs(nodes))
        assert await b.role() == "active"
        after = bat.setpoints[dispatched:]
        assert min(after) >= 0.95 * BATTERY_W, f"a release notch on the battery: {after}\n{_logs(nodes)}"
        for n in (a, b):  # the former active first: b stays active to the end
            assert await n.stop() == 0, _logs(nodes)
    finally:
        await kill_all(nodes)
        await vtn.stop()
        await bat.sim.stop()
        await proxy.stop()

    answers = {(eid, mod, opt) for eid, mod, opt in vtn.responses if eid == event_id}
    assert answers == {(event_id, 0, Opt.IN)}
    log = await _rows(pg_url)
    actives = [(d["node"], d["token"]) for _, k, d in log if k == "standby.active"]
    assert actives == [("gw-a", 1), ("gw-b", 2)], actives  # gw-a never acted again
    kinds = [k for _, k, _ in log]
    takeover = kinds.index("standby.active", kinds.index("standby.active") + 1)
    assert "gateway.stop" not in kinds[:takeover], "gw-a's own shutdown rows came after it lost the lease"
    assert _releases_after_dispatch(log) == [], "a device was released after the dispatch"
    await _verify(pg_url)


async def test_the_database_restarts_mid_event_one_node_resumes_it(pg_url: str, tmp_path: Path) -> None:
    """The database shut out for longer than a lease: the active stops acting, nobody can act; when it is
    back, one node takes the lease under a new token and the event carries on; one chain, verified."""
    vtn = SimVtn(poll_interval_s=1.0)
    vtn_url = await vtn.start()
    bat = Battery()
    bport = await bat.start()
    nodes = [
        node_config(tmp_path, name, db_url=pg_url, vtn_url=vtn_url, battery_port=bport, lease_s=LEASE_S,
                    margin_s=MARGIN_S)
        for name in ("gw-a", "gw-b")
    ]  # fmt: skip
    try:
        for n in nodes:
            await n.start()
        first = await until(lambda: _active_of(nodes), WAIT_S, "one node active", lambda: _logs(nodes))
        other = next(n for n in nodes if n is not first)
        await until(lambda: _is(other, "standby"), WAIT_S, "the other node standby", lambda: _logs(nodes))
        ven_id = await vtn.wait_for_registration(VEN_NAME, timeout_s=WAIT_S)
        event_id = vtn.add_event(ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0,
                                 start=datetime.now(UTC) + timedelta(seconds=2), duration_s=600.0)  # fmt: skip
        assert await vtn.wait_for_response(event_id, timeout_s=WAIT_S) is Opt.IN
        await until(lambda: bat.sim.setpoint_w >= BATTERY_W - 1, WAIT_S, "battery dispatched", lambda: _logs(nodes))
        token = int(str((await fetch(pg_url, "SELECT token FROM gateway_lease"))[0][0]))
        dispatched = len(bat.setpoints)

        await allow_connections(pg_url, False)  # the database goes away (every session ended)
        try:
            await until(lambda: _is(first, "standby"), WAIT_S, "the active stops acting", lambda: _logs(nodes))
            assert await other.role() == "standby"  # nobody can take a lease the database cannot grant
        finally:
            await allow_connections(pg_url, True)
        await until(lambda: _active_of(nodes), WAIT_S, "one node active again", lambda: _logs(nodes))
        await until(lambda: _token_above(pg_url, token), WAIT_S, "a new term", lambda: _logs(nodes))
        n_after = len(bat.setpoints)
        await until(
            lambda: len(bat.setpoints) > n_after + 1,
            WAIT_S,
            "the new term drives the battery again",
            lambda: _logs(nodes),
        )
        assert bat.sim.setpoint_w >= BATTERY_W - 1
        # No release notch: the active that lost its log gave the term up without writing the battery.
        after = bat.setpoints[dispatched:]
        assert min(after) >= 0.95 * BATTERY_W, f"a release notch on the battery: {after}\n{_logs(nodes)}"
        roles = [await n.role() for n in nodes]
        assert sorted(r or "" for r in roles) == ["active", "standby"], roles
        for n in nodes:
            assert await n.stop() == 0, _logs(nodes)
    finally:
        await kill_all(nodes)
        await vtn.stop()
        await bat.sim.stop()

    assert {(e, m, o) for e, m, o in vtn.responses if e == event_id} == {(event_id, 0, Opt.IN)}
    log = await _rows(pg_url)
    tokens = [d["token"] for _, k, d in log if k == "standby.active"]
    assert len(tokens) >= 2 and tokens == sorted(set(tokens)), tokens
    assert len([1 for _, k, _ in log if k == "opt.decided"]) == 1
    await _verify(pg_url)


async def test_a_standby_pings_the_systemd_watchdog(pg_url: str, tmp_path: Path) -> None:
    """Under WatchdogSec (etc/drgw.service), a standby that polls no VTN must still say it is alive."""
    vtn = SimVtn(poll_interval_s=1.0)
    vtn_url = await vtn.start()
    bat = Battery()
    bport = await bat.start()
    a, b = (
        node_config(tmp_path, n, db_url=pg_url, vtn_url=vtn_url, battery_port=bport, lease_s=LEASE_S,
                    margin_s=MARGIN_S)
        for n in ("gw-a", "gw-b")
    )  # fmt: skip
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    seen: list[str] = []

    def pings() -> int:
        with contextlib.suppress(BlockingIOError):
            while True:
                seen.append(notify.recv(4096).decode())
        return sum("WATCHDOG=1" in m for m in seen)

    try:
        await a.start()
        await until(lambda: _is(a, "active"), WAIT_S, "gw-a active", lambda: _logs([a, b]))
        await b.start(env=env)
        await until(lambda: _is(b, "standby"), WAIT_S, "gw-b standby", lambda: _logs([a, b]))
        await until(lambda: pings() >= 0 and any("READY=1" in m for m in seen), WAIT_S, "READY=1 from gw-b")
        before = pings()
        await until(lambda: pings() >= before + 3, WAIT_S, "watchdog pings from the standby", lambda: repr(seen))
        assert await b.role() == "standby"
    finally:
        notify.close()
        await kill_all([a, b])
        await vtn.stop()
        await bat.sim.stop()


async def _token_above(url: str, token: int) -> bool:
    rows = await fetch(url, "SELECT token FROM gateway_lease")
    return bool(rows) and int(str(rows[0][0])) > token


def _releases_after_dispatch(log: list[tuple[int, str, dict[str, Any]]]) -> list[tuple[int, str, dict[str, Any]]]:
    first = min(seq for seq, k, _ in log if k == "command.battery")
    return [r for r in log if r[0] > first and r[1].startswith("release.")]


async def _is(node: GwNode, role: str) -> bool:
    return await node.role() == role


async def _standby_seen(node: GwNode, holder: str) -> bool:
    body = await node.readyz()
    detail = str(((body or {}).get("checks") or {}).get("role", {}).get("detail", ""))
    return detail.startswith("standby") and f"active: {holder}" in detail


async def _kept(url: str) -> bool:
    rows = await fetch(url, "SELECT value FROM ven_state WHERE key = 'account:open'")
    return bool(rows and len(str(rows[0][0])) > 2)  # "{}" once dropped


async def _polled_since(node: GwNode) -> bool:
    body = await node.readyz()
    return bool(body and body.get("checks", {}).get("vtn", {}).get("ok"))

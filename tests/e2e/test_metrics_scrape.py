"""/metrics of a real `drgw run` during an event: promtool accepts it, it has every series the dashboard
and the alert rules need, and they query nothing else.

The gateway runs as a process against openleadr's VTN, a Modbus battery simulator and 8 simulated GPUs, with
the BMS face on and checkpoints signed every second, so every metric it can export has a sample.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.signing import generate_key
from gateway.clock import SystemClock
from gateway.metrics import HELP
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.gwproc import DRGW, free_port, gateway_config, until
from tests.monitoring import (
    alert_rules,
    dashboard,
    dashboard_exprs,
    exposed_names,
    metric_names,
    needs_promtool,
    promtool,
    sample,
)

PEERS = ("meter", "battery", "gpus", "vtn", "bms", "audit_writer")


async def _scrape_during_event(tmp: Path) -> tuple[str, str]:
    """Run `drgw run` through the start of an event; return (/metrics once everything has a sample, event id)."""
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    bsim = BatterySimulator("bess_generic", capacity_wh=40_000.0, soc_pct=80.0, clock=SystemClock())
    port = await bsim.start()
    key, _, _ = generate_key(tmp / "audit.key")
    mgmt = free_port()
    cfg = tmp / "gateway.toml"
    cfg.write_text(
        gateway_config(
            db_url=str(tmp / "audit.db"),
            vtn_url=url,
            battery_port=port,
            mgmt_port=mgmt,
            bms={"enabled": True, "port": free_port()},
            audit={"signing_key": str(key), "checkpoint_interval_s": 1.0},
        )
    )
    proc = await asyncio.create_subprocess_exec(
        DRGW, "run", "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        ven_id = await vtn.wait_for_registration("run-ven", timeout_s=30.0)
        start = datetime.now(UTC) + timedelta(seconds=2)
        event_id = vtn.add_event(
            ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0, start=start, duration_s=600.0
        )
        async with aiohttp.ClientSession() as http:

            async def everything() -> str | None:
                async with http.get(f"http://127.0.0.1:{mgmt}/metrics") as r:
                    text = await r.text()
                ready = (
                    sample(text, "drgw_event_active") == 1.0
                    and (sample(text, "drgw_commands_total", device="battery", action="set", result="ok") or 0) > 0
                    and (sample(text, "drgw_battery_setpoint_watts", device="bess1") or 0) > 0  # read after the command
                    and (sample(text, "drgw_audit_checkpoint_seq") or 0) > 0
                    and all(sample(text, "drgw_link_up", peer=p) == 1.0 for p in PEERS)
                    and exposed_names(text) >= set(HELP)
                )
                return text if ready else None

            text = await until(everything, 40.0, "an event being delivered with every metric sampled")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30.0)
        assert proc.returncode == 0, err.decode()[-2000:]
        return str(text), event_id
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await bsim.stop()
        await vtn.stop()


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Return /metrics of a `drgw run` delivering an event, and the event's id (one process for the module)."""
    yield asyncio.run(_scrape_during_event(tmp_path_factory.mktemp("scrape")))


@needs_promtool
def test_metrics_of_a_running_gateway_pass_promtool(scrape: tuple[str, str]) -> None:
    """promtool check metrics finds nothing to say about the exposition (names, units, types, help)."""
    text, _ = scrape
    done = promtool("check", "metrics", stdin=text)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_metrics_say_what_the_site_is_doing(scrape: tuple[str, str]) -> None:
    """The scrape during the event: its state and id, every link up with a since, the battery discharging
    within 0..1 state of charge, per-job budgets, the VTN's last poll and clock, a signed checkpoint."""
    text, event_id = scrape
    assert sample(text, "drgw_event_state", state="active") == 1.0
    assert sample(text, "drgw_event_info", event_id=event_id) == 1.0
    assert sum(sample(text, "drgw_event_phase", phase=p) or 0.0 for p in ("ramp_up", "active", "recovery")) == 1.0
    now = datetime.now(UTC).timestamp()
    for peer in PEERS:
        since = sample(text, "drgw_link_since_timestamp_seconds", peer=peer)
        assert since is not None and now - 120 < since <= now, (peer, since)
    soc = sample(text, "drgw_battery_soc_ratio", device="bess1")
    assert soc is not None and 0.0 < soc <= 1.0
    assert (sample(text, "drgw_battery_setpoint_watts", device="bess1") or 0.0) > 0.0
    job = {"job_id": "local/training/flex2", "tier": "flex2", "job_class": "training"}  # 8 GPUs in tier flex2 (25 %)
    assert sample(text, "drgw_job_throughput_loss_allowed_ratio", **job) == 0.25
    assert sample(text, "drgw_job_gpus", **job) == 8.0
    lost = sample(text, "drgw_job_throughput_lost_ratio", **job)
    assert lost is not None and 0.0 <= lost <= 0.25
    for name in ("drgw_vtn_last_poll_timestamp_seconds", "drgw_audit_checkpoint_timestamp_seconds"):
        at = sample(text, name)
        assert at is not None and now - 120 < at <= now, (name, at)
    skew = sample(text, "drgw_vtn_clock_skew_seconds")
    assert skew is not None and not math.isnan(skew) and abs(skew) < 5.0
    assert sample(text, "drgw_audit_signing_enabled") == 1.0 and sample(text, "drgw_vtn_clock_skewed") == 0.0


def test_no_label_clashes_with_the_ones_prometheus_attaches(scrape: tuple[str, str]) -> None:
    """No sample has a ``job`` or ``instance`` label (Prometheus would rename it); every label is snake_case."""
    for family in text_string_to_metric_families(scrape[0]):
        for s in family.samples:
            assert not {"job", "instance"} & set(s.labels), (s.name, s.labels)
            assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in s.labels), (s.name, s.labels)


def test_every_metric_exported_is_documented_and_declared(scrape: tuple[str, str]) -> None:
    """Each drgw_ sample name in the scrape is declared in gateway/metrics.py (and so listed in the docs)."""
    text, _ = scrape
    assert {n for n in exposed_names(text) if n.startswith("drgw_")} == set(HELP)


def test_dashboard_queries_only_names_a_running_gateway_exports(scrape: tuple[str, str]) -> None:
    """Every metric name the dashboard's panels and variables query has samples in the real scrape."""
    exported = exposed_names(scrape[0])
    for where, expr in dashboard_exprs(dashboard()):
        unknown = metric_names(expr) - exported
        assert not unknown, f"{where} queries {sorted(unknown)}, absent from a running gateway's /metrics"


def test_alert_rules_query_only_names_a_running_gateway_exports(scrape: tuple[str, str]) -> None:
    """Every metric name in the alert rules has samples in the real scrape (``up`` is Prometheus's own)."""
    exported = exposed_names(scrape[0]) | {"up"}
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} queries {sorted(unknown)}, absent from a running gateway's /metrics"

"""The fault tests' site: a real `drgw run` process, a SimVtn and a battery simulator, each peer behind a fault proxy.

``Site`` writes the config (short ticks, polls and timeouts), starts and kills the gateway
process, reads /readyz and /metrics, reads the audit log (SQLite, read-only, while the gateway
writes it) and checks that nothing acknowledged was lost. ``report`` prints one line per
measured figure (run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from gateway.audit.verify import verify
from gateway.clock import SystemClock
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.gwproc import free_port, gateway_config, until

from .proxy import FaultProxy

VEN_NAME = "fault-ven"
BATTERY_ID = "bess1"


@dataclass
class Knobs:
    """The config values the fault tests tune (seconds unless named otherwise)."""

    tick_s: float = 0.5
    lease_s: float = 10.0
    revert_s: float = 10.0
    battery_timeout_s: float = 0.5
    request_timeout_s: float = 1.0
    retry_max_s: float = 4.0
    vtn_stale_s: float = 3.0
    battery_max_w: float = 3000.0  # the simulator's rating: a 5 kW shed needs GPU caps too
    soc_pct: float = 80.0


def parse_metrics(text: str) -> dict[str, float]:
    """Return Prometheus text as {'name{labels}': value} (comments dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def series(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Return every series of one metric name: {'{labels}' or '': value}."""
    pat = re.compile(rf"^{re.escape(name)}(\{{.*\}})?$")
    return {(m.group(1) or ""): v for s, v in metrics.items() if (m := pat.match(s))}


def report(fault: str, **figures: Any) -> None:
    """Print one measured row (and append it to $DRGW_FAULT_REPORT as a JSON line when set)."""
    shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}
    print(f"\nFAULT {fault}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    path = os.environ.get("DRGW_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": fault, **shown}) + "\n")


@dataclass
class Site:
    """One gateway under test, its peers, the proxies between them and the files it writes."""

    tmp: Path
    knobs: Knobs = field(default_factory=Knobs)
    vtn: SimVtn = field(init=False)
    bsim: BatterySimulator = field(init=False)
    vtn_proxy: FaultProxy = field(init=False)
    battery_proxy: FaultProxy = field(init=False)
    db: Path = field(init=False)
    cfg: Path = field(init=False)
    mgmt: str = field(init=False)
    ven_id: str = ""
    proc: asyncio.subprocess.Process | None = None
    spawned: int = 0
    _logs: list[Path] = field(default_factory=list)

    async def start(self) -> None:
        """Start the VTN and the battery, each behind its proxy, and write the gateway's config."""
        self.vtn = SimVtn(poll_interval_s=1.0)
        url = await self.vtn.start()
        vtn_port = int(url.split(":")[2].split("/")[0])
        self.vtn_proxy = FaultProxy("127.0.0.1", vtn_port)
        await self.vtn_proxy.start()
        k = self.knobs
        self.bsim = BatterySimulator(
            "bess_generic",
            capacity_wh=40_000.0,
            soc_pct=k.soc_pct,
            max_discharge_w=k.battery_max_w,
            max_charge_w=k.battery_max_w,
            clock=SystemClock(),
        )
        await self.bsim.start()
        self.battery_proxy = FaultProxy("127.0.0.1", self.bsim.port)
        await self.battery_proxy.start()
        self.db = self.tmp / "audit.db"
        self.cfg = self.tmp / "gateway.toml"
        mgmt_port = free_port()
        self.mgmt = f"http://127.0.0.1:{mgmt_port}"
        self.cfg.write_text(
            gateway_config(
                db_url=str(self.db),
                vtn_url=url.replace(f":{vtn_port}/", f":{self.vtn_proxy.port}/"),
                battery_port=self.battery_proxy.port,
                mgmt_port=mgmt_port,
                site="fault-site",
                ven_name=VEN_NAME,
                opt_policy="always",
                retry_max_s=k.retry_max_s,
                tick_s=k.tick_s,
                lease_s=k.lease_s,
                revert_s=k.revert_s,
                openadr={"poll_interval_s": 1.0, "min_poll_interval_s": 0.5, "request_timeout_s": k.request_timeout_s},
                battery={"device_id": BATTERY_ID, "timeout_s": k.battery_timeout_s},
                management={"vtn_stale_s": k.vtn_stale_s},
            )
        )

    async def close(self) -> None:
        """Kill the gateway if it still runs and stop every peer."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for name in ("vtn_proxy", "battery_proxy", "bsim", "vtn"):  # whatever start() got to
            peer = getattr(self, name, None)
            if peer is not None:
                await peer.stop()

    # -- the gateway process --------------------------------------------------------------------

    async def spawn(self) -> asyncio.subprocess.Process:
        """Start `python -m gateway.cli run --config ...`; its output goes to gateway-<n>.log."""
        assert self.proc is None or self.proc.returncode is not None, "a gateway is already running"
        self.spawned += 1
        log = self.tmp / f"gateway-{self.spawned}.log"
        self._logs.append(log)
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "run", "--config", str(self.cfg),
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        return self.proc

    async def kill(self) -> None:
        """SIGKILL the gateway: no release, no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the gateway and return its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the latest gateway log (for assertion messages)."""
        return self._logs[-1].read_text(errors="replace")[-chars:] if self._logs else ""

    async def until(self, cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Wait until ``cond()`` (sync or async) is truthy; return that value (the log's tail on timeout)."""
        return await until(cond, timeout_s, what, detail=self.log_tail)

    async def register(self, timeout_s: float = 30.0) -> str:
        """Wait for the gateway's VEN to register; return its venID."""
        self.ven_id = await self.vtn.wait_for_registration(VEN_NAME, timeout_s=timeout_s)
        return self.ven_id

    def add_event(self, start_in_s: float, duration_s: float, value_kw: float = 5.0, **kw: Any) -> str:
        """Queue a LOAD_DISPATCH delta event (shed ``value_kw`` kW) starting ``start_in_s`` from now."""
        start = datetime.now(UTC) + timedelta(seconds=start_in_s)
        return self.vtn.add_event(
            self.ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=value_kw, start=start,
            duration_s=duration_s, **kw,
        )  # fmt: skip

    # -- management endpoint --------------------------------------------------------------------

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        """Return (status, body) of /readyz, or (0, {}) when the endpoint does not answer."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
                async with http.get(f"{self.mgmt}/readyz") as r:
                    return r.status, json.loads(await r.text())
        except (aiohttp.ClientError, TimeoutError):
            return 0, {}

    async def metrics(self) -> dict[str, float]:
        """Return /metrics parsed ({} when the endpoint does not answer)."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
                async with http.get(f"{self.mgmt}/metrics") as r:
                    return parse_metrics(await r.text()) if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError):
            return {}

    async def check_down(self, check: str) -> str | None:
        """Return the detail of a failing /readyz check when /readyz answers 503, else None."""
        status, body = await self.readyz()
        c = body.get("checks", {}).get(check, {})
        return str(c.get("detail")) if status == 503 and c and not c.get("ok") else None

    async def ready(self) -> bool:
        """Return whether /readyz answers 200."""
        return (await self.readyz())[0] == 200

    async def caps(self) -> dict[str, float]:
        """Return the GPU caps the gateway's last snapshot read (from /metrics), by label set."""
        return series(await self.metrics(), "drgw_gpu_cap_watts")

    # -- the audit log --------------------------------------------------------------------------

    def rows(self, kind: str | None = None, event_id: str | None = None, after_seq: int = 0) -> list[dict[str, Any]]:
        """Return committed audit rows (seq, ts, kind, event_id, device_id, data), oldest first."""
        where: list[str] = ["seq > ?"]
        args: list[Any] = [after_seq]
        for column, value in (("kind", kind), ("event_id", event_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        q = f"SELECT seq, ts, kind, event_id, device_id, data FROM audit_log WHERE {' AND '.join(where)} ORDER BY seq"
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5.0) as conn:
                got = conn.execute(q, args).fetchall()
        except sqlite3.OperationalError:  # not created yet, or busy
            return []
        return [
            {"seq": s, "ts": ts, "kind": k, "event_id": e, "device_id": d, "data": json.loads(data)}
            for s, ts, k, e, d, data in got
        ]

    def start_seq(self, n: int) -> int:
        """Return the seq of the n-th (1-based) gateway.start row, or 0 if there is none yet."""
        starts = self.rows("gateway.start")
        return int(starts[n - 1]["seq"]) if len(starts) >= n else 0

    def stored_versions(self) -> set[tuple[str, int]]:
        """Return every (event id, modification number) in the gateway's event store."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5.0) as conn:
            return {(e, int(m)) for e, m in conn.execute("SELECT event_id, modification_number FROM demand_events")}

    def measurement_times(self) -> list[datetime]:
        """Return the timestamps of the sealed measurement rows, oldest first."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5.0) as conn:
            got = conn.execute("SELECT ts FROM measurements ORDER BY mseq").fetchall()
        return [datetime.fromisoformat(ts.replace("Z", "+00:00")) for (ts,) in got]

    async def check_nothing_lost(self) -> dict[str, Any]:
        """Assert the chain verifies and every answer the VTN got is stored and audited; return figures."""
        result = await verify(str(self.db))
        assert result.ok, f"audit chain does not verify: {result.reason} {result.problems}"
        answered = {(eid, mod) for eid, mod, _ in self.vtn.responses}
        stored = self.stored_versions()
        assert answered <= stored, f"answered to the VTN but not in the event store: {answered - stored}"
        decided = {(r["event_id"], r["data"]["modification_number"]) for r in self.rows("opt.decided")}
        assert answered <= decided, f"answered to the VTN but no opt.decided row: {answered - decided}"
        seqs = [r["seq"] for r in self.rows()]
        assert seqs == list(range(1, len(seqs) + 1)), "audit seq has gaps"
        return {"audit_rows": result.rows, "answers": len(self.vtn.responses), "versions_stored": len(stored)}

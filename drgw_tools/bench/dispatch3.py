"""`drgw bench dispatch --openadr 3.1`: event-to-actuation latency over OpenADR 3.1 push, in real time.

The demo's site with ``[openadr] version = "3.1"`` against the 3.1 VTN simulator (in the bench's
process: unlike the 2.0b bench's VTN, which runs in a process of its own, so the VTN's work is on
the same CPU as the gateway's and is in the figure). The VEN is told of each event by its
webhook subscription or its MQTT topic (a private nats-server's MQTT listener, or Mosquitto when
``--mqtt`` names one); its poll is a minute away, so the poll never carries an event.

Per event, the gateway idle before it: from the VTN creating the event (``t0``, just before the
simulator stores it and pushes the notification) to every actuator the event's first dispatch
commands (battery over Modbus, GPU caps) read back. Each event is active when created and ends
half a second later. The floor is measured in the same run, between events: one HTTP round trip
to the VTN (``GET /events/{id}`` with a bearer token, the request the VEN makes after each
notification, since a notification is not an authority of its own). A pushed dispatch needs at
least two such round trips: the delivery and the VEN's read.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import aiohttp

from drgw_tools.bench.dispatch import (
    MAX_MISSED_IN_A_ROW,
    OBSERVER_GAIN,
    WAIT_S,
    Sample,
    TimedSite,
    groups,
    percentile,
)
from protocols.openadr3 import Ven3

Push = Literal["webhook", "mqtt"]
POLL_S = 60.0  # the VEN's poll: far away, so only push brings events
LEFT_S = 0.5  # each event ends this long after it is created
FLOOR_ROUND_TRIPS = 3  # floor measurements between two events
SETTLED_TICKS = 3  # ticks whose facility power must agree with the baseline before the first event
SETTLE_S = 1.0  # idle this long before each event (the 2.0b bench's events come a poll, a second, apart)


@dataclass
class _Floor:
    """HTTP round trips to the VTN, timed from the bench's own client."""

    base_url: str
    token: str = ""
    times_s: list[float] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None

    async def open(self, client_id: str, secret: str) -> None:
        """Open a connection pool and get a bearer token (client credentials, like the VEN)."""
        self._http = aiohttp.ClientSession()
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        async with self._http.post(self.base_url + "/auth/token", data=form) as resp:
            resp.raise_for_status()
            self.token = str((await resp.json())["access_token"])

    async def measure(self, event_id: str) -> None:
        """Time one ``GET /events/{id}``, body read."""
        assert self._http is not None
        t0 = time.monotonic()
        async with self._http.get(f"{self.base_url}/events/{event_id}",
                                  headers={"Authorization": f"Bearer {self.token}"}) as resp:  # fmt: skip
            await resp.read()
            resp.raise_for_status()
        self.times_s.append(time.monotonic() - t0)

    async def close(self) -> None:
        """Close the pool."""
        if self._http is not None:
            await self._http.close()


class _Bench3(TimedSite):
    """The simulated site over 3.1 push and the measurements taken on it."""

    def __init__(self, gpus: int, db_path: str, push: Push, mqtt: tuple[str, int] | None) -> None:
        from gateway.demo import DemoSite
        from gateway.simulation.vtn3 import DemoVtn3

        self.vtn = DemoVtn3(poll_interval_s=POLL_S, notify=push, mqtt=mqtt)
        overrides: dict[str, dict[str, Any]] = {
            "gpus": {"groups": groups(gpus)},
            "control": {"tick_s": 1.0, "lease_s": 30.0, "gain": OBSERVER_GAIN},
            "limits": {"battery_ramp_w_per_s": 1e12, "gpu_ramp_w_per_s": 1e12},
        }
        self.site = DemoSite(1.0, db_path, overrides=overrides, vtn=self.vtn, openadr="3.1")
        self.clock = self.site.clock
        self.current: Sample | None = None
        self.floor: _Floor | None = None
        self._count = 0

    async def __aenter__(self) -> _Bench3:
        """Start the site, wait for push to be ready, and time what the dispatcher commands."""
        await self.site.__aenter__()
        try:
            assert self.site.gateway is not None
            self.instrument(self.site.gateway)
            ven = self.gw.ven
            assert isinstance(ven, Ven3)
            await self._until(lambda: ven.push.ready, "the VEN's push (webhook subscription or MQTT topics)")
            # The baseline is held a minute after each release: take it only once the site draws its natural power.
            await self._until(self._settled, "the site's baseline to settle")
            self.floor = _Floor(self.vtn.sim.base_url)
            await self.floor.open(*self.vtn.credentials())
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the site (the gateway releases everything, then the VTN stops)."""
        if self.floor is not None:
            await self.floor.close()
        await self.site.__aexit__()

    async def measure(self) -> Sample | None:
        """Run one event through the site; return its timeline, or None when it had nothing to time."""
        await self._until(self._idle, "the gateway to go idle")
        await asyncio.sleep(SETTLE_S)  # the GPUs settle and the meter catches up, as between the 2.0b bench's polls
        self._count += 1
        t0 = time.monotonic()
        s = Sample("arrival", t0 - 1.0, t0 + LEFT_S)
        start_dt = self.clock.now() - timedelta(seconds=1.0)
        self.current = s
        s.sent = time.monotonic()
        s.event_id = self.vtn.add_event("", value=2.0, start=start_dt, duration_s=1.0 + LEFT_S,
                                        event_name=f"bench-{self._count:04d}")  # fmt: skip
        try:
            await asyncio.wait_for(s.complete.wait(), LEFT_S + WAIT_S / 10)
        except TimeoutError as err:
            if s.expected is None:  # over before the gateway's first tick on it: nothing to time
                return None
            done = ", ".join(sorted(s.done)) or "none"
            raise TimeoutError(
                f"bench dispatch: event {s.event_id} commanded {sorted(s.expected)}, read back: {done}"
            ) from err
        assert self.floor is not None
        for _ in range(FLOOR_ROUND_TRIPS):
            await self.floor.measure(s.event_id)
        return s

    def _settled(self) -> bool:
        """Return whether the last ticks' facility power agrees with the baseline within 2 %."""
        recs, base = self.gw.loop.records[-SETTLED_TICKS:], self.gw.loop.baseline_w
        return (len(recs) == SETTLED_TICKS and base is not None
                and all(r.facility_w is not None and abs(r.facility_w - base) < 0.02 * base for r in recs))  # fmt: skip


async def run_dispatch3_bench(
    gpus: int = 64, events: int = 100, warmup: int = 2, push: Push = "webhook", mqtt: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Measure event-to-actuation latency over 3.1 push on the simulated site; return the figures (ms)."""
    if gpus < 1 or events < 1 or warmup < 0:
        raise ValueError("gpus and events must be at least 1, warmup at least 0")
    broker: Any = None
    if push == "mqtt" and mqtt is None:
        from drgw_tools.servers.mqtt import nats_mqtt

        broker = nats_mqtt().start()
        mqtt = (broker.host, int(broker.mqtt_port))
    samples: list[Sample] = []
    missed = in_a_row = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with _Bench3(gpus, str(Path(tmp) / "bench.db"), push, mqtt) as bench:
                done = 0
                while done < warmup + events:
                    s = await bench.measure()
                    if s is None:
                        missed += 1
                        in_a_row += 1
                        if in_a_row > MAX_MISSED_IN_A_ROW:
                            raise RuntimeError("bench dispatch: events keep ending before the gateway acts on them")
                        continue
                    in_a_row = 0
                    if done >= warmup:
                        samples.append(s)
                    done += 1
                assert bench.floor is not None
                floor = bench.floor.times_s[warmup * FLOOR_ROUND_TRIPS :] or bench.floor.times_s
                violations = bench.vtn.sim.all_violations()
    finally:
        if broker is not None:
            broker.close()
    if violations:
        raise RuntimeError(f"bench dispatch: the VTN saw departures from the 3.1 definition: {violations[:3]}")
    return summarize3(gpus, push, samples, warmup, missed, floor)


def summarize3(gpus: int, push: str, samples: list[Sample], warmup: int, missed: int,
               floor_s: list[float]) -> dict[str, Any]:  # fmt: skip
    """Turn the samples into the figures (ms), with the keys of the 2.0b dispatch bench where they mean the same."""

    def ms(xs: list[float], q: float) -> float:
        return round(percentile(xs, q) * 1000, 1)

    total = [s.actuated() - (s.sent or 0.0) for s in samples]
    ven = [(s.handover or 0.0) - (s.sent or 0.0) for s in samples]
    gateway = [s.actuated() - (s.handover or 0.0) for s in samples]
    rec = [max(s.recorded[d] for d in s.expected or ()) - (s.sent or 0.0) for s in samples
           if set(s.expected or ()) <= set(s.recorded)]  # fmt: skip
    return {
        "openadr": "3.1",
        "notify": push,
        "gpus": gpus,
        "cpus": os.cpu_count(),
        "samples": len(samples),
        "samples_battery_and_gpus": sum(1 for s in samples if s.expected == {"battery", "gpus"}),
        "warmup": warmup,
        "missed": missed,
        "busy_at_arrival": sum(1 for s in samples if s.busy_at_handover),
        "p50_ms": ms(total, 50),
        "p99_ms": ms(total, 99),
        "max_ms": round(max(total) * 1000, 1),
        "ven_p50_ms": ms(ven, 50),
        "ven_p99_ms": ms(ven, 99),
        "gateway_p50_ms": ms(gateway, 50),
        "gateway_p99_ms": ms(gateway, 99),
        "recorded_p50_ms": ms(rec, 50) if rec else None,
        "recorded_p99_ms": ms(rec, 99) if rec else None,
        "scheduled_samples": 0,
        "floor_http_round_trip_p50_ms": ms(floor_s, 50),
        "floor_http_round_trip_p99_ms": ms(floor_s, 99),
        "floor_round_trips": len(floor_s),
    }


def format_result3(res: dict[str, Any]) -> str:
    """Return the figures as lines for a terminal, the floor beside them."""
    floor = res["floor_http_round_trip_p50_ms"]
    return "\n".join([
        f"dispatch latency over OpenADR 3.1 ({res['notify']} notification), simulated site with {res['gpus']} GPUs, "
        f"{res['cpus']} CPUs, VTN in the bench's process ({res['warmup']} warm-up events not counted; "
        f"{res['missed']} over before the gateway acted, run again)",
        f"  {res['samples']} events ({res['samples_battery_and_gpus']} commanding the battery and GPUs), "
        "VTN creates the event -> every actuator commanded and read back:",
        f"    p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms "
        f"(floor: one HTTP round trip to the VTN p50 {floor} ms, p99 {res['floor_http_round_trip_p99_ms']} ms; "
        f"a pushed event takes at least two)",
        f"    of which the VTN and VEN (creation to hand-over) p50 {res['ven_p50_ms']} ms, p99 {res['ven_p99_ms']} ms,",
        f"    the gateway (hand-over to read-back) p50 {res['gateway_p50_ms']} ms, p99 {res['gateway_p99_ms']} ms",
        f"    until the command rows are committed to the audit log: "
        f"p50 {res['recorded_p50_ms']} ms, p99 {res['recorded_p99_ms']} ms",
    ] + ([f"  warning: {res['busy_at_arrival']} events arrived while the gateway was still busy"]
         if res["busy_at_arrival"] else []))  # fmt: skip

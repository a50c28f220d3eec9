"""The dispatch benchmark's figures: percentiles, the floor, the samples' summary and its text."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.model import Opt

if TYPE_CHECKING:
    from drgw_tools.bench.dispatch import Sample


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def floor_figures(http_s: list[float], modbus_s: list[float]) -> dict[str, Any]:
    """Return the floor's figures (ms): the VTN's HTTP round trip, Modbus write+read, and their sum."""
    both = [h + m for h, m in zip(http_s, modbus_s, strict=True)]
    res: dict[str, Any] = {"floor_samples": len(both)}
    for name, xs in (("floor", both), ("floor_http", http_s), ("floor_modbus", modbus_s)):
        res[f"{name}_p50_ms"] = round(percentile(xs, 50) * 1000, 2)
        res[f"{name}_p99_ms"] = round(percentile(xs, 99) * 1000, 2)
    return res


def summarize(gpus: int, samples: list[Sample], warmup: int, missed: int, opts: Mapping[Any, Any]) -> dict[str, Any]:
    """Turn the samples into the benchmark's figures (ms)."""
    arrival = [s for s in samples if s.kind == "arrival"]
    sched = [s for s in samples if s.kind == "scheduled"]
    not_in = [s.event_id for s in samples if opts.get((s.event_id, 0)) is not Opt.IN]
    if not_in:
        raise RuntimeError(f"bench dispatch: events not opted in: {', '.join(not_in)}")

    def ms(xs: list[float]) -> dict[str, float]:
        return {"p50": round(percentile(xs, 50) * 1000, 1), "p99": round(percentile(xs, 99) * 1000, 1),
                "max": round(max(xs) * 1000, 1)}  # fmt: skip

    total = ms([s.actuated() - (s.sent or 0.0) for s in arrival])
    ven = ms([(s.handover or 0.0) - (s.sent or 0.0) for s in arrival])
    gateway = ms([s.actuated() - (s.handover or 0.0) for s in arrival])
    rec = [max(s.recorded[d] for d in s.expected or ()) - (s.sent or 0.0) for s in arrival
           if set(s.expected or ()) <= set(s.recorded)]  # fmt: skip
    res: dict[str, Any] = {
        "gpus": gpus,
        "cpus": os.cpu_count(),
        "samples": len(arrival),
        "samples_battery_and_gpus": sum(1 for s in arrival if s.expected == {"battery", "gpus"}),
        "warmup": warmup,
        "missed": missed,
        "busy_at_arrival": sum(1 for s in samples if s.busy_at_handover),
        "p50_ms": total["p50"],
        "p99_ms": total["p99"],
        "max_ms": total["max"],
        "ven_p50_ms": ven["p50"],
        "ven_p99_ms": ven["p99"],
        "gateway_p50_ms": gateway["p50"],
        "gateway_p99_ms": gateway["p99"],
        "recorded_p50_ms": ms(rec)["p50"] if rec else None,
        "recorded_p99_ms": ms(rec)["p99"] if rec else None,
        "scheduled_samples": len(sched),
    }
    for name, pick in (("first", min), ("last", max)):
        xs = [s.actuated(pick) - s.start for s in sched]
        res[f"start_to_{name}_p50_ms"] = ms(xs)["p50"] if xs else None
        res[f"start_to_{name}_p99_ms"] = ms(xs)["p99"] if xs else None
    return res


def format_result(res: Mapping[str, Any]) -> str:
    """Return the benchmark's figures as lines for a terminal."""
    lines = [
        f"dispatch latency, simulated site with {res['gpus']} GPUs, {res['cpus']} CPUs, VTN in its own process "
        f"({res['warmup']} warm-up events not counted; {res['missed']} fetched too late to time, run again)",
        f"  {res['samples']} events active on arrival ({res['samples_battery_and_gpus']} commanding the battery and "
        "GPUs), VTN sends -> every actuator commanded and read back:",
        f"    p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms",
        f"    of which the VEN (wire to hand-over) p50 {res['ven_p50_ms']} ms, p99 {res['ven_p99_ms']} ms,",
        f"    the gateway (hand-over to read-back) p50 {res['gateway_p50_ms']} ms, p99 {res['gateway_p99_ms']} ms",
        f"    until the command rows are committed to the audit log: "
        f"p50 {res['recorded_p50_ms']} ms, p99 {res['recorded_p99_ms']} ms",
    ]
    if "floor_p99_ms" in res:
        lines += [
            f"  floor, same run ({res['floor_samples']} samples interleaved): VTN HTTP round trip + Modbus write+read "
            f"p50 {res['floor_p50_ms']} ms, p99 {res['floor_p99_ms']} ms",
            f"    (HTTP p50 {res['floor_http_p50_ms']} / p99 {res['floor_http_p99_ms']} ms, "
            f"Modbus p50 {res['floor_modbus_p50_ms']} / p99 {res['floor_modbus_p99_ms']} ms)",
        ]
    if res["scheduled_samples"]:
        lines += [
            f"  {res['scheduled_samples']} events arriving before their start, start -> first actuation "
            f"p50 {res['start_to_first_p50_ms']} ms, p99 {res['start_to_first_p99_ms']} ms;",
            f"    -> last actuation p50 {res['start_to_last_p50_ms']} ms, p99 {res['start_to_last_p99_ms']} ms",
        ]
    if "profile" in res:
        from drgw_tools.bench.dispatch_trace import format_trace

        lines.append(format_trace(res["profile"]))
    if "gc_ms" in res:
        lines.append(
            f"  the collector while events were timed: {res['gc_ms']} ms, {res['gc_full_passes']} full passes "
            f"({res['gc_frozen_objects']:,} objects frozen out of them once the site had started)"
        )
    if res["busy_at_arrival"]:
        lines.append(f"  warning: {res['busy_at_arrival']} events arrived while the gateway was still busy")
    return "\n".join(lines)

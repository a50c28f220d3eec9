"""`drgw bench allocation [--json]`: measure the planner against uniform capping and a reference optimum."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Register `drgw bench allocation`."""
    b = bench_sub.add_parser(
        "allocation",
        help="planner vs uniform capping vs an exact reference optimum (scipy), and plan time at 10,000 GPUs",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.add_argument("--gpus", type=int, default=10_000, help="GPUs in the timing site (default 10000)")
    b.add_argument("--quick", action="store_true", help="a few cases only (a smoke run, for tests)")
    b.set_defaults(func=_cmd_bench_allocation)


def _cmd_bench_allocation(args: argparse.Namespace) -> int:
    """Run the allocation benchmark and print what it measured."""
    from gateway import planning_bench

    if args.gpus < 8:
        print("bench allocation: --gpus must be at least 8", file=sys.stderr)
        return 2
    if not planning_bench.scipy_available():
        print(
            "bench allocation: scipy is not installed, so the reference optimum is skipped "
            "(install it with: pip install 'drgw[test]' or pip install scipy)",
            file=sys.stderr,
        )
    res = planning_bench.run(args.gpus, quick=args.quick)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0 if res["reference"] is not None else 1


def _fmt(x: Any, pct: bool = True) -> str:
    """Format a kept fraction as a percentage, or '-' when absent."""
    if x is None:
        return "-"
    return f"{100 * x:7.2f}%" if pct else f"{x:.4f}"


def _fmt6(x: Any) -> str:
    """Format a ratio to six places, or '-' when absent."""
    return "-" if x is None else f"{x:.6f}"


def _print_table(res: dict[str, Any]) -> None:
    """Print the cases and the headline figures."""
    print(
        f"{'site':<16} {'batt':<4} {'reduction':<26} {'uniform':>8} {'u.viol':>6} {'planner':>8} "
        f"{'p.viol':>6} {'reference':>9} {'p/ref':>8}"
    )
    for c in res["cases"]:
        red = c["reduction"] if isinstance(c["reduction"], str) else f"{100 * c['reduction']:.0f} %"
        if c.get("policy"):
            red = f"{red} ({c['policy']})"
        elif not c.get("feasible", True):
            red += " (infeasible)"
        print(
            f"{c['site']:<16} {'yes' if c['battery'] else 'no':<4} {red:<26} {_fmt(c.get('uniform_kept')):>8} "
            f"{c.get('uniform_tier_violations', '-'):>6} {_fmt(c['planner_kept']):>8} "
            f"{c['planner_tier_violations']:>6} {_fmt(c.get('reference_kept')):>9} "
            f"{_fmt(c.get('planner_vs_reference'), pct=False):>8}"
        )
    print()
    print("throughput kept = weighted mean over GPUs of the fraction of natural throughput kept")
    print(f"reference: {res['reference'] or 'skipped (scipy not installed)'}")
    print(f"planner / reference, worst case   {_fmt6(res['planner_vs_reference_min'])}  (target >= 0.99)")
    print(f"planner / reference, mean         {_fmt6(res['planner_vs_reference_mean'])}")
    print(f"uniform / reference, mean         {_fmt6(res['uniform_vs_reference_mean'])}  (feasible cases)")
    print(
        f"uniform / best without tiers      {_fmt6(res['uniform_vs_untiered_best_mean'])} mean, "
        f"{_fmt6(res['uniform_vs_untiered_best_min'])} worst  (uniform ignores tiers: its fair yardstick)"
    )
    print(
        f"planner tier violations           {res['tier_violations']}  "
        f"(target 0; uniform capping: {res['uniform_tier_violations']} GPUs over their tier)"
    )
    print(f"infeasible cases                  {res['infeasible_cases']} (planner and reference both at every floor)")
    print(f"plan time, {res['timing_gpus']} GPUs         {res['plan_ms_10k_gpus']:.1f} ms median  (target < 100 ms)")

"""Plain-text tables for the auditor queries (the ``--json`` forms print the same data as JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "(none)") -> str:
    """Return rows under headers in aligned columns; the last column is left unpadded."""
    cells = [[_cell(v) for v in r] for r in rows]
    if not cells:
        return "  ".join(headers) + "\n" + empty
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    out = []
    for line in [list(headers), *cells]:
        parts = [c.ljust(w) for c, w in zip(line[:-1], widths[:-1], strict=True)] + [line[-1]]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def _cell(v: Any, limit: int = 100) -> str:
    """Return a value as one table cell."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, dict | list):
        text = json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    else:
        text = str(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_dossier(d: dict[str, Any]) -> str:
    """Return the dossier as sections of tables."""
    ev = d.get("event") or {}
    parts = [
        f"EVENT {d['event_id']}  {ev.get('start', '?')} .. {ev.get('end', '?')}  VTN {ev.get('vtn_id') or '-'}"
        f"  cancelled {ev.get('cancelled_at') or 'no'}",
        "\nVERSIONS RECEIVED",
        table(
            ("mod", "received_at", "from", "status", "opt", "answered_at", "answer", "reason"),
            [
                (
                    v["modification_number"],
                    v["received_at"],
                    v["from"],
                    v["status"],
                    v["opt"],
                    v["answered_at"],
                    v["answer"],
                    v["opt_reason"],
                )
                for v in d["versions"]
            ],
        ),  # fmt: skip
        "\nCOMMANDS AND READ-BACK",
        table(
            ("seq", "ts", "command", "device", "asked", "read back", "matched"),
            [
                (c["seq"], c["ts"], c["kind"], c["device_id"], c["requested"], c["readback"], c["matched"])
                for c in d["commands"]
            ],
        ),
        "\nOVERRIDES",
        table(
            ("seq", "ts", "kind", "who", "why"),
            [(o["seq"], o["ts"], o["kind"], o["who"], o["why"]) for o in d["overrides"]],
        ),
        "\nCANCELLATION: " + (_cell(d["cancellation"]) if d.get("cancellation") else "none"),
        "\nRELEASE",
        table(
            ("seq", "ts", "kind", "device", "data"),
            [(r["seq"], r["ts"], r["kind"], r["device_id"], r["data"]) for r in d["release"]],
        ),
        "\nFAULTS",
        table(
            ("seq", "ts", "kind", "device", "data"),
            [(r["seq"], r["ts"], r["kind"], r["device_id"], r["data"]) for r in d["faults"]],
        ),
    ]
    if d.get("response"):
        parts += ["\nRESPONSE", format_response([{"event_id": d["event_id"], **d["response"]}])]
    if d.get("performance"):
        parts += ["\nPERFORMANCE", format_performance(d["performance"])]
    integ = d.get("integrity") or {}
    cp = integ.get("sealed_by_checkpoint")
    parts.append(
        f"\nINTEGRITY: {integ.get('rows')} rows, bad hashes {integ.get('rows_with_bad_hash') or 'none'}, "
        + (f"sealed by checkpoint {cp['seq']} ({cp['signed_at']})" if cp else "not yet sealed by a checkpoint")
    )
    return "\n".join(parts)


def format_performance(p: dict[str, Any]) -> str:
    """Return per-interval performance, totals and the baseline inputs."""
    rows = [
        (
            iv["start"],
            iv["end"],
            iv["baseline_w"],
            iv["actual_w"],
            iv["committed_w"],
            iv["delivered_w"],
            iv["energy_wh"],
            iv["percent"],
        )
        for iv in p.get("intervals", [])
    ]
    base = p.get("baseline", {})
    return "\n".join(
        [
            table(("from", "to", "baseline_w", "actual_w", "committed_w", "delivered_w", "energy_wh", "percent"), rows),
            f"energy delivered {_cell(p.get('energy_delivered_wh'))} Wh of {_cell(p.get('energy_committed_wh'))} Wh "
            f"committed: {_cell(p.get('percent_of_commitment'))} %",
            f"baseline {base.get('method')}: {json.dumps(base.get('inputs', {}), sort_keys=True)}",
        ]
    )


def format_response(items: list[dict[str, Any]]) -> str:
    """Return response times, one event per line."""
    return table(
        ("event", "notified_at", "to_first_command_s", "start", "to_reduction_s", "end", "to_release_s"),
        [(r["event_id"], r.get("notified_at"), r.get("notification_to_first_command_s"), r.get("start"),
          r.get("start_to_reduction_s"), r.get("end"), r.get("end_to_release_s")) for r in items],
    )  # fmt: skip


def format_period(name: str, res: Any) -> str:
    """Return a period query's result as a table."""
    if name == "opt-outs":
        return "\n".join(
            [
                "OPT-OUTS",
                table(("seq", "ts", "event", "kind", "who", "why"),
                      [(o["seq"], o["ts"], o["event_id"], o["kind"], o["who"], o["why"]) for o in res["opt_outs"]]),
                "\nOVERRIDES",
                table(("seq", "ts", "event", "kind", "who", "why"),
                      [(o["seq"], o["ts"], o["event_id"], o["kind"], o["who"], o["why"]) for o in res["overrides"]]),
            ]
        )  # fmt: skip
    if name == "untraced":
        return table(("seq", "ts", "kind", "device", "why", "data"),
                     [(r["seq"], r["ts"], r["kind"], r["device_id"], r["why"], r["data"]) for r in res])  # fmt: skip
    if name == "links":
        return table(("device", "kind", "from", "to", "duration_s", "faults", "cause"),
                     [(p["device_id"], p["kind"], p["from"], p["to"] or "(still down)", p["duration_s"], p["faults"],
                       p["cause"]) for p in res])  # fmt: skip
    if name == "security":
        return table(("seq", "ts", "kind", "actor", "event", "reason"),
                     [(r["seq"], r["ts"], r["kind"], r["actor"], r["event_id"], r["reason"]) for r in res])  # fmt: skip
    return table(
        ("seq", "ts", "kind", "actor", "data"), [(r["seq"], r["ts"], r["kind"], r["actor"], r["data"]) for r in res]
    )

"""Known drift from the 3.1.0 definition, seen in the field, normalised before validation and audited.

Each rule changes one shape into the definition's and says what it changed; nothing else is
tolerated (a body that still fails validation afterwards is refused):

- an event or programme ``payloadDescriptor`` without ``objectType`` (the User Guide's own
  examples omit it, and the definition requires it): ``EVENT_PAYLOAD_DESCRIPTOR`` is added (in a
  programme, ``REPORT_PAYLOAD_DESCRIPTOR`` when it names a ``readingType``);
- ``reportDescriptor.frequency`` written as an ISO 8601 duration instead of a number of intervals:
  the duration is kept as ``drgwFrequencyS`` (seconds, an extension key as the Definition's Model
  Extension allows) and ``frequency`` takes its default, -1; the reporter then reports every that
  many seconds.
"""

from __future__ import annotations

import copy
from typing import Any

from protocols.openadr3.timing import TimeValueError, duration_s

FREQUENCY_S = "drgwFrequencyS"


def normalise(kind: str, obj: Any) -> tuple[Any, list[str]]:
    """Return ``obj`` with known drift corrected (a copy when changed) and a note per correction."""
    if not isinstance(obj, dict) or kind not in ("EVENT", "PROGRAM"):
        return obj, []
    notes: list[str] = []
    out = copy.deepcopy(obj)
    for n, desc in enumerate(out.get("payloadDescriptors") or []):
        if isinstance(desc, dict) and "objectType" not in desc:
            report = kind == "PROGRAM" and "readingType" in desc
            desc["objectType"] = "REPORT_PAYLOAD_DESCRIPTOR" if report else "EVENT_PAYLOAD_DESCRIPTOR"
            notes.append(f"payloadDescriptors[{n}] had no objectType: {desc['objectType']} assumed")
    for n, desc in enumerate(out.get("reportDescriptors") or []):
        freq = desc.get("frequency") if isinstance(desc, dict) else None
        if isinstance(freq, str):
            try:
                seconds = duration_s(freq)
            except TimeValueError:
                continue  # not a duration either: validation refuses it
            desc["frequency"] = -1
            desc[FREQUENCY_S] = seconds
            notes.append(f"reportDescriptors[{n}].frequency {freq!r} is a duration, not a count: every {seconds:g} s")
    return (out, notes) if notes else (obj, [])

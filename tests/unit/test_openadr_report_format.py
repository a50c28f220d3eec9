"""How the 2.0b reports write durations: never the bare ``P`` openleadr writes for zero."""

from __future__ import annotations

from datetime import timedelta

import pytest

from protocols.openadr.reports import iso_duration


@pytest.mark.parametrize(
    ("span", "text"),
    [(0, "PT0S"), (timedelta(0), "PT0S"), (1, "PT1S"), (60, "PT1M"), (7200, "PT2H"), (86_400, "P1D"),
     (90_061, "P1DT1H1M1S"), (timedelta(minutes=30), "PT30M"), (0.4, "PT0S")],
)  # fmt: skip
def test_durations_are_valid_xs_durations(span: float | timedelta, text: str) -> None:
    assert iso_duration(span) == text


def test_a_negative_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        iso_duration(-1)

"""`drgw bench dispatch --openadr 3.1` runs the simulated site over 3.1 push on a few events.

It checks that the bench measures (sample counts, positive finite figures in a sane order, the
floor measured in the same run, the 2.0b bench's keys), not how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

from drgw_tools.servers.nats import find_binary
from gateway.cli import main

EVENTS = 3


@pytest.mark.parametrize("notify", ["webhook", "mqtt"])
def test_bench_dispatch_over_31_reports_its_figures_beside_its_floor(
    capsys: pytest.CaptureFixture[str], notify: str
) -> None:
    if notify == "mqtt":
        try:
            find_binary()
        except Exception as err:  # the bench starts a private nats-server as its MQTT broker
            pytest.skip(f"no nats-server binary: {err}")
    argv = ["bench", "dispatch", "--openadr", "3.1", "--notify", notify, "--events", str(EVENTS), "--warmup", "1"]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["openadr"], res["notify"], res["gpus"], res["warmup"]) == ("3.1", notify, 64, 1)
    assert res["samples"] == EVENTS and res["samples_battery_and_gpus"] == EVENTS and res["busy_at_arrival"] == 0
    keys = ("p50_ms", "p99_ms", "max_ms", "ven_p50_ms", "gateway_p50_ms", "recorded_p50_ms",
            "floor_http_round_trip_p50_ms", "floor_http_round_trip_p99_ms")  # fmt: skip
    for key in keys:
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["floor_round_trips"] >= EVENTS
    assert res["p50_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["floor_http_round_trip_p50_ms"] < res["p50_ms"]  # one round trip is less than the whole dispatch
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "over OpenADR 3.1" in text and "floor: one HTTP round trip to the VTN" in text


def test_bench_dispatch_refuses_a_bad_broker_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "dispatch", "--openadr", "3.1", "--notify", "mqtt", "--mqtt", "nowhere"]) == 2
    assert "--mqtt" in capsys.readouterr().err

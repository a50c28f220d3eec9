"""drgw_tools.ports.free_port: ports outside the kernel's ephemeral range, one slice per xdist worker."""

from __future__ import annotations

import socket

import pytest

from drgw_tools import ports


def test_ports_lie_below_the_ephemeral_range_and_are_not_repeated() -> None:
    low = ports._ephemeral_low()
    handed = [ports.free_port() for _ in range(50)]
    assert len(set(handed)) == 50
    assert all(1024 < p < low for p in handed)
    assert all(p in ports._slice() for p in handed)


def test_a_held_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_next", None)
    first = ports.free_port()
    monkeypatch.setattr(ports, "_next", None)  # the same sequence again, with its first port now held
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        second = ports.free_port()
    assert second != first


@pytest.mark.parametrize("worker", ["gw0", "gw3"])
def test_workers_draw_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch, worker: str) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    mine = set(ports._slice())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert mine.isdisjoint(ports._slice())

"""The pacer on a reactor (pacinggate.py): Deferreds, the one timer, leaving, reloads."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from imapproxy.config import Limits
from imapproxy.errors import LoginQueueFull
from imapproxy.pacinggate import PacingGate


def gate(rate: float, queue: int = 100) -> tuple[PacingGate, Clock]:
    clock = Clock()
    clock.advance(1000)
    return PacingGate.from_limits(Limits(max_login_rate=rate, max_login_queue=queue),
                                  clock), clock


def results(d: defer.Deferred[Any]) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_with_pacing_off_the_answer_is_none_at_once() -> None:
    g, clock = gate(0.0)
    assert [g.enter() for _ in range(1000)] == [None] * 1000
    assert clock.getDelayedCalls() == [] and g.waiting == 0


def test_a_burst_goes_at_once_then_each_waits_its_turn_on_one_timer() -> None:
    g, clock = gate(4.0)
    assert [g.enter() for _ in range(4)] == [0.0] * 4
    waiting = [g.enter() for _ in range(8)]
    assert all(isinstance(d, defer.Deferred) for d in waiting)
    got = [results(d) for d in waiting]  # type: ignore[arg-type]
    assert g.waiting == 8
    assert len(clock.getDelayedCalls()) == 1, "one timer for the whole line"
    clock.advance(0.25)
    assert got[0] == [pytest.approx(0.25)] and got[1] == []
    clock.pump([0.25] * 7)
    assert [g[0] for g in got] == pytest.approx([0.25 * (i + 1) for i in range(8)])
    assert g.waiting == 0 and clock.getDelayedCalls() == []


def test_over_the_bound_the_login_is_refused_at_once() -> None:
    g, _clock = gate(1.0, queue=2)
    g.enter()
    g.enter()
    g.enter()
    with pytest.raises(LoginQueueFull) as refused:
        g.enter()
    assert refused.value.imap_code == "UNAVAILABLE" and refused.value.pop3_code == "SYS/TEMP"
    assert g.waiting == 2


def test_a_login_that_leaves_is_out_of_the_line_at_once_and_the_next_keeps_its_time() -> None:
    g, clock = gate(2.0)
    g.enter()
    g.enter()
    first, second = g.enter(), g.enter()
    assert isinstance(first, defer.Deferred) and isinstance(second, defer.Deferred)
    left, got = results(first), results(second)
    first.cancel()
    assert left[0].check(defer.CancelledError) and g.waiting == 1
    clock.advance(0.5)
    assert got == [pytest.approx(0.5)]
    third = g.enter()
    assert isinstance(third, defer.Deferred)
    third.cancel()
    assert g.waiting == 0 and clock.getDelayedCalls() == [], "no timer for nobody"
    first.cancel()  # already out: nothing happens
    second.cancel()


def test_a_reload_applies_the_new_rate_to_those_waiting() -> None:
    g, clock = gate(1.0)
    g.enter()
    line = [g.enter() for _ in range(10)]
    got = [results(d) for d in line]  # type: ignore[arg-type]
    clock.advance(0.5)
    g.reconfigure(Limits(max_login_rate=10.0, max_login_queue=100))
    # The new bucket holds 10, less the half a login still taken from the old one.
    assert sum(1 for r in got if r) == 9
    clock.advance(0.051)  # a hair more: Clock adds the delay to now in floating point
    assert got[9] == [pytest.approx(0.551)]
    assert g.waiting == 0 and clock.getDelayedCalls() == []


def test_a_reload_that_turns_pacing_off_lets_the_line_go_and_stops_the_timer() -> None:
    g, clock = gate(1.0)
    g.enter()
    line = [g.enter() for _ in range(3)]
    got = [results(d) for d in line]  # type: ignore[arg-type]
    clock.advance(0.3)
    g.reconfigure(Limits())
    assert [r[0] for r in got] == pytest.approx([0.3] * 3)
    assert clock.getDelayedCalls() == [] and g.enter() is None


def test_a_turn_that_ends_another_login_is_safe() -> None:
    """Firing one Deferred runs that login on at once; it may end another waiting one."""
    g, clock = gate(1.0)
    g.enter()
    a, b = g.enter(), g.enter()
    assert isinstance(a, defer.Deferred) and isinstance(b, defer.Deferred)
    left = results(b)
    a.addCallback(lambda _waited: b.cancel())
    clock.advance(1.0)
    assert left[0].check(defer.CancelledError)
    assert g.waiting == 0 and clock.getDelayedCalls() == []

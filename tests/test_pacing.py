"""Admission pacing (pacing.py): the rate, the burst, the queue and its bound, reloads."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.config import Limits
from imapproxy.pacing import EPSILON, Pacer, Turn, automatic_queue
from imapproxy.pacing import settings as pacing_settings


class Sim:
    """A Pacer on a hand-driven clock that records when each login got its turn."""

    def __init__(self, rate: float, max_waiting: int = 1000, now: float = 1000.0) -> None:
        self.now = now
        self.p = Pacer(lambda: self.now, rate=rate, max_waiting=max_waiting)
        self._ids = itertools.count(1)
        #: ticket -> when its turn came, in the order they came
        self.admitted: dict[int, float] = {}
        self.turns: list[float] = []
        self.waiting: list[int] = []

    def _got(self, tickets: list[int]) -> None:
        for ticket in tickets:
            self.admitted[ticket] = self.now
            self.turns.append(self.now)
            self.waiting.remove(ticket)

    def submit(self) -> tuple[int, Turn]:
        ticket = next(self._ids)
        turn = self.p.submit(ticket)
        if turn is Turn.NOW:
            self.admitted[ticket] = self.now
            self.turns.append(self.now)
        elif turn is Turn.WAIT:
            self.waiting.append(ticket)
        return ticket, turn

    def cancel(self, ticket: int) -> None:
        self.p.cancel(ticket)
        if ticket in self.waiting:
            self.waiting.remove(ticket)

    def advance(self, seconds: float) -> None:
        """Move the clock, waking up at every wake-up on the way, as the gate's timer does."""
        until = self.now + seconds
        while (wakeup := self.p.next_wakeup()) is not None and wakeup <= until:
            self.now = max(self.now, wakeup)
            self._got(self.p.poll())
        self.now = until
        self._got(self.p.poll())

    def configure(self, rate: float, max_waiting: int) -> None:
        self._got(self.p.configure(rate=rate, max_waiting=max_waiting))


# -- the rate and the burst ----------------------------------------------------------------


def test_without_a_rate_every_login_goes_on_at_once() -> None:
    sim = Sim(rate=0.0, max_waiting=0)
    assert [sim.submit()[1] for _ in range(10_000)] == [Turn.NOW] * 10_000
    assert sim.p.next_wakeup() is None and sim.p.poll() == [] and sim.p.waiting == 0


def test_a_full_bucket_lets_one_seconds_worth_through_then_one_per_interval() -> None:
    sim = Sim(rate=10.0)
    assert sim.p.burst == 10.0
    assert [sim.submit()[1] for _ in range(10)] == [Turn.NOW] * 10
    ticket, turn = sim.submit()
    assert turn is Turn.WAIT and sim.p.waiting == 1
    assert sim.p.next_wakeup() == pytest.approx(1000.1)
    sim.advance(0.09)
    assert ticket not in sim.admitted
    sim.advance(0.01)
    assert sim.admitted[ticket] == pytest.approx(1000.1) and sim.p.waiting == 0
    assert sim.p.next_wakeup() is None


def test_a_storm_is_served_at_the_rate_and_what_does_not_fit_is_refused() -> None:
    """1000 logins at once, 20 per second, 100 may wait: 20 at once, 100 over the next
    five seconds, one every 50 ms, in the order they came; 880 told to come back later."""
    sim = Sim(rate=20.0, max_waiting=100)
    turns = [sim.submit() for _ in range(1000)]
    assert [t for _, t in turns].count(Turn.NOW) == 20
    waited = [ticket for ticket, t in turns if t is Turn.WAIT]
    assert len(waited) == 100
    assert [t for _, t in turns].count(Turn.REFUSED) == 880
    sim.advance(10.0)
    assert list(sim.admitted)[20:] == waited, "first come, first served"
    times = [sim.admitted[ticket] - 1000.0 for ticket in waited]
    assert times == pytest.approx([0.05 * (i + 1) for i in range(100)])


def test_a_rate_below_one_still_lets_one_login_through() -> None:
    sim = Sim(rate=0.5)
    assert sim.p.burst == 1.0
    assert sim.submit()[1] is Turn.NOW
    ticket, turn = sim.submit()
    assert turn is Turn.WAIT and sim.p.next_wakeup() == pytest.approx(1002.0)
    sim.advance(2.0)
    assert sim.admitted[ticket] == pytest.approx(1002.0)


def test_a_quiet_bucket_fills_up_to_the_burst_and_no_more() -> None:
    sim = Sim(rate=5.0)
    for _ in range(5):
        sim.submit()
    sim.advance(3600.0)  # an hour of quiet earns one second's worth, not an hour's
    assert [sim.submit()[1] for _ in range(6)] == [Turn.NOW] * 5 + [Turn.WAIT]


def test_a_newcomer_waits_behind_those_in_line_even_when_a_turn_is_free() -> None:
    sim = Sim(rate=10.0)
    for _ in range(10):
        sim.submit()
    first, _ = sim.submit()
    sim.now += 0.5  # turns are free by now; the timer has not fired yet
    second, turn = sim.submit()
    assert turn is Turn.WAIT
    assert sim.p.poll() == [first, second]


def test_a_timer_a_hair_early_still_finds_the_turn_due() -> None:
    sim = Sim(rate=3.0)
    for _ in range(3):
        sim.submit()
    ticket, _ = sim.submit()
    wakeup = sim.p.next_wakeup()
    assert wakeup is not None
    sim.now = wakeup - EPSILON / 2
    assert sim.p.poll() == [ticket]


# -- the queue's bound and leaving it ------------------------------------------------------


def test_over_the_bound_a_login_is_refused_and_a_place_freed_is_taken_again() -> None:
    sim = Sim(rate=1.0, max_waiting=2)
    assert sim.submit()[1] is Turn.NOW
    a, _ = sim.submit()
    b, _ = sim.submit()
    assert sim.submit()[1] is Turn.REFUSED
    sim.cancel(a)
    assert sim.p.waiting == 1
    c, turn = sim.submit()
    assert turn is Turn.WAIT
    sim.advance(2.0)
    assert list(sim.admitted)[1:] == [b, c]


def test_leaving_gives_no_turn_away_and_the_next_in_line_keeps_its_time() -> None:
    sim = Sim(rate=2.0)
    sim.submit()
    sim.submit()
    a, _ = sim.submit()
    b, _ = sim.submit()
    wakeup = sim.p.next_wakeup()
    sim.cancel(a)
    sim.cancel(a)  # twice, or a ticket never seen: nothing happens
    sim.cancel(999)
    assert sim.p.next_wakeup() == wakeup
    sim.advance(0.5)
    assert sim.admitted[b] == pytest.approx(1000.5)
    sim.cancel(b)  # already through: nothing to leave
    assert sim.p.waiting == 0 and sim.p.next_wakeup() is None


def test_with_nobody_waiting_there_is_no_wakeup() -> None:
    sim = Sim(rate=1.0)
    sim.submit()
    a, _ = sim.submit()
    sim.cancel(a)
    assert sim.p.next_wakeup() is None and sim.p.poll() == []


# -- settings and reloads ------------------------------------------------------------------


def test_the_automatic_bound_is_what_the_rate_lets_through_in_half_the_preauth_timeout() -> None:
    assert automatic_queue(20.0, 60.0) == 600
    assert automatic_queue(0.5, 1.0) == 1
    assert automatic_queue(0.0, 60.0) == 1
    assert automatic_queue(3.3, 10.0) == 17  # rounded up
    assert pacing_settings(Limits(max_login_rate=20.0)) == (20.0, 600)
    assert pacing_settings(Limits(max_login_rate=20.0, preauth_timeout=10.0)) == (20.0, 100)
    assert pacing_settings(Limits(max_login_rate=20.0, max_login_queue=7)) == (20.0, 7)
    assert Limits().max_login_rate == 0.0 and Limits().max_login_queue == 0
    pacer = Pacer.from_limits(Limits(max_login_rate=4.0, max_login_queue=3), lambda: 0.0)
    assert (pacer.rate, pacer.max_waiting, pacer.burst) == (4.0, 3, 4.0)


def test_bad_settings_are_refused() -> None:
    for rate, bound in ((-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, -1)):
        with pytest.raises(ValueError):
            Pacer(lambda: 0.0, rate=rate, max_waiting=bound)


def test_a_reload_to_a_faster_rate_lets_the_line_move_faster_without_a_fresh_burst() -> None:
    sim = Sim(rate=10.0)
    for _ in range(10):
        sim.submit()
    line = [sim.submit()[0] for _ in range(40)]
    sim.configure(rate=20.0, max_waiting=1000)
    # The 10 taken from the old bucket are still taken from the new one (burst 20).
    assert len(sim.admitted) == 20
    sim.advance(1.5)  # 30 more turns at 20 per second
    assert [t for t in line if t in sim.admitted] == line[:40]
    assert sim.p.waiting == 0


def test_a_reload_keeps_at_most_the_new_burst_taken() -> None:
    sim = Sim(rate=100.0)
    for _ in range(100):
        sim.submit()
    sim.configure(rate=10.0, max_waiting=1000)  # 100 taken, but the new bucket holds 10
    ticket, _ = sim.submit()
    assert sim.p.next_wakeup() == pytest.approx(1000.1)
    sim.advance(0.1)
    assert ticket in sim.admitted


def test_a_reload_that_turns_pacing_off_lets_everyone_waiting_go_on() -> None:
    sim = Sim(rate=1.0)
    sim.submit()
    line = [sim.submit()[0] for _ in range(5)]
    sim.configure(rate=0.0, max_waiting=0)
    assert list(sim.admitted)[1:] == line and sim.p.next_wakeup() is None
    sim.configure(rate=2.0, max_waiting=5)  # back on: a full bucket
    assert [sim.submit()[1] for _ in range(3)] == [Turn.NOW, Turn.NOW, Turn.WAIT]


def test_a_smaller_bound_refuses_newcomers_but_nobody_already_waiting() -> None:
    sim = Sim(rate=1.0, max_waiting=10)
    sim.submit()
    line = [sim.submit()[0] for _ in range(6)]
    sim.configure(rate=1.0, max_waiting=2)
    assert sim.p.waiting == 6 and sim.submit()[1] is Turn.REFUSED
    sim.advance(6.0)
    assert list(sim.admitted)[1:] == line


def test_reconfigure_reads_limits() -> None:
    now = 0.0
    pacer = Pacer(lambda: now, rate=1.0, max_waiting=5)
    assert pacer.reconfigure(Limits(max_login_rate=8.0, preauth_timeout=2.0)) == []
    assert (pacer.rate, pacer.max_waiting) == (8.0, 8)


# -- properties ----------------------------------------------------------------------------

#: one step: (seconds to move on, logins arriving, how many of the oldest waiting leave)
STEPS = st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(0, 30), st.integers(0, 3)),
                 max_size=60)


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.1, 200.0), bound=st.integers(0, 50), steps=STEPS)
def test_never_more_than_burst_plus_rate_times_t_in_any_window(
        rate: float, bound: int, steps: list[tuple[float, int, int]]) -> None:
    sim = Sim(rate=rate, max_waiting=bound)
    for seconds, arriving, leaving in steps:
        sim.advance(seconds)
        for _ in range(arriving):
            _ticket, turn = sim.submit()
            if turn is Turn.REFUSED:
                assert sim.p.waiting == bound, "refused only when the queue is full"
        assert sim.p.waiting <= bound
        for ticket in sim.waiting[:leaving]:
            sim.cancel(ticket)
    sim.advance(bound / rate + 2.0)
    turns = sim.turns
    assert turns == sorted(turns)
    burst = sim.p.burst
    for i in range(len(turns)):
        for j in range(i, len(turns)):
            allowed = burst + rate * (turns[j] - turns[i] + EPSILON)
            assert j - i + 1 <= allowed + 1e-9, (i, j, turns[i], turns[j])


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.1, 200.0), bound=st.integers(1, 50), steps=STEPS)
def test_the_line_moves_first_come_first_served_and_never_stalls(
        rate: float, bound: int, steps: list[tuple[float, int, int]]) -> None:
    sim = Sim(rate=rate, max_waiting=bound)
    order: list[int] = []
    for seconds, arriving, leaving in steps:
        sim.advance(seconds)
        for _ in range(arriving):
            ticket, turn = sim.submit()
            if turn is not Turn.REFUSED:
                order.append(ticket)
        for ticket in sim.waiting[:leaving]:
            sim.cancel(ticket)
            order.remove(ticket)
        # Whoever waits has a wake-up, no later than the whole line's worth of turns.
        wakeup = sim.p.next_wakeup()
        if sim.p.waiting:
            assert wakeup is not None
            assert wakeup <= sim.now + 1.0 / rate + 1e-9
        else:
            assert wakeup is None
    left = sim.p.waiting
    start = sim.now
    sim.advance(left / rate + 1e-6)
    assert sim.p.waiting == 0, "the line drains in (waiting / rate) seconds"
    assert list(sim.admitted) == order
    assert all(when <= start + left / rate + 1e-6 for when in sim.admitted.values())

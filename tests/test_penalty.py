"""The brute-force penalty, paid before the password is checked: queues, doubling, owners."""

from __future__ import annotations

import gc
import itertools
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.config import Limits
from imapproxy.penalty import MAX_WAITING, Outcome, Penalty, Refused


class Sim:
    """A Penalty on a hand-driven clock, with attempts numbered as they come."""

    def __init__(self, **kwargs: object) -> None:
        self.now = 1000.0
        self.p = Penalty(lambda: self.now, **kwargs)  # type: ignore[arg-type]
        self.admitted: dict[int, float] = {}
        self._ids = itertools.count(1)

    def _note(self, granted: list[int] | Refused) -> None:
        if isinstance(granted, list):
            for attempt in granted:
                self.admitted[attempt] = self.now
        self.p.next_wakeup()  # as the gate does after every change, to set its timer

    def submit(self, address: str, user: str) -> int | Refused:
        attempt = next(self._ids)
        result = self.p.submit(attempt, address, self.p.user_key(user))
        self._note(result)
        return result if isinstance(result, Refused) else attempt

    def fail(self, attempt: int, user: str, password: bytes) -> None:
        self._note(self.p.finish(attempt, Outcome.FAILURE, self.p.fingerprint(user, password)))

    def succeed(self, attempt: int) -> None:
        self._note(self.p.finish(attempt, Outcome.SUCCESS))

    def advance(self, seconds: float) -> None:
        """Move the clock, waking the penalty at each wake-up it asks for on the way."""
        end = self.now + seconds
        while True:
            wakeup = self.p.next_wakeup()
            if wakeup is None or wakeup > end:
                break
            self.now = max(self.now, wakeup)
            self._note(self.p.poll())
        self.now = end
        self._note(self.p.poll())

    def running(self, attempt: int) -> bool:
        return attempt in self.admitted


def test_a_fresh_address_has_parallel_checks_and_then_a_queue() -> None:
    s = Sim(parallel=4)
    attempts = [s.submit("192.0.2.7", f"user{i}") for i in range(6)]
    assert not any(isinstance(a, Refused) for a in attempts)
    assert [s.running(a) for a in attempts] == [True] * 4 + [False] * 2
    s.succeed(attempts[0])
    assert s.running(attempts[4]) and not s.running(attempts[5])


def test_a_penalised_address_waits_before_every_check_right_or_wrong() -> None:
    s = Sim()
    first = s.submit("192.0.2.7", "alice")
    s.fail(first, "alice", b"typo")
    right = s.submit("192.0.2.7", "alice")
    assert not s.running(right), "the right password waits like a wrong one"
    s.advance(1.9)
    assert not s.running(right)
    s.advance(0.1)
    assert s.running(right) and s.admitted[right] == 1002.0
    s.succeed(right)
    again = s.submit("192.0.2.7", "alice")
    assert s.running(again), "a success clears the failures"


def test_the_penalty_doubles_per_distinct_failure_to_the_cap_and_repeats_do_not_count() -> None:
    s = Sim(base=2, cap=15)
    waits = []
    for i in range(6):
        attempt = s.submit("198.51.100.9", "alice")
        started = s.now
        s.advance(60) if not s.running(attempt) else None
        waits.append(s.admitted[attempt] - started)
        s.fail(attempt, "alice", f"guess{i}".encode())
    assert waits == [0, 2, 4, 8, 15, 15]
    assert s.p.failures("198.51.100.9", "alice") == (6, 6)
    for _ in range(20):  # a phone retrying its stale password
        attempt = s.submit("198.51.100.9", "alice")
        s.advance(15)
        s.fail(attempt, "alice", b"guess5")
    assert s.p.failures("198.51.100.9", "alice") == (6, 6)


def test_guesses_in_parallel_from_one_address_are_checked_one_at_a_time() -> None:
    """The attack of issue 12: 150 guesses at once; a check takes 10 ms and fails."""
    s = Sim()
    attempts = [s.submit("203.0.113.5", "alice") for _ in range(150)]
    assert not any(isinstance(a, Refused) for a in attempts)  # nothing known yet
    first_checks = [a for a in attempts if s.running(a)]
    assert len(first_checks) == 4  # the user's burst: no further
    for attempt in first_checks:
        s.fail(attempt, "alice", f"guess{attempt}".encode())
    # Penalised now: a newcomer finds the queue over its bound and is refused unchecked.
    assert isinstance(s.submit("203.0.113.5", "alice"), Refused)
    checked = set(first_checks)
    while s.now < 1060:
        for attempt in [a for a in attempts if s.running(a) and a not in checked]:
            s.advance(0.01)
            checked.add(attempt)
            s.fail(attempt, "alice", f"guess{attempt}".encode())
        s.advance(0.5)
    in_a_minute = [a for a in attempts if s.admitted.get(a, 1e9) < 1060.0]
    assert len(in_a_minute) <= 4 + 6  # then 2, 4, 8, 15, 15, 15 s apart


def test_the_owner_from_a_known_address_is_never_held_back_by_an_attack_elsewhere() -> None:
    s = Sim()
    own = s.submit("192.0.2.7", "alice")
    s.succeed(own)  # the owner's phone, yesterday
    for i in range(40):  # a botnet: one guess per address
        attempt = s.submit(f"198.51.100.{i}", "alice")
        s.advance(20)
        if s.running(attempt):
            s.fail(attempt, "alice", f"guess{i}".encode())
    assert s.p.failures("198.51.100.0", "alice")[1] > 1
    owner = s.submit("192.0.2.7", "alice")
    assert s.running(owner), "known address: no user penalty"


def test_a_guesser_spread_over_many_addresses_is_slowed_per_user() -> None:
    s = Sim(base=2, cap=15)
    checked = 0
    attempts = []
    for i in range(30):  # 30 addresses guessing at once
        attempts.append(s.submit(f"198.51.100.{i}", "alice"))
    for _ in range(600):
        for attempt in attempts:
            if s.running(attempt) and not isinstance(attempt, Refused):
                checked += 1
                s.fail(attempt, "alice", f"guess{attempt}".encode())
                attempts.remove(attempt)
        s.advance(0.1)
    # 60 s: the first ones before the user was penalised, then one per 2, 4, 8, 15 s...
    assert checked <= 4 + 4 + 2, checked


def test_the_owner_from_a_new_address_waits_at_most_the_cap() -> None:
    s = Sim(base=2, cap=15)
    guesser = s.submit("198.51.100.1", "alice")
    s.fail(guesser, "alice", b"g1")
    for i in range(2, 6):
        a = s.submit(f"198.51.100.{i}", "alice")
        s.advance(30)
        s.fail(a, "alice", f"g{i}".encode())
    owner = s.submit("192.0.2.200", "alice")  # a new network, the password is right
    started = s.now
    s.advance(20)
    assert s.running(owner) and s.admitted[owner] - started <= 15
    s.succeed(owner)
    assert s.p.failures("198.51.100.1", "alice")[1] == 0


def test_a_client_that_leaves_the_queue_frees_its_place() -> None:
    s = Sim(parallel=1)
    first = s.submit("192.0.2.7", "alice")
    second = s.submit("192.0.2.7", "bob")
    third = s.submit("192.0.2.7", "carol")
    assert s.running(first) and not s.running(second)
    s.p.cancel(second)
    s.succeed(first)
    assert s.running(third)
    assert s.p.waiting == 0


def test_cancelling_a_running_attempt_teaches_nothing() -> None:
    s = Sim(parallel=1)
    first = s.submit("192.0.2.7", "alice")
    second = s.submit("192.0.2.7", "alice")
    s._note(s.p.cancel(first))
    assert s.running(second)
    assert s.p.failures("192.0.2.7", "alice") == (0, 0)


def test_exempt_addresses_neither_wait_nor_count() -> None:
    s = Sim(exempt=["10.1.0.0/16"], parallel=1)
    attempts = [s.submit("10.1.2.3", "alice") for _ in range(10)]
    assert all(s.running(a) for a in attempts)
    for a in attempts:
        s.fail(a, "alice", f"x{a}".encode())
    assert s.p.failures("10.1.2.3", "alice") == (0, 0)
    assert s.running(s.submit("198.51.100.1", "alice"))


def test_failures_are_forgotten_after_the_memory_and_entries_go() -> None:
    s = Sim(memory=900)
    a = s.submit("192.0.2.7", "alice")
    s.fail(a, "alice", b"typo")
    s.advance(901)
    later = s.submit("192.0.2.8", "zed")
    assert s.running(later)
    assert s.p.failures("192.0.2.7", "alice") == (0, 0)
    assert s.p.tracked <= 3  # expired entries are dropped as the tables are used


def test_reconfigure_keeps_what_was_learnt() -> None:
    s = Sim(base=2)
    a = s.submit("192.0.2.7", "alice")
    s.fail(a, "alice", b"typo")
    s.p.reconfigure(Limits(login_delay=5, login_delay_max=60))
    assert s.p.failures("192.0.2.7", "alice") == (1, 1)
    b = s.submit("192.0.2.7", "alice")
    s.advance(2)  # the wait set by the last failure stays
    assert s.running(b)
    s.fail(b, "alice", b"typo2")
    c = s.submit("192.0.2.7", "alice")
    s.advance(9.9)
    assert not s.running(c), "the new base doubles: 5, 10"
    s.advance(0.1)
    assert s.running(c)


def test_the_tables_are_bounded_in_bytes_whatever_the_names() -> None:
    s = Sim(max_bytes=512 * 1024)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(4_000):
        name = f"{i:05d}" + "x" * 60_000  # 60 KB names cost nothing: users are hashed
        attempt = s.submit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", name)
        s.fail(attempt, name, b"p")
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert s.p.bytes_counted <= 512 * 1024
    assert grown < 1024 * 1024, grown


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "fail", "succeed", "cancel", "wait"]),
                          st.integers(0, 3), st.integers(0, 3)), max_size=60))
def test_any_sequence_keeps_the_rules(steps: list[tuple[str, int, int]]) -> None:
    s = Sim(parallel=2, memory=50)
    live: list[int] = []
    def lanes() -> dict[object, object]:
        return {("a", k): v for k, v in s.p._addresses.items()} | {
            ("u", k): v for k, v in s.p._users.items()}

    for op, a, b in steps:
        before = {key: lane.running for key, lane in lanes().items()}
        address, user = f"192.0.2.{a}", f"user{b}"
        if op == "submit":
            attempt = s.submit(address, user)
            if not isinstance(attempt, Refused):
                live.append(attempt)
        elif op == "wait":
            s.advance(a * 3 + b)
        elif live:
            attempt = live[(a + b) % len(live)]
            if op == "cancel":
                s._note(s.p.cancel(attempt))
                live.remove(attempt)
            elif s.running(attempt):
                live.remove(attempt)
                if op == "fail":
                    s.fail(attempt, user, bytes([a, b]))
                else:
                    s.succeed(attempt)
        for key, lane in lanes().items():
            assert lane.running >= 0 and len(lane.waiting) <= MAX_WAITING
            if lane.failures:
                # A penalised lane admits one check at a time; those already running
                # when the failure came in are not stopped.
                assert lane.running <= max(1, before.get(key, 0))
        assert s.p.bytes_counted >= 0
    # Liveness: whoever still waits is admitted in time, as the running ones finish.
    for _ in range(100):
        if not live:
            break
        s.advance(60)
        for attempt in [a for a in live if s.running(a)]:
            live.remove(attempt)
            s.succeed(attempt)
    assert not live, "an attempt waits forever"


def test_a_newcomer_after_the_last_waiter_left_is_woken_in_time() -> None:
    """The queue emptied by a cancel, then a new attempt: its wake-up must be set anew."""
    s = Sim()
    first = s.submit("192.0.2.7", "alice")
    s.fail(first, "alice", b"typo")
    leaving = s.submit("192.0.2.7", "alice")
    assert s.p.next_wakeup() == 1002.0
    s._note(s.p.cancel(leaving))
    assert s.p.next_wakeup() is None
    newcomer = s.submit("192.0.2.7", "alice")
    assert s.p.next_wakeup() == 1002.0
    s.advance(2)
    assert s.running(newcomer)


def test_one_typo_behind_a_shared_address_does_not_queue_everyone_behind_it() -> None:
    """A carrier's shared address: phones whose users logged in from it lately are not
    held back by the penalty someone else's typo put on it."""
    s = Sim(parallel=1)
    for i in range(20):
        phone = s.submit("100.64.0.1", f"user{i}")
        s.advance(1)
        s.succeed(phone)
    typo = s.submit("100.64.0.1", "user0")
    s.fail(typo, "user0", b"typo")
    reconnects = [s.submit("100.64.0.1", f"user{i}") for i in range(1, 20)]
    assert all(s.running(a) for a in reconnects)
    stranger = s.submit("100.64.0.1", "newcomer")
    assert not s.running(stranger), "not known here: the address's penalty applies"
    again = s.submit("100.64.0.1", "user0")
    assert not s.running(again), "user0 has a failure: it goes through the queue"


def test_a_penalised_address_queue_is_bounded_and_a_busy_clean_one_is_not() -> None:
    s = Sim(parallel=1)
    busy = [s.submit("198.51.100.5", f"phone{i}") for i in range(100)]
    assert not any(isinstance(a, Refused) for a in busy), "a reconnect storm is not refused"
    first = s.submit("203.0.113.5", "x")
    s.fail(first, "x", b"typo")
    attempts = [s.submit("203.0.113.5", f"user{i}") for i in range(40)]
    refused = [a for a in attempts if isinstance(a, Refused)]
    assert len(refused) == 40 - MAX_WAITING


# -- what other instances learnt (the shared state, redisstate.py) ------------------------


def test_known_elsewhere_skips_the_user_lane_and_the_address_penalty() -> None:
    """The owner logged in from this carrier address through another instance: a typo
    of someone else behind it here does not hold the owner back, and neither does an
    attack on the account from elsewhere."""
    s = Sim()
    typo = s.submit("192.0.2.7", "mate")
    s.fail(typo, "mate", b"typo")  # this address is penalised here now
    attempt = 1000
    granted = s.p.submit(attempt, "192.0.2.7", s.p.user_key("alice"), known=True)
    assert granted == [attempt]
    # With the user attacked elsewhere, a known address skips the user's lane only.
    waits = s.p.submit(attempt + 1, "192.0.2.7", s.p.user_key("alice"), known=True,
                       user_failures=True)
    assert waits == [], "in the address's penalised queue"


def test_user_failures_elsewhere_put_a_known_user_back_in_the_address_queue() -> None:
    s = Sim()
    first = s.submit("192.0.2.7", "alice")
    s.succeed(first)  # known here
    mate = s.submit("192.0.2.7", "mate")
    s.fail(mate, "mate", b"typo")
    assert isinstance(s.submit("192.0.2.7", "alice"), int)
    assert s.running(3), "known, nobody guessing alice: no queue"
    s.p.finish(3, Outcome.SUCCESS)
    granted = s.p.submit(99, "192.0.2.7", s.p.user_key("alice"), user_failures=True)
    assert granted == [], "alice is attacked elsewhere: the address's queue applies"

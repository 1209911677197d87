"""The brute-force delay: grows per client and per user, ignores repeats, never blocks success."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.config import Limits
from imapproxy.throttle import MAX_FINGERPRINTS, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**kwargs: float) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(clock, **kwargs), clock  # type: ignore[arg-type]


def test_delay_doubles_per_distinct_failure_and_is_capped() -> None:
    t, _clock = throttle(base_delay=2, max_delay=30)
    delays = [t.failed("192.0.2.7", "alice", f"guess{i}".encode()) for i in range(8)]
    assert delays == [2, 4, 8, 16, 30, 30, 30, 30]


def test_retrying_the_same_wrong_password_does_not_count_again() -> None:
    t, _clock = throttle()
    assert t.failed("192.0.2.7", "alice", b"old-password") == 2
    for _ in range(50):  # a phone retrying its stale password
        assert t.failed("192.0.2.7", "alice", b"old-password") == 2
    assert t.failures("192.0.2.7", "alice") == (1, 1)
    assert t.failed("192.0.2.7", "alice", b"other") == 4


def test_counts_per_user_across_addresses() -> None:
    t, _clock = throttle()
    delays = [t.failed(f"198.51.100.{i}", "alice", f"p{i}".encode()) for i in range(4)]
    assert delays == [2, 4, 8, 16]  # a botnet guessing alice's password
    assert t.failed("198.51.100.99", "bob", b"p") == 2


def test_counts_per_address_across_users() -> None:
    t, _clock = throttle()
    delays = [t.failed("203.0.113.5", f"user{i}", b"Winter2024!") for i in range(4)]
    assert delays == [2, 4, 8, 16]  # password spraying from one address
    assert t.failed("203.0.113.6", "user0", b"other") == 4  # user0 has its own count


def test_success_resets_the_user_and_its_failures_at_the_address() -> None:
    t, _clock = throttle()
    t.failed("192.0.2.7", "alice", b"typo1")
    t.failed("192.0.2.7", "alice", b"typo2")
    t.failed("192.0.2.7", "bob", b"x")
    assert t.failures("192.0.2.7", "alice") == (3, 2)
    t.succeeded("192.0.2.7", "ALICE")
    assert t.failures("192.0.2.7", "alice") == (1, 0)  # bob's failure stays
    assert t.failed("192.0.2.7", "alice", b"typo3") == 4
    t.succeeded("192.0.2.7", "bob")
    t.succeeded("192.0.2.7", "alice")
    assert t.tracked == 0
    t.succeeded("192.0.2.99", "nobody")  # nothing known: nothing happens


def test_failures_are_forgotten_after_the_memory() -> None:
    t, clock = throttle(memory=900)
    for i in range(4):
        t.failed("192.0.2.7", "alice", f"p{i}".encode())
    clock.now += 899
    assert t.failures("192.0.2.7", "alice") == (4, 4)
    clock.now += 2
    assert t.failures("192.0.2.7", "alice") == (0, 0)
    assert t.failed("192.0.2.7", "alice", b"p0") == 2  # even the same password counts anew


def test_unknown_and_known_users_are_treated_alike() -> None:
    t, _clock = throttle()
    known = [t.failed("192.0.2.1", "alice", f"p{i}".encode()) for i in range(3)]
    unknown = [t.failed("192.0.2.2", "no-such-user", f"p{i}".encode()) for i in range(3)]
    assert known == unknown


def test_off_when_base_delay_is_zero() -> None:
    t, _clock = throttle(base_delay=0)
    assert [t.failed("192.0.2.7", "alice", f"p{i}".encode()) for i in range(3)] == [0, 0, 0]
    assert t.tracked == 0
    assert t.delay(3) == 0


def test_the_password_is_never_stored() -> None:
    t, _clock = throttle()
    password = b"correct horse battery staple"
    t.failed("192.0.2.7", "alice", password)
    stored = repr(t.__dict__) + repr([r.failures for r in (*t._clients.values(),
                                                          *t._users.values())])
    assert password.decode() not in stored
    assert password.hex() not in stored
    # The fingerprint is keyed: another process (another key) computes another one.
    other, _ = throttle()
    assert t.fingerprint("alice", password) != other.fingerprint("alice", password)
    assert len(t.fingerprint("alice", password)) == 16


def test_tables_are_bounded() -> None:
    t, clock = throttle()
    t.max_entries = 50
    for i in range(1000):
        clock.now += 0.001
        t.failed(f"10.0.{i // 256}.{i % 256}", f"random{i}", b"x")
    assert len(t._clients) <= 50 and len(t._users) <= 50
    for i in range(200):
        t.failed("192.0.2.7", "alice", f"p{i}".encode())
    assert len(t._users["alice"].failures) == MAX_FINGERPRINTS


def test_from_limits() -> None:
    t = LoginThrottle.from_limits(Limits(login_delay=0.5, login_delay_max=4,
                                         login_failure_memory=60), Clock())
    assert (t.base_delay, t.max_delay, t.memory) == (0.5, 4, 60)
    assert [t.delay(n) for n in range(6)] == [0, 0.5, 1, 2, 4, 4]
    assert t.delay(10**6) == 4  # no overflow


@pytest.mark.parametrize("count", [1, 2, 3])
def test_delay_formula(count: int) -> None:
    t, _clock = throttle(base_delay=2, max_delay=30)
    assert t.delay(count) == 2 * 2 ** (count - 1)


_events = st.lists(st.tuples(st.sampled_from(["fail", "ok", "tick"]), st.integers(0, 4),
                             st.integers(0, 6)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(_events)
def test_delays_stay_within_bounds_and_success_always_clears_the_user(
        events: list[tuple[str, int, int]]) -> None:
    t, clock = throttle(base_delay=1, max_delay=8, memory=50)
    t.max_entries = 3
    for op, who, what in events:
        client, user = f"192.0.2.{who}", f"user{what % 3}"
        if op == "fail":
            delay = t.failed(client, user, bytes([what]))
            assert 1 <= delay <= 8
        elif op == "ok":
            t.succeeded(client, user)
            assert t.failures(client, user)[1] == 0
        else:
            clock.now += what * 5
        assert len(t._clients) <= 3 and len(t._users) <= 3
        assert all(len(r.failures) <= MAX_FINGERPRINTS for r in t._clients.values())

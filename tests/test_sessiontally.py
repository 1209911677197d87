"""sessiontally: this instance's sessions and whether Redis holds the same counts."""

from __future__ import annotations

from imapproxy.sessiontally import SessionTally


def test_sessions_counted_by_redis_are_released_there() -> None:
    tally = SessionTally()
    claim = tally.begin("Alice", "192.0.2.7")
    assert tally.in_flight == 1 and tally.counts == {}
    tally.granted(claim)
    assert tally.counts == {("alice", "192.0.2.7"): 1} and tally.in_flight == 0
    assert not tally.needs_resync
    assert tally.release(claim) is True
    assert tally.release(claim) is False, "once"
    assert tally.counts == {}


def test_a_refused_claim_counts_nowhere() -> None:
    tally = SessionTally()
    claim = tally.begin("alice", "192.0.2.7")
    tally.refused(claim)
    assert tally.counts == {} and tally.in_flight == 0
    assert tally.release(claim) is False


def test_sessions_counted_locally_count_in_redis_from_the_next_snapshot() -> None:
    tally = SessionTally()
    first = tally.begin("alice", "192.0.2.7")
    tally.counted_locally(first)
    assert tally.needs_resync
    # Not in Redis: its end is not sent there (the snapshot will not hold it either).
    assert tally.release(first) is False and tally.counts == {}
    second, third = tally.begin("alice", "192.0.2.7"), tally.begin("bob", "192.0.2.8")
    assert tally.snapshot() is None, "not while a claim is in flight"
    tally.counted_locally(second)
    tally.granted(third)
    assert tally.snapshot() == [("alice", "192.0.2.7", 1), ("bob", "192.0.2.8", 1)]
    assert not tally.needs_resync
    assert tally.release(second) is True, "in Redis since the snapshot"
    fourth = tally.begin("alice", "192.0.2.7")
    tally.counted_locally(fourth)
    assert tally.release(fourth) is False


def test_a_failed_write_asks_for_a_resync() -> None:
    tally = SessionTally()
    tally.write_failed()
    assert tally.needs_resync
    assert tally.snapshot() == [] and not tally.needs_resync


def test_a_claim_not_answered_yet_is_not_released() -> None:
    tally = SessionTally()
    claim = tally.begin("alice", "192.0.2.7")
    assert tally.release(claim) is False
    tally.granted(claim)
    assert tally.counts == {("alice", "192.0.2.7"): 1}


# -- whether to ask -----------------------------------------------------------------------

"""penaltylane: one address's or one user's failures, known addresses and queue."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.penaltylane import MAX_FINGERPRINTS, Lane, add_failure


def test_a_new_lane_is_idle_and_shares_the_empty_queue() -> None:
    first, second = Lane(), Lane()
    assert first.idle and second.idle
    # No deque per lane until something waits (600 bytes each, for thousands of lanes).
    assert first.waiting is second.waiting and not first.waiting


def test_waiting_is_first_in_first_out_and_gives_the_queue_back_when_empty() -> None:
    lane, empty = Lane(), Lane().waiting
    lane.wait(1)
    lane.wait(2)
    lane.wait(3)
    assert list(lane.waiting) == [1, 2, 3] and not lane.idle
    lane.unwait(2)  # a client that went away leaves from the middle
    lane.unwait()   # the first one is admitted
    assert list(lane.waiting) == [3]
    lane.unwait()
    assert lane.waiting is empty and lane.idle


def test_the_same_failure_again_is_not_a_new_one_and_moves_to_the_end() -> None:
    lane = Lane()
    add_failure(lane, b"fp-a", b"user", 1.0)
    add_failure(lane, b"fp-b", b"user", 2.0)
    add_failure(lane, b"fp-a", b"user", 3.0)
    assert list(lane.failures) == [b"fp-b", b"fp-a"]
    assert lane.failures[b"fp-a"] == (b"user", 3.0)


def test_failures_expire_by_their_time() -> None:
    lane = Lane()
    for when in (1.0, 5.0, 9.0):
        add_failure(lane, b"fp%d" % when, b"u", when)
    lane.expire(before=5.0)
    assert sorted(w for _u, w in lane.failures.values()) == [5.0, 9.0]
    lane.expire(before=100.0)
    assert lane.idle


@given(st.lists(st.binary(min_size=1, max_size=4), max_size=60))
def test_failures_are_bounded_and_keep_the_newest(fingerprints: list[bytes]) -> None:
    lane = Lane()
    for n, fingerprint in enumerate(fingerprints):
        add_failure(lane, fingerprint, b"u", float(n))
    assert len(lane.failures) <= MAX_FINGERPRINTS
    newest_first = list(dict.fromkeys(reversed(fingerprints)))[:MAX_FINGERPRINTS]
    assert set(lane.failures) == set(newest_first)


def test_weight_grows_with_what_the_lane_holds() -> None:
    lane = Lane()
    empty = lane.weight()
    add_failure(lane, b"fp", b"u", 0.0)
    with_failure = lane.weight()
    lane.known["192.0.2.1"] = 0.0
    assert empty < with_failure < lane.weight()
    lane.running = 1
    assert not lane.idle

"""Tests for imapproxy.breaker: the backend circuit breaker, driven by a fake clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from imapproxy.breaker import CircuitBreaker
from imapproxy.directory import Server

A, B, C = Server("a"), Server("b", 1143), Server("c")


def make(cooldown: float = 30.0) -> tuple[Clock, CircuitBreaker[Server]]:
    clock = Clock()
    return clock, CircuitBreaker(clock, cooldown)


def test_unknown_server_is_up() -> None:
    _, health = make()
    assert not health.is_down(A)
    assert health.order([A, B, C]) == [A, B, C]


def test_failed_server_is_down_until_cooldown_ends() -> None:
    clock, health = make(30.0)
    health.mark_failed(B)
    assert health.is_down(B)
    clock.advance(29.9)
    assert health.is_down(B)
    clock.advance(0.1)
    assert not health.is_down(B)
    assert health.down() == []


def test_mark_ok_closes_the_breaker_at_once() -> None:
    _, health = make()
    health.mark_failed(A)
    health.mark_ok(A)
    assert not health.is_down(A)
    health.mark_ok(C)  # never failed: no error


def test_order_moves_down_servers_last_keeping_relative_order() -> None:
    clock, health = make(10.0)
    health.mark_failed(A)
    clock.advance(1)
    health.mark_failed(C)
    assert health.order([A, B, C]) == [B, A, C]
    assert health.down() == [A, C]


def test_all_down_still_returns_every_server() -> None:
    # A stale mark must not turn into an outright login failure: try them, last.
    _, health = make()
    for s in (A, B, C):
        health.mark_failed(s)
    assert health.order([C, A, B]) == [C, A, B]


def test_failure_after_cooldown_opens_again() -> None:
    clock, health = make(5.0)
    health.mark_failed(A)
    clock.advance(5.0)
    assert health.order([A, B]) == [A, B]  # half-open: tried first again
    health.mark_failed(A)
    assert health.order([A, B]) == [B, A]


def test_repeated_failure_extends_the_cooldown() -> None:
    clock, health = make(5.0)
    health.mark_failed(A)
    clock.advance(4.0)
    health.mark_failed(A)
    clock.advance(4.0)
    assert health.is_down(A)


def test_zero_cooldown_disables_the_breaker() -> None:
    _, health = make(0.0)
    health.mark_failed(A)
    assert not health.is_down(A)
    assert health.order([A, B]) == [A, B]


def test_keys_need_only_be_hashable() -> None:
    # The LDAP directory uses the same breaker for its URIs.
    clock = Clock()
    health: CircuitBreaker[str] = CircuitBreaker(clock, 1.0)
    health.mark_failed("ldap://one")
    assert health.order(["ldap://one", "ldap://two"]) == ["ldap://two", "ldap://one"]


servers = st.lists(st.sampled_from([A, B, C, Server("d"), Server("e", 2)]), unique=True)


@given(servers, st.sets(st.integers(0, 4)), st.floats(0, 60))
def test_order_is_a_permutation_with_up_servers_first(
    given_servers: list[Server], failed: set[int], elapsed: float
) -> None:
    clock, health = make(30.0)
    for i in failed:
        if i < len(given_servers):
            health.mark_failed(given_servers[i])
    clock.advance(elapsed)
    ordered = health.order(given_servers)
    assert sorted(ordered, key=str) == sorted(given_servers, key=str)
    flags = [health.is_down(s) for s in ordered]
    assert flags == sorted(flags)  # all False (up) before any True (down)

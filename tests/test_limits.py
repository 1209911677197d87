"""Connection limits: total, per client (IPv6 per /64), per user and client; pure bookkeeping."""

from __future__ import annotations

import resource

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.config import Limits
from imapproxy.limits import ConnectionLimiter, Refusal, Ticket, automatic_total, client_key


def admitted(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def test_client_key_groups_ipv6_by_prefix_and_unmaps_ipv4() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_key("2001:db8:1:3::1", ipv6_prefix=48) == "2001:db8:1::/48"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("/run/imapproxy.sock") == "/run/imapproxy.sock"


def test_per_client_limit_refuses_the_excess_and_frees_on_release() -> None:
    limiter = ConnectionLimiter(max_per_client=2)
    first, second = admitted(limiter.admit("192.0.2.7")), admitted(limiter.admit("192.0.2.7"))
    assert limiter.admit("192.0.2.7") is Refusal.PER_CLIENT
    admitted(limiter.admit("192.0.2.8"))  # another address is not affected
    first.release()
    first.release()  # twice is harmless
    third = admitted(limiter.admit("192.0.2.7"))
    assert limiter.connections_from("192.0.2.7") == 2
    second.release()
    third.release()
    assert limiter.connections_from("192.0.2.7") == 0
    assert limiter._clients == {"192.0.2.8": 1}  # nothing left behind for gone clients


def test_ipv6_clients_in_one_64_share_the_limit() -> None:
    limiter = ConnectionLimiter(max_per_client=2)
    admitted(limiter.admit("2001:db8::1"))
    admitted(limiter.admit("2001:db8::2"))
    assert limiter.admit("2001:db8::ffff") is Refusal.PER_CLIENT
    admitted(limiter.admit("2001:db8:0:1::1"))


def test_total_limit_comes_first() -> None:
    limiter = ConnectionLimiter(max_total=2, max_per_client=5)
    tickets = [admitted(limiter.admit(f"192.0.2.{i}")) for i in (1, 2)]
    assert limiter.admit("192.0.2.3") is Refusal.TOTAL
    tickets[0].release()
    admitted(limiter.admit("192.0.2.3"))
    assert limiter.total == 2


def test_per_user_client_limit_is_separate_from_per_client() -> None:
    limiter = ConnectionLimiter(max_per_client=100, max_per_user_client=2)
    tickets = [admitted(limiter.admit("198.51.100.1")) for _ in range(5)]
    assert tickets[0].login("alice") is None
    assert tickets[1].login("Alice") is None  # case does not make another user
    assert tickets[2].login("alice") is Refusal.PER_USER_CLIENT
    assert tickets[3].login("bob") is None  # other users behind the same NAT go on
    assert limiter.sessions_of("ALICE", "198.51.100.1") == 2
    other = admitted(limiter.admit("198.51.100.2"))
    assert other.login("alice") is None  # alice from elsewhere is counted apart
    tickets[0].release()
    assert tickets[4].login("alice") is None
    for ticket in (*tickets, other):
        ticket.release()
    assert limiter.total == 0 and not limiter._clients and not limiter._user_clients


def test_zero_means_no_limit() -> None:
    limiter = ConnectionLimiter()
    tickets = [admitted(limiter.admit("192.0.2.1")) for _ in range(500)]
    assert all(t.login("alice") is None for t in tickets)


def test_from_limits_and_the_automatic_total() -> None:
    limiter = ConnectionLimiter.from_limits(Limits(max_connections=7, max_connections_per_ip=3,
                                                   max_connections_per_user_ip=2,
                                                   ipv6_prefix=56))
    assert (limiter.max_total, limiter.max_per_client, limiter.max_per_user_client,
            limiter.ipv6_prefix) == (7, 3, 2, 56)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert ConnectionLimiter.from_limits(Limits()).max_total == automatic_total()
    if soft != resource.RLIM_INFINITY:
        assert automatic_total() == max(1, (soft - 64) // 2)
    assert automatic_total(reserve=10**9) == 1


def test_defaults_are_generous_per_address_and_tight_per_user() -> None:
    limits = Limits()
    assert limits.max_connections_per_ip == 2000
    assert limits.max_connections_per_user_ip == 20
    assert limits.ipv6_prefix == 64


_operations = st.lists(st.tuples(st.sampled_from(["admit", "login", "release"]),
                                 st.integers(0, 3), st.integers(0, 30)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(_operations)
def test_counts_always_match_the_live_tickets(operations: list[tuple[str, int, int]]) -> None:
    limiter = ConnectionLimiter(max_total=12, max_per_client=5, max_per_user_client=2)
    live: list[Ticket] = []
    for op, who, pick in operations:
        if op == "admit":
            result = limiter.admit(f"2001:db8:{who}::{pick}")
            if isinstance(result, Ticket):
                live.append(result)
        elif live and op == "login":
            ticket = live[pick % len(live)]
            if ticket.user is None:
                ticket.login(f"user{who}")
        elif live:
            live.pop(pick % len(live)).release()
        assert limiter.total == len(live) <= 12
        assert sum(limiter._clients.values()) == len(live)
        assert all(0 < n <= 5 for n in limiter._clients.values())
        assert all(0 < n <= 2 for n in limiter._user_clients.values())
        assert sum(limiter._user_clients.values()) == sum(t.user is not None for t in live)


def test_login_on_a_released_ticket_is_a_bug() -> None:
    ticket = admitted(ConnectionLimiter().admit("192.0.2.1"))
    ticket.release()
    with pytest.raises(AssertionError):
        ticket.login("alice")


def test_logout_undoes_a_login_and_the_ticket_may_log_in_again() -> None:
    """Another instance's sessions made it one too many (redisstate.py): the user no
    longer counts here, and the connection may try again."""
    limiter = ConnectionLimiter(max_per_user_client=1)
    ticket = admitted(limiter.admit("198.51.100.1"))
    assert ticket.login("alice") is None
    ticket.logout()
    assert ticket.user is None and limiter.sessions_of("alice", "198.51.100.1") == 0
    ticket.logout()  # twice is harmless
    assert ticket.login("alice") is None
    ticket.release()
    ticket.logout()  # after release too
    assert limiter.total == 0 and not limiter._user_clients

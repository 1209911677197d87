"""The Twisted adapters on a MemoryReactorClock: timeouts, relay, BYE, drain. No sleeps."""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Any

import pytest
from helpers import DOVECOT_GREETING, FakeEndpoint, Harness
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from imapproxy.config import AuthConfig, Limits, SharedConfig, Timeouts
from imapproxy.redisurl import parse_redis_url


def closed(transport: object) -> bool:
    """The proxy closed (or started closing) this in-memory connection."""
    return bool(getattr(transport, "disconnecting", False) or not transport.connected)


def test_greeting_and_login_relay_with_pipelined_bytes_in_order() -> None:
    h = Harness()
    client, transport = h.connect_client()
    assert transport.value().startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
    # Still read while logging in (held in the session, bounded), so that a client
    # that goes away meanwhile is noticed at once.
    assert transport.producerState == "producing"
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    backend.transport.clear()
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert transport.value() == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert backend.transport.value() == b"a2 SELECT INBOX\r\n"
    assert transport.producerState == "producing"
    backend.dataReceived(b"* 3 EXISTS\r\na2 OK Select done\r\n")
    assert transport.value().endswith(b"* 3 EXISTS\r\na2 OK Select done\r\n")


def test_backend_refuses_then_client_retries() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice wrong\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING
                         + b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert transport.value() == b""  # the brute-force delay: 2 s for a first failure
    h.reactor.advance(2)
    assert transport.value() == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert closed(backend.transport)
    transport.clear()
    client.dataReceived(b"a2 NOOP\r\n")
    assert transport.value() == b"a2 OK NOOP completed\r\n"


def test_preauth_session_times_out_but_idle_session_survives_29_minutes() -> None:
    h = Harness(limits=Limits(preauth_timeout=60))
    idler, idler_transport, backend = h.logged_in_client()
    idler.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    waiting, waiting_transport = h.connect_client()
    h.advance(29 * 60)
    assert closed(waiting_transport)
    assert waiting_transport.value().endswith(b"* BYE Autologout; idle for too long\r\n")
    assert not closed(idler_transport)
    assert idler.relay is not None and idler.relay.tracker.idling
    # RFC 2177: the client re-issues IDLE after 29 minutes; then it lives on.
    idler.dataReceived(b"DONE\r\n")
    backend.dataReceived(b"i1 OK Idle completed\r\n")
    idler.dataReceived(b"i2 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    h.advance(29 * 60)
    assert not closed(idler_transport)


def test_idle_session_ends_after_idle_timeout_with_bye() -> None:
    h = Harness(timeouts=Timeouts(idle=31 * 60))
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    transport.clear()
    h.advance(30 * 60)
    assert not closed(transport)
    h.advance(2 * 60)
    assert closed(transport)
    assert transport.value() == b"* BYE Autologout; idle for too long\r\n"
    assert client.end_reason == "idle timeout"


def test_keepalive_lines_while_idling_at_the_interval() -> None:
    h = Harness(timeouts=Timeouts(idle_keepalive=120, sweep_interval=5))
    client, transport, backend = h.logged_in_client()
    transport.clear()
    h.advance(300, step=5)
    assert transport.value() == b""  # not idling: no keepalive
    client.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    transport.clear()
    h.advance(119, step=1)
    assert transport.value() == b""
    h.advance(1, step=1)
    assert transport.value() == b"* OK Still here\r\n"
    h.advance(240, step=1)
    assert transport.value() == b"* OK Still here\r\n" * 3


def test_backend_gone_mid_idle_gives_bye_at_once() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    transport.clear()
    backend.transport.loseConnection()
    assert transport.value() == b"* BYE [UNAVAILABLE] Backend closed the connection\r\n"
    assert closed(transport)


def test_backend_own_bye_is_not_doubled() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"z LOGOUT\r\n")
    backend.dataReceived(b"* BYE Logging out\r\nz OK Logout completed.\r\n")
    transport.clear()
    backend.transport.loseConnection()
    assert transport.value() == b""
    assert closed(transport)


def test_drain_idle_session_gets_done_logout_and_bye() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    transport.clear()
    backend.transport.clear()
    drained = h.registry.drain(timeout=30)
    assert backend.transport.value() == b"DONE\r\nPXYDRAIN LOGOUT\r\n"
    assert transport.value() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert closed(transport)
    client.connectionLost()
    assert drained.called


def test_drain_waits_for_append_in_flight() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"a5 APPEND INBOX {20}\r\n")
    backend.dataReceived(b"+ Ready for literal data\r\n")
    drained = h.registry.drain(timeout=30)
    assert not closed(transport)
    client.dataReceived(b"Subject: x\r\n\r\nhello")  # 20 bytes: the literal
    client.dataReceived(b"\r\n")
    assert b"a5 APPEND INBOX {20}\r\nSubject: x\r\n\r\nhello\r\n" in backend.transport.value()
    assert transport.producerState == "paused"  # no new command may start
    assert not closed(transport)
    transport.clear()
    backend.dataReceived(b"a5 OK [APPENDUID 1 7] Append completed.\r\n")
    assert transport.value() == (b"a5 OK [APPENDUID 1 7] Append completed.\r\n"
                                 b"* BYE [UNAVAILABLE] Shutting down\r\n")
    assert closed(transport)
    client.connectionLost()
    assert drained.called


def test_drain_timeout_closes_what_is_left() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"f1 FETCH 1:* BODY[]\r\n")
    drained = h.registry.drain(timeout=10)
    h.reactor.advance(9)
    assert not closed(transport) and not drained.called
    h.reactor.advance(1)
    assert closed(transport) and drained.called


def test_preauth_sessions_get_bye_on_drain_and_new_ones_are_refused() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    h.registry.drain(timeout=5)
    assert transport.value() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    late, late_transport = h.connect_client()
    assert late_transport.value() == b"* BYE [UNAVAILABLE] Shutting down\r\n"


# -- connection limits, the brute-force delay, loop protection (issue 7) ---------------------

REFUSED_NO = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"


def fail_login(h: Harness, client: object, tag: bytes, password: bytes,
               user: bytes = b"alice") -> None:
    """A LOGIN the fake backend refuses."""
    client.dataReceived(tag + b" LOGIN " + user + b" " + password + b"\r\n")  # type: ignore[attr-defined]
    if h.backends and not closed(h.backends[-1].transport) and h.backends[-1].dialogue:
        h.backends[-1].dataReceived(
            DOVECOT_GREETING + b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")


def test_connections_over_the_per_ip_limit_get_bye_and_the_listener_goes_on() -> None:
    h = Harness(limits=Limits(max_connections_per_ip=2))
    first, first_transport = h.connect_client("192.0.2.7")
    h.connect_client("192.0.2.7")
    extra, extra_transport = h.connect_client("192.0.2.7")
    assert extra_transport.value() == (b"* BYE [UNAVAILABLE] Too many connections from this "
                                       b"address, try again later\r\n")
    assert closed(extra_transport) and extra.session is None
    extra.connectionLost()
    _other, other_transport = h.connect_client("192.0.2.8")
    assert other_transport.value().startswith(b"* OK [CAPABILITY ")
    first.connectionLost()
    _again, again_transport = h.connect_client("192.0.2.7")
    assert again_transport.value().startswith(b"* OK [CAPABILITY ")
    assert h.shared.limiter.connections_from("192.0.2.7") == 2


def test_pop3_connections_over_the_total_get_err_sys_temp() -> None:
    h = Harness(protocol="pop3", routes="* 10.0.0.1:110\n", limits=Limits(max_connections=1))
    h.connect_client("192.0.2.7")
    _extra, transport = h.connect_client("192.0.2.9")
    assert transport.value() == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert closed(transport)


def refuse_new_backends(h: Harness, answered: set[int]) -> None:
    """Every backend connected since the last call refuses its login."""
    for backend in h.backends:
        if id(backend) not in answered and backend.dialogue is not None:
            answered.add(id(backend))
            backend.dataReceived(
                DOVECOT_GREETING + b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")


def test_the_penalty_is_paid_before_the_check_and_doubles() -> None:
    """Each check from a penalised address starts 2, 4, 8, 15 s after the previous one
    failed; failures are answered 2 s after their check; others are served meanwhile."""
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600))
    client, transport = h.connect_client()
    bystander, bystander_transport = h.connect_client("192.0.2.50")
    answered: set[int] = set()
    checks = []
    for i in range(6):
        tag = b"a%d" % i
        transport.clear()
        connected = len(h.backends)
        client.dataReceived(tag + b" LOGIN alice guess%d\r\n" % i)
        while len(h.backends) == connected:
            h.reactor.advance(0.5)
            bystander.dataReceived(b"n%d NOOP\r\n" % i)  # served at once meanwhile
            assert bystander_transport.value().endswith(b"n%d OK NOOP completed\r\n" % i)
        checks.append(h.reactor.seconds())
        refuse_new_backends(h, answered)
        h.reactor.advance(1.999)
        assert transport.value() == b""
        h.reactor.advance(0.001)
        assert transport.value() == tag + b" NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    gaps = [round(b - a) for a, b in zip(checks, checks[1:], strict=False)]
    assert gaps == [2, 4, 8, 15, 15]


def test_a_right_password_from_a_penalised_address_waits_like_a_wrong_one() -> None:
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600))
    client, transport = h.connect_client()
    answered: set[int] = set()
    for i in range(2):
        client.dataReceived(b"f%d LOGIN alice guess%d\r\n" % (i, i))
        h.reactor.advance(2)
        refuse_new_backends(h, answered)
        h.reactor.advance(2)
    transport.clear()
    connected = len(h.backends)
    client.dataReceived(b"a9 LOGIN alice secret\r\n")
    assert len(h.backends) == connected, "no backend sees it before the penalty is paid"
    h.reactor.advance(4)
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert transport.value() == b"a9 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    assert h.shared.penalty.penalty.failures("192.0.2.7", "alice") == (0, 0)


def test_the_same_wrong_password_again_is_not_counted_again() -> None:
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600))
    client, _transport = h.connect_client()
    answered: set[int] = set()
    for i, password in enumerate([b"old", b"old", b"old", b"new"]):
        client.dataReceived(b"t%d LOGIN alice %s\r\n" % (i, password))
        h.reactor.advance(15)
        refuse_new_backends(h, answered)
    assert h.shared.penalty.penalty.failures("192.0.2.7", "alice") == (2, 2)


def test_token_refusals_relay_the_challenge_and_count_once_per_token() -> None:
    """OAUTHBEARER end to end on the adapter: the backend's JSON error challenge reaches
    the client, the client's dummy response gets the NO; the same token retried is not a
    new guess for the penalty (its fingerprint is over the token), a new one is."""
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600),
                auth=AuthConfig(("PLAIN", "OAUTHBEARER")))
    client, transport = h.connect_client()
    assert b"AUTH=OAUTHBEARER" in transport.value()
    error = base64.b64encode(b'{"status":"invalid_token"}')
    for i, token in enumerate([b"old-token", b"old-token", b"new-token"]):
        message = base64.b64encode(b"n,a=alice,\x01auth=Bearer " + token + b"\x01\x01")
        transport.clear()
        connected = len(h.backends)
        client.dataReceived(b"t%d AUTHENTICATE OAUTHBEARER %s\r\n" % (i, message))
        h.reactor.advance(15)  # the penalty of the failures before
        assert len(h.backends) == connected + 1
        backend = h.backends[-1]
        backend.dataReceived(DOVECOT_GREETING)
        # after the ID: SASL-IR offered, so the message as it came (RFC 4959)
        assert backend.transport.value().endswith(b"\r\nP3 AUTHENTICATE OAUTHBEARER " + message
                                                  + b"\r\n")
        backend.dataReceived(b"+ " + error + b"\r\n")
        assert backend.transport.value().endswith(b"\r\nAQ==\r\n")  # RFC 7628 3.2.3
        backend.dataReceived(b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        h.reactor.advance(15)  # a failed guess is answered after login_delay
        assert transport.value() == b"+ " + error + b"\r\n"
        client.dataReceived(b"AQ==\r\n")
        assert transport.value().endswith(
            b"t%d NO [AUTHENTICATIONFAILED] Authentication failed\r\n" % i)
    assert h.shared.penalty.penalty.failures("192.0.2.7", "alice") == (2, 2)


def test_guesses_sent_in_parallel_reach_the_backend_one_at_a_time() -> None:
    h = Harness(limits=Limits(max_connections_per_ip=200, preauth_timeout=600))
    clients = [h.connect_client() for _ in range(30)]
    for i, (client, _transport) in enumerate(clients):
        client.dataReceived(b"a LOGIN alice guess%d\r\n" % i)
    assert len(h.backends) == 4  # an address without failures: 4 checks at once
    answered: set[int] = set()
    reached = []
    for _ in range(60 * 10):
        refuse_new_backends(h, answered)
        reached.append(len(h.backends))
        h.reactor.advance(0.1)
    assert reached[-1] <= 4 + 5, reached[-1]  # then 2, 4, 8, 15, 15 s apart


def test_a_client_that_goes_away_while_it_waits_frees_its_place_at_once() -> None:
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600))
    client, _transport = h.connect_client()
    answered: set[int] = set()
    client.dataReceived(b"a1 LOGIN alice guess\r\n")
    refuse_new_backends(h, answered)
    h.reactor.advance(1)
    waiting, _waiting_transport = h.connect_client()
    waiting.dataReceived(b"a2 LOGIN alice guess2\r\n")
    assert h.shared.penalty.penalty.waiting == 1
    assert h.shared.limiter.connections_from("192.0.2.7") == 2
    waiting.connectionLost()
    assert h.shared.penalty.penalty.waiting == 0
    assert h.shared.limiter.connections_from("192.0.2.7") == 1


def test_the_owner_elsewhere_gets_in_at_once_while_the_account_is_attacked() -> None:
    h = Harness(limits=Limits(max_failed_logins=10, preauth_timeout=600))
    owner, owner_transport = h.connect_client("198.51.100.20")
    owner.dataReceived(b"o1 LOGIN alice secret\r\n")
    h.backends[-1].dataReceived(DOVECOT_GREETING + b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert owner_transport.value().endswith(b"o1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    owner.connectionLost()
    answered: set[int] = set()
    for i in range(6):  # guesses from six addresses
        attacker, _t = h.connect_client(f"203.0.113.{i}")
        attacker.dataReceived(b"g LOGIN alice guess%d\r\n" % i)
        h.reactor.advance(20)
        refuse_new_backends(h, answered)
    assert h.shared.penalty.penalty.failures("203.0.113.0", "alice")[1] >= 4
    owner, owner_transport = h.connect_client("198.51.100.20")
    owner_transport.clear()
    connected = len(h.backends)
    owner.dataReceived(b"o2 LOGIN alice secret\r\n")
    assert len(h.backends) == connected + 1, "checked at once"


@pytest.mark.parametrize("name", [b'"' + b"a" * 321 + b'"', b'"a\x01b"', b'""',
                                  b"{2+}\r\n\xff\xfe"])
def test_names_no_mailbox_can_have_are_failed_logins_without_a_lookup(name: bytes) -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN " + name + b" pw\r\n")
    assert not h.backends
    h.reactor.advance(2)
    assert transport.value() == REFUSED_NO
    assert h.shared.penalty.penalty.failures("192.0.2.7", "x") == (1, 0)


def test_unknown_user_is_answered_like_a_wrong_password_at_the_same_time() -> None:
    h = Harness(routes="alice 10.0.0.1:143\n")
    known, known_transport = h.connect_client("192.0.2.1")
    unknown, unknown_transport = h.connect_client("192.0.2.2")
    known_transport.clear()
    unknown_transport.clear()
    fail_login(h, known, b"a1", b"wrong")
    unknown.dataReceived(b"a1 LOGIN nobody wrong\r\n")  # the directory says no at once
    h.reactor.advance(1.999)
    assert known_transport.value() == unknown_transport.value() == b""
    h.reactor.advance(0.001)
    assert known_transport.value() == unknown_transport.value() == REFUSED_NO


def test_the_delay_counts_from_the_start_of_the_login() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice wrong\r\n")
    h.reactor.advance(1.5)  # a slow backend
    h.backends[-1].dataReceived(DOVECOT_GREETING + b"P3 NO Authentication failed.\r\n")
    h.reactor.advance(0.499)
    assert transport.value() == b""
    h.reactor.advance(0.001)
    assert transport.value() == REFUSED_NO


def test_backend_down_is_not_a_guess_and_not_delayed() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    h.backends[-1].transport.loseConnection()  # gone before its greeting
    assert transport.value() == (b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try "
                                 b"again later\r\n")


def test_client_gone_during_the_delay_cancels_the_answer() -> None:
    h = Harness()
    client, transport = h.connect_client()
    fail_login(h, client, b"a1", b"wrong")
    assert h.reactor.getDelayedCalls()
    client.connectionLost()
    assert all(not call.active() or call.func != client._login_failed
               for call in h.reactor.getDelayedCalls())
    h.reactor.advance(5)  # nothing is written to the gone client, nothing raises


def test_commands_pipelined_behind_a_failed_login_wait_for_its_answer() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice wrong\r\na2 NOOP\r\n")
    h.backends[-1].dataReceived(DOVECOT_GREETING + b"P3 NO Authentication failed.\r\n")
    assert transport.value() == b""
    h.reactor.advance(2)
    assert transport.value() == REFUSED_NO + b"a2 OK NOOP completed\r\n"


def test_sessions_over_the_per_user_ip_limit_are_refused_after_login() -> None:
    h = Harness(limits=Limits(max_connections_per_user_ip=1))
    h.logged_in_client()
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert transport.value() == (b"a1 NO [UNAVAILABLE] Too many connections for this user "
                                 b"from this address\r\n")
    assert closed(backend.transport) and client.relay is None
    _bob, bob_transport, _backend = h.logged_in_client(b"bob")  # others are not affected


def test_a_route_to_our_own_listener_is_refused_without_dialling() -> None:
    h = Harness(routes="* 127.0.0.1:1143\n")  # the Harness listener itself
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert h.backends == []
    assert transport.value().startswith(b"a1 NO [UNAVAILABLE] ")


def test_a_name_that_leads_back_to_our_own_listener_is_refused_once_connected() -> None:
    h = Harness(routes="* proxy.example.org:1143\n")
    h.runtime.connector.endpoint_factory = lambda host, port: FakeEndpoint(
        h.reactor, "127.0.0.1", port, h.backends)  # the name resolves to ourselves
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert len(h.backends) == 1 and closed(h.backends[0].transport)
    assert transport.value().startswith(b"a1 NO [UNAVAILABLE] ")


def test_a_backend_that_drops_the_login_refuses_it_and_is_not_marked_down() -> None:
    """Dovecot closes the connection on a name it finds too long: the client sent that,
    so it is a refused login, not a backend failure (no failover, no circuit breaker)."""
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    with capturedLogs() as events:
        client.dataReceived(b"a1 LOGIN alice secret\r\n")
        backend = h.backends[-1]
        backend.dataReceived(DOVECOT_GREETING)  # the proxy sends LOGIN now
        backend.transport.loseConnection()
        h.reactor.advance(2)
    assert transport.value() == REFUSED_NO
    assert h.shared.breaker.down() == []
    assert not [e for e in events if "unavailable for" in formatEvent(e)]


def test_a_backend_gone_before_the_login_is_a_backend_failure_with_its_reason() -> None:
    h = Harness()
    client, transport = h.connect_client()
    with capturedLogs() as events:
        client.dataReceived(b"a1 LOGIN alice secret\r\n")
        h.backends[-1].transport.loseConnection()  # before its greeting
    assert [s.host for s in h.shared.breaker.down()] == ["10.0.0.1"]
    lines = [formatEvent(e) for e in events if "unavailable for" in formatEvent(e)]
    assert lines and lines[0].endswith(": closed the connection during the login")


# -- ManageSieve (RFC 5804, issue 15) ---------------------------------------------------------

SIEVE_BACKEND_GREETING = (b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n'
                          b'"SIEVE" "fileinto vacation"\r\n"SASL" "PLAIN"\r\nOK "ready"\r\n')


def test_managesieve_login_at_the_backends_default_port_then_relay_and_kick() -> None:
    from base64 import b64encode

    h = Harness(protocol="managesieve", routes="* 10.0.0.1\n")
    client, transport = h.connect_client()
    assert transport.value().endswith(b'OK "ManageSieve proxy ready"\r\n')
    assert b'"SIEVE" "fileinto envelope encoded-character"' in transport.value()
    transport.clear()
    token = b64encode(b"\0alice\0secret")
    client.dataReceived(b'AUTHENTICATE "PLAIN" "' + token + b'"\r\nLISTSCRIPTS\r\n')
    backend = h.backends[-1]
    assert h.reactor.tcpClients == [] and backend.server.port is None
    assert backend.transport.getPeer().port == 4190  # [backend] managesieve_port
    backend.dataReceived(SIEVE_BACKEND_GREETING)
    assert backend.transport.value() == b'AUTHENTICATE "PLAIN" "' + token + b'"\r\n'
    backend.transport.clear()
    backend.dataReceived(b'OK "Logged in."\r\n')
    assert transport.value() == b'OK "Logged in"\r\n'
    # the pipelined command went on to the backend, and the answer comes back
    assert backend.transport.value() == b"LISTSCRIPTS\r\n"
    backend.dataReceived(b'OK "Listscripts completed."\r\n')
    assert transport.value().endswith(b'OK "Listscripts completed."\r\n')
    # the next client's greeting has the backend's SIEVE list
    _second, second_transport = h.connect_client("192.0.2.8")
    assert b'"SIEVE" "fileinto vacation"' in second_transport.value()
    # a kick between commands: LOGOUT to the backend, BYE to the client, closed
    transport.clear()
    backend.transport.clear()
    client.drain()
    assert backend.transport.value() == b"LOGOUT\r\n"
    assert transport.value() == b'BYE (TRYLATER) "Server shutting down"\r\n'
    assert closed(transport)


def test_managesieve_connections_over_the_total_get_bye_trylater() -> None:
    h = Harness(protocol="managesieve", limits=Limits(max_connections=1))
    h.connect_client("192.0.2.7")
    _extra, transport = h.connect_client("192.0.2.9")
    assert transport.value() == b'BYE (TRYLATER) "Too many connections, try again later"\r\n'
    assert closed(transport)


def test_managesieve_offers_the_auth_mechanisms_and_relays_a_token_refusal() -> None:
    """new_session gives ManageSieve [auth] mechanisms too: the SASL line lists them; a
    token goes on as the initial response; the backend's error challenge reaches the
    client as a string (RFC 5804 2.1, RFC 7628 3.2.2), the dummy response gets the NO."""
    h = Harness(protocol="managesieve", routes="* 10.0.0.1\n",
                limits=Limits(max_failed_logins=10, preauth_timeout=600),
                auth=AuthConfig(("PLAIN", "OAUTHBEARER")))
    client, transport = h.connect_client()
    assert b'"SASL" "PLAIN OAUTHBEARER"\r\n' in transport.value()
    transport.clear()
    message = base64.b64encode(b"n,a=alice,\x01auth=Bearer ya29.tok\x01\x01")
    error = base64.b64encode(b'{"status":"invalid_token"}')
    with capturedLogs() as events:
        client.dataReceived(b'AUTHENTICATE "OAUTHBEARER" "' + message + b'"\r\n')
        backend = h.backends[-1]
        backend.dataReceived(SIEVE_BACKEND_GREETING)
        assert backend.transport.value() == (b'AUTHENTICATE "OAUTHBEARER" "' + message
                                             + b'"\r\n')
        backend.transport.clear()
        backend.dataReceived(b'"' + error + b'"\r\n')
        assert backend.transport.value() == b'"AQ=="\r\n'  # RFC 7628 3.2.3
        backend.dataReceived(b'NO "Authentication failed."\r\n')
        h.reactor.advance(15)  # a failed guess is answered after login_delay
        assert transport.value() == b'"' + error + b'"\r\n'
        client.dataReceived(b'"AQ=="\r\n')
        assert transport.value().endswith(b'NO "Authentication failed"\r\n')
    lines = [formatEvent(e) for e in events]
    assert any("user=<alice> reason=TokenRefused" in line for line in lines), lines
    assert not [line for line in lines if "ya29" in line or message.decode() in line]


def test_a_login_walks_a_short_one_way_path() -> None:
    """Issue 14: from the client's bytes to the backend's LOGIN, no call chain is deeper
    than about 12 of our functions, and none re-enters a module it has left (an object's
    inherited methods count as its own class's: a session's base in prelogin.py)."""
    import sys

    deepest: list[str] = []
    reentered: list[list[str]] = []
    stack: list[tuple[str, str, object]] = []

    def owner(frame: Any) -> str:
        self = frame.f_locals.get("self")
        if self is not None and type(self).__module__.startswith("imapproxy."):
            return type(self).__module__
        return frame.f_globals.get("__name__", "")

    def profile(frame: Any, event: str, _arg: object) -> None:
        if event == "call" and frame.f_globals.get("__name__", "").startswith("imapproxy."):
            stack.append((owner(frame), frame.f_code.co_qualname, frame))
            runs = [m for i, (m, _, _) in enumerate(stack) if i == 0 or stack[i - 1][0] != m]
            if len(runs) != len(set(runs)):
                reentered.append([f"{m}.{f}" for m, f, _ in stack])
            if len(stack) > len(deepest):
                deepest[:] = [f"{m}.{f}" for m, f, _ in stack]
        elif event == "return" and stack and stack[-1][2] is frame:
            stack.pop()

    h = Harness()
    client, _transport = h.connect_client()
    sys.setprofile(profile)
    try:
        client.dataReceived(b"a1 LOGIN alice secret\r\n")
        backend = h.backends[-1]
        backend.dataReceived(DOVECOT_GREETING)
    finally:
        sys.setprofile(None)
    assert b"P3 LOGIN \"alice\" \"secret\"\r\n" in backend.transport.value()
    assert 3 <= len(deepest) <= 12, deepest
    assert reentered == [], reentered[:3]


# -- admission pacing: a storm at the rate the backends take (pacing.py) -----------------------


def pacing(**limits: object) -> Harness:
    """A harness pacing logins; the penalty lets a storm from one address through."""
    return Harness(limits=Limits(max_parallel_logins_per_ip=1000, **limits))  # type: ignore[arg-type]


def test_a_storm_is_dialled_at_the_rate_the_rest_wait_or_are_told_to_come_back() -> None:
    h = pacing(max_login_rate=2.0, max_login_queue=2)
    clients = [h.connect_client() for _ in range(5)]
    for i, (client, transport) in enumerate(clients):
        transport.clear()
        client.dataReceived(b"a%d LOGIN user%d secret\r\n" % (i, i))
    assert len(h.backends) == 2, "one second's worth at once"
    assert h.shared.pacer.waiting == 2
    # The fifth is refused at once, unchecked, and may try again on the same connection.
    assert clients[4][1].value() == (
        b"a4 NO [UNAVAILABLE] Too many logins at once, try again later\r\n")
    assert [t.value() for _c, t in clients[2:4]] == [b"", b""]
    h.reactor.advance(0.5)
    assert len(h.backends) == 3
    h.reactor.advance(0.5)
    assert len(h.backends) == 4 and h.shared.pacer.waiting == 0
    for backend in h.backends:
        backend.dataReceived(DOVECOT_GREETING + b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert all(t.value().startswith(b"a%d OK" % i) for i, (_c, t) in enumerate(clients[:4]))


def test_pop3_and_managesieve_say_come_back_later_in_their_own_words() -> None:
    for protocol, command, refusal in (
            ("pop3", b"USER alice\r\nPASS secret\r\n",
             b"-ERR [SYS/TEMP] Too many logins at once, try again later\r\n"),
            ("managesieve",
             b'AUTHENTICATE "PLAIN" "' + base64.b64encode(b"\0alice\0secret") + b'"\r\n',
             b'NO (TRYLATER) "Too many logins at once, try again later"\r\n')):
        h = Harness(protocol=protocol, routes="* 10.0.0.1\n",
                    limits=Limits(max_login_rate=1.0, max_login_queue=1))
        for _ in range(2):
            client, _transport = h.connect_client()
            client.dataReceived(command)
        client, transport = h.connect_client()
        transport.clear()
        client.dataReceived(command)
        assert transport.value().endswith(refusal), protocol


def test_a_client_gone_while_queued_leaves_the_line_and_gives_its_penalty_slot_back() -> None:
    h = Harness(limits=Limits(max_login_rate=1.0, max_login_queue=5,
                              max_parallel_logins_per_ip=1))
    first, _ = h.connect_client()
    first.dataReceived(b"a1 LOGIN alice secret\r\n")  # the one turn of the bucket
    h.backends[-1].dataReceived(DOVECOT_GREETING
                                + b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    waiting, _ = h.connect_client()
    waiting.dataReceived(b"a1 LOGIN bob secret\r\n")  # admitted by the penalty, then queued
    behind, _ = h.connect_client()
    behind.dataReceived(b"a1 LOGIN carol secret\r\n")  # waits for the address's one slot
    gate = h.shared.penalty.penalty
    assert (h.shared.pacer.waiting, gate.waiting) == (1, 1)
    waiting.connectionLost()
    # Its place in the line at once, and the penalty admission it held (finished as
    # nothing learnt): the next login from the address is admitted, and queues in turn.
    assert (h.shared.pacer.waiting, gate.waiting) == (1, 0)
    assert gate.failures("192.0.2.7", "bob") == (0, 0)
    h.reactor.advance(1.0)
    assert h.shared.pacer.waiting == 0 and len(h.backends) == 2


def test_a_queued_login_whose_preauth_time_runs_out_leaves_the_line_at_once() -> None:
    """The pre-login timeout bounds the wait: BYE, and out of the line when it is said,
    not when the client has read it and gone (it may never)."""
    h = pacing(max_login_rate=0.1, max_login_queue=5, preauth_timeout=5.0)
    first, _ = h.connect_client()
    first.dataReceived(b"a1 LOGIN alice secret\r\n")
    protocol = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.8", 40001))
    protocol.makeConnection(transport)  # a transport that never reports the close
    protocol.dataReceived(b"a1 LOGIN bob secret\r\n")
    assert h.shared.pacer.waiting == 1
    h.reactor.advance(5.0)
    assert transport.value().endswith(b"* BYE Autologout; idle for too long\r\n")
    assert h.shared.pacer.waiting == 0
    assert h.shared.penalty.penalty.waiting == 0
    h.reactor.advance(10.0)
    assert len(h.backends) == 1, "nobody was dialled for it"


def test_a_drain_sends_queued_logins_away_and_empties_the_line() -> None:
    h = pacing(max_login_rate=1.0, max_login_queue=5)
    first, _ = h.connect_client()
    first.dataReceived(b"a1 LOGIN alice secret\r\n")
    queued = [h.connect_client() for _ in range(3)]
    for client, _transport in queued:
        client.dataReceived(b"a1 LOGIN bob secret\r\n")
    assert h.shared.pacer.waiting == 3
    h.registry.drain(timeout=30)
    assert h.shared.pacer.waiting == 0
    assert all(b"* BYE [UNAVAILABLE]" in t.value() for _c, t in queued)
    h.reactor.advance(10.0)
    assert len(h.backends) == 1


def test_the_refusal_and_the_wait_are_logged_like_the_other_limits() -> None:
    h = pacing(max_login_rate=1.0, max_login_queue=1)
    with capturedLogs() as events:
        for user in (b"alice", b"bob", b"carol"):
            client, _ = h.connect_client()
            client.dataReceived(b"a1 LOGIN " + user + b" secret\r\n")
        h.reactor.advance(1.0)
    lines = [formatEvent(e) for e in events]
    assert [re.sub(r"id=\d+", "id=N", line) for line in lines if "carol" in line] == [
        "login refused id=N client=192.0.2.7 user=<carol> "
        "reason=too many logins waiting for their turn"]
    assert [re.sub(r"id=\d+", "id=N", line) for line in lines
            if line.startswith("login paced")] == [
        "login paced id=N client=192.0.2.7 user=<bob> waited=1.000s"]


# -- the session counted on every instance ([shared], redisstate.py) -----------------------


class FakeSessions:
    """RedisState as the frontend uses it: claim() answers, release() is noted."""

    def __init__(self, over: bool = False, later: bool = False) -> None:
        self.over = over
        self.later = later
        self.claimed: list[tuple[str, str, int]] = []
        self.released: list[object] = []
        self.pending: list[defer.Deferred[object]] = []

    def claim(self, user: str, client: str, limit: int) -> defer.Deferred[object]:
        self.claimed.append((user, client, limit))
        answer = None if self.over else ("claim", len(self.claimed))
        if self.later:
            d: defer.Deferred[object] = defer.Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: answer)
            return d
        return defer.succeed(answer)

    def release(self, claim: object) -> None:
        self.released.append(claim)


def shared_harness(sessions: FakeSessions) -> Harness:
    h = Harness()
    url = "redis://127.0.0.1"
    config = dataclasses.replace(h.config, shared=SharedConfig(redis=url,
                                                               url=parse_redis_url(url)))
    h.shared = dataclasses.replace(h.shared, state=sessions)
    h.current.runtime = dataclasses.replace(h.runtime, config=config, shared=h.shared)
    return h


def test_a_shared_session_is_claimed_at_login_and_released_at_the_end() -> None:
    sessions = FakeSessions()
    h = shared_harness(sessions)
    client, _transport, _backend = h.logged_in_client()
    assert sessions.claimed == [("alice", "192.0.2.7", 20)]
    client.connectionLost()
    assert sessions.released == [("claim", 1)]


def test_over_the_shared_limit_the_login_is_refused_and_not_counted() -> None:
    sessions = FakeSessions(over=True)
    h = shared_harness(sessions)
    client, transport = h.connect_client()
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert b"a1 NO [UNAVAILABLE] Too many connections for this user from this address" \
        in transport.value()
    assert h.shared.limiter.sessions_of("alice", "192.0.2.7") == 0
    client.connectionLost()
    assert sessions.released == []


def test_a_client_gone_while_its_session_is_counted_is_released() -> None:
    sessions = FakeSessions(later=True)
    h = shared_harness(sessions)
    client, _transport = h.connect_client()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert sessions.claimed and sessions.pending
    client.connectionLost()
    sessions.pending[0].callback(None)
    assert sessions.released == [("claim", 1)]


def test_a_client_gone_during_the_backend_login_leaves_no_backend_behind() -> None:
    """The client disconnects while the backend is still answering our LOGIN: the
    backend's connection is closed once logged in, and nothing else breaks."""
    h = Harness()
    client, _transport = h.connect_client()
    with capturedLogs() as events:
        client.dataReceived(b"a1 LOGIN alice secret\r\n")
        backend = h.backends[-1]
        backend.dataReceived(DOVECOT_GREETING)
        client.connectionLost()
        backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert closed(backend.transport)
    lines = [formatEvent(e) for e in events]
    assert not [line for line in lines if "unexpected error" in line], lines
    assert client.relay is None and client not in h.registry.sessions
    # The address's penalty lane is free again: a new login goes straight through.
    again, again_transport, _ = h.logged_in_client()
    assert again.relay is not None and not closed(again_transport)

"""The Twisted adapters on a MemoryReactorClock: timeouts, relay, BYE, drain. No sleeps."""

from __future__ import annotations

from helpers import DOVECOT_GREETING, Harness

from imapproxy.config import Limits, Timeouts


def closed(transport: object) -> bool:
    """The proxy closed (or started closing) this in-memory connection."""
    return bool(getattr(transport, "disconnecting", False) or not transport.connected)


def test_greeting_and_login_relay_with_pipelined_bytes_in_order() -> None:
    h = Harness()
    client, transport = h.connect_client()
    assert transport.value().startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    transport.clear()
    client.dataReceived(b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
    assert transport.producerState == "paused"  # held back while logging in
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
    backend.dataReceived(DOVECOT_GREETING + b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
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
    assert not closed(transport)
    h.reactor.advance(1)
    assert closed(transport)


def test_preauth_sessions_get_bye_on_drain_and_new_ones_are_refused() -> None:
    h = Harness()
    client, transport = h.connect_client()
    transport.clear()
    h.registry.drain(timeout=5)
    assert transport.value() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    late, late_transport = h.connect_client()
    assert late_transport.value() == b"* BYE [UNAVAILABLE] Shutting down\r\n"

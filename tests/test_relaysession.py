"""RelaySession: the policy of a relayed session, fed real IMAP/POP3 bytes. No reactor:
time is a float passed in, and the answers are actions (actions.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.actions import Close, Log, PauseClient, SendToBackend, SendToClient
from imapproxy.config import Timeouts
from imapproxy.imapwire import BYE_BACKEND_GONE, BYE_SHUTDOWN, BYE_TIMEOUT, STILL_HERE
from imapproxy.relaysession import DRAIN_TAG, NOTHING, POP3_LINES, RelaySession

LOGOUT = SendToBackend(DRAIN_TAG + b" LOGOUT\r\n")
DONE = SendToBackend(b"DONE\r\n")
#: idle shorter than authenticated, so that which one applied shows
T = Timeouts(authenticated=1800.0, idle=600.0, idle_keepalive=120.0)
NO_KEEPALIVE = Timeouts(authenticated=1800.0, idle=600.0, idle_keepalive=0.0)


def imap(now: float = 0.0) -> RelaySession:
    return RelaySession("imap", now=now)


def idling(now: float = 0.0) -> RelaySession:
    """A session in IDLE, confirmed by the server's "+" (RFC 2177)."""
    s = imap(now)
    assert s.from_client(b"i1 IDLE\r\n", now) is NOTHING
    assert s.from_server(b"+ idling\r\n", now) is NOTHING
    assert s.tracker.idling
    return s


def sent_to_client(actions: object) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendToClient)]


def sent_to_backend(actions: object) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendToBackend)]


# -- the hot path ---------------------------------------------------------------------------


def test_bytes_passing_while_nothing_is_decided_answer_the_shared_empty_tuple() -> None:
    s = imap()
    # The relay's hot path: no allocation, the one shared tuple every time.
    assert s.from_client(b"a1 SELECT INBOX\r\n", 1.0) is NOTHING
    assert s.from_server(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\na1 OK [READ-WRITE] done\r\n",
                         2.0) is NOTHING
    assert s.from_client(b"a2 APPEND INBOX {5+}\r\nhel", 3.0) is NOTHING
    assert s.from_client(b"lo\r\n", 3.5) is NOTHING
    assert s.from_server(b"* 1 FETCH (BODY[] {3}\r\nab", 4.0) is NOTHING
    assert s.from_server(b"c)\r\na2 OK done\r\n", 5.0) is NOTHING
    assert NOTHING == ()
    assert s.tick(6.0, T) == []


# -- tick(): timeouts -----------------------------------------------------------------------


def test_inactivity_timeout_outside_idle_says_bye_logs_out_and_closes() -> None:
    s = imap()
    s.from_client(b"a1 NOOP\r\n", 10.0)
    s.from_server(b"a1 OK NOOP completed\r\n", 10.0)
    assert s.tick(10.0 + 1799.9, T) == []
    assert s.tick(10.0 + 1800.0, T) == [SendToClient(BYE_TIMEOUT), LOGOUT,
                                         Close("inactivity timeout")]
    assert s.detached and s.logout_sent


def test_the_server_talking_does_not_keep_an_inactive_client_alive() -> None:
    s = imap()
    s.from_client(b"a1 SELECT INBOX\r\n", 0.0)
    s.from_server(b"a1 OK done\r\n", 1.0)
    for minute in range(1, 30):
        s.from_server(b"* %d EXISTS\r\n" % minute, minute * 60.0)
    # Only the client's own bytes count as activity ([timeouts] authenticated).
    assert s.tick(1800.0, T)[-1] == Close("inactivity timeout")


@pytest.mark.parametrize("partial", [
    b"* 1 FETCH (FLAGS (\\Seen",  # inside a line
    b"* 1 FETCH (BODY[] {100}\r\n0123456789",  # inside a literal
    b"* 1 FETCH (BODY[] {3}\r\nabc",  # after a literal, the response goes on
], ids=["mid-line", "mid-literal", "after-literal"])
def test_timeout_mid_response_closes_without_a_bye(partial: bytes) -> None:
    s = imap()
    s.from_client(b"a1 FETCH 1 (FLAGS BODY[])\r\n", 0.0)
    s.from_server(partial, 1.0)
    # A BYE here would land inside the server's response and corrupt it for the client.
    assert s.tick(1800.0, T) == [LOGOUT, Close("inactivity timeout")]


def test_idle_timeout_in_idle_after_the_servers_continuation() -> None:
    s = idling()
    assert s.tick(599.0, NO_KEEPALIVE) == []
    actions = s.tick(600.0, NO_KEEPALIVE)
    assert actions[0] == SendToClient(BYE_TIMEOUT)
    assert actions[-1] == Close("idle timeout")
    assert sent_to_client(actions) == [BYE_TIMEOUT]
    assert LOGOUT.data in sent_to_backend(actions)


def test_idle_not_yet_confirmed_by_the_server_is_not_idling() -> None:
    s = imap()
    s.from_client(b"i1 IDLE\r\n", 0.0)
    # No "+" yet: the [timeouts] idle limit does not apply, the authenticated one does.
    assert s.tick(600.0, T) == []
    assert s.tick(1800.0, T)[-1] == Close("inactivity timeout")


def test_idle_timeout_with_the_server_mid_response_sends_no_bye() -> None:
    s = idling()
    s.from_server(b"* 4 EXI", 10.0)
    actions = s.tick(600.0, T)
    assert sent_to_client(actions) == []
    assert actions[-1] == Close("idle timeout")


def test_idle_timeout_ends_idle_with_done_before_the_logout() -> None:
    s = idling()
    assert sent_to_backend(s.tick(600.0, T)) == [DONE.data, LOGOUT.data]


# -- tick(): keepalives ---------------------------------------------------------------------


def test_keepalive_to_an_idling_client_when_the_server_was_silent_that_long() -> None:
    s = idling()
    assert s.tick(119.0, T) == []
    assert s.tick(120.0, T) == [SendToClient(STILL_HERE)]
    # Our keepalive counts as the server speaking: the next one is a full interval later.
    assert s.tick(121.0, T) == []
    assert s.tick(239.0, T) == []
    assert s.tick(240.0, T) == [SendToClient(STILL_HERE)]


def test_the_servers_own_lines_reset_the_keepalive_clock() -> None:
    s = idling()
    assert s.from_server(b"* 4 EXISTS\r\n", 100.0) is NOTHING
    assert s.tick(200.0, T) == []
    assert s.tick(220.0, T) == [SendToClient(STILL_HERE)]


def test_no_keepalive_mid_response() -> None:
    s = idling()
    s.from_server(b"* 4 FETCH (FLAGS", 1.0)
    # Silent since, but inside a line: a keepalive would split it.
    assert s.tick(300.0, T) == []
    s.from_server(b" (\\Seen))\r\n", 301.0)
    assert s.tick(421.0, T) == [SendToClient(STILL_HERE)]


def test_no_keepalive_when_off_or_not_idling() -> None:
    assert idling().tick(500.0, NO_KEEPALIVE) == []
    s = imap()
    s.from_client(b"a1 NOOP\r\n", 0.0)
    s.from_server(b"a1 OK done\r\n", 0.0)
    assert s.tick(500.0, T) == []
    # After DONE the session is no longer idling: no keepalive either.
    s = idling()
    s.from_client(b"DONE\r\n", 1.0)
    s.from_server(b"i1 OK Idle completed\r\n", 1.0)
    assert s.tick(500.0, T) == []


# -- backend_lost() -------------------------------------------------------------------------


def test_backend_lost_tells_the_client_at_once() -> None:
    s = idling()
    # RFC 5530 [UNAVAILABLE]: the client reconnects instead of waiting on a dead session.
    assert s.backend_lost() == [SendToClient(BYE_BACKEND_GONE), Close("backend closed")]


def test_backend_lost_after_the_clients_logout_is_the_normal_end() -> None:
    s = imap()
    s.from_client(b"a9 LOGOUT\r\n", 0.0)
    s.from_server(b"* BYE Logging out\r\na9 OK Logout completed.\r\n", 0.0)
    assert s.backend_lost() == [Close("logout")]
    s = imap()
    s.from_client(b"a9 LOGOUT\r\n", 0.0)  # even before the server answered
    assert s.backend_lost() == [Close("logout")]


def test_backend_lost_after_the_servers_own_bye_adds_none() -> None:
    s = imap()
    s.from_server(b"* BYE Server shutting down\r\n", 0.0)
    assert s.backend_lost() == [Close("backend closed")]


def test_backend_lost_mid_response_adds_no_bye() -> None:
    s = imap()
    s.from_client(b"a1 FETCH 1 BODY[]\r\n", 0.0)
    s.from_server(b"* 1 FETCH (BODY[] {10}\r\nabc", 0.0)
    assert s.backend_lost() == [Close("backend closed")]


def test_backend_lost_after_the_session_ended_adds_no_bye() -> None:
    s = imap()
    s.end("kicked")
    assert s.backend_lost() == [Close("backend closed")]


# -- end() ----------------------------------------------------------------------------------


def test_end_logs_out_once_and_closes_with_the_reason() -> None:
    s = imap()
    assert s.end("kicked") == [LOGOUT, Close("kicked")]
    assert s.detached and s.logout_sent
    assert s.end("again") == [Close("again")]


# -- drain() --------------------------------------------------------------------------------


def test_drain_in_idle_ends_idle_then_logs_out_and_says_bye() -> None:
    s = idling()
    assert s.drain() == [PauseClient(), DONE, LOGOUT, SendToClient(BYE_SHUTDOWN),
                         Close("shutdown")]
    assert s.detached
    assert s.drain() == []


def test_drain_of_a_quiet_session_ends_it_at_once() -> None:
    s = imap()
    s.from_client(b"a1 NOOP\r\n", 0.0)
    s.from_server(b"a1 OK NOOP completed\r\n", 0.0)
    assert s.drain() == [PauseClient(), LOGOUT, SendToClient(BYE_SHUTDOWN), Close("shutdown")]
    assert s.drain() == []


def test_drain_waits_for_an_append_whose_literal_is_partly_sent() -> None:
    s = imap()
    s.from_client(b"a2 APPEND INBOX {10}\r\n", 0.0)
    s.from_server(b"+ Ready for literal data\r\n", 0.0)
    s.from_client(b"12345", 0.0)
    # Mid-literal: not even the client may be paused (the rest of the message must come).
    assert s.drain() == []
    assert s.from_client(b"67890\r\n", 1.0) == [PauseClient()]
    assert not s.from_server(b"* 5 EXISTS\r\n", 1.5)
    assert s.from_server(b"a2 OK [APPENDUID 1 5] Append completed.\r\n", 2.0) == [
        LOGOUT, SendToClient(BYE_SHUTDOWN), Close("shutdown")]
    assert s.drain() == []


def test_drain_waits_for_a_streaming_fetch() -> None:
    s = imap()
    s.from_client(b"a3 FETCH 1 BODY[]\r\n", 0.0)
    s.from_server(b"* 1 FETCH (BODY[] {20}\r\n0123456789", 0.0)
    assert s.drain() == [PauseClient()]
    # Inside the literal: bytes that look like a tagged reply are the message.
    assert not s.from_server(b"a3 OK x\r\n", 1.0)
    assert not s.from_server(b"9)\r\n", 1.0)
    assert s.from_server(b"a3 OK Fetch completed.\r\n", 2.0) == [
        LOGOUT, SendToClient(BYE_SHUTDOWN), Close("shutdown")]


def test_after_the_session_is_detached_nothing_more_is_said() -> None:
    s = idling()
    s.drain()
    assert not s.from_server(b"i1 OK Idle completed\r\n", 1.0)
    assert not s.from_server(b"* BYE Logging out\r\nPXYDRAIN OK Logout completed.\r\n", 1.0)
    assert not s.from_client(b"a5 NOOP\r\n", 1.0)
    assert s.drain() == []
    assert s.backend_lost() == [Close("backend closed")]
    assert s.end("drain timeout") == [Close("drain timeout")]


def test_after_the_drain_bye_a_tick_says_nothing_to_the_client() -> None:
    s = idling()
    s.drain()
    assert sent_to_client(s.tick(300.0, T)) == []


SERVER_STREAM = (
    b"* 1 FETCH (BODY[] {26}\r\n"
    # literal bytes that look like a tagged reply and a BYE: the message, not the protocol
    + b"a3 OK no\r\n* BYE no\r\n\r\nxx"
    + b" FLAGS (\\Seen))\r\n* 2 EXISTS\r\na3 OK Fetch completed.\r\n")
DRAINED = [PauseClient(), LOGOUT, SendToClient(BYE_SHUTDOWN), Close("shutdown")]


@given(cuts=st.lists(st.integers(min_value=1, max_value=len(SERVER_STREAM) - 1), unique=True),
       drain_at=st.integers(min_value=0, max_value=len(SERVER_STREAM)))
def test_any_split_of_the_servers_stream_drains_the_same(cuts: list[int], drain_at: int) -> None:
    """Whatever the chunks and wherever the drain falls among them, the session ends
    once, after the tagged completion's last byte and never before."""
    s = imap()
    s.from_client(b"a3 FETCH 1 BODY[]\r\n", 0.0)
    bounds = sorted({0, len(SERVER_STREAM), *cuts, drain_at})
    actions: list[object] = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        if start == drain_at:
            actions += s.drain()
        answer = s.from_server(SERVER_STREAM[start:stop], 1.0)
        if Close("shutdown") in answer:
            assert stop == len(SERVER_STREAM)
        actions += answer
    if drain_at == len(SERVER_STREAM):
        actions += s.drain()
    assert actions == DRAINED


# -- POP3 -----------------------------------------------------------------------------------


def pop3() -> RelaySession:
    s = RelaySession("pop3", now=0.0)
    assert s.from_client(b"STAT\r\n", 0.0) is NOTHING
    assert s.from_server(b"+OK 2 320\r\n", 0.0) is NOTHING
    return s


def test_pop3_adds_nothing_to_the_stream() -> None:
    # RFC 1939 section 3: the server never speaks unprompted; nothing can be inserted.
    assert POP3_LINES.timeout is POP3_LINES.shutdown is POP3_LINES.backend_gone is None
    assert POP3_LINES.keepalive is POP3_LINES.logout is None
    s = pop3()
    assert s.tick(1799.0, T) == []
    assert s.tick(1800.0, T) == [Close("inactivity timeout")]
    assert pop3().backend_lost() == [Close("backend closed")]
    assert pop3().end("kicked") == [Close("kicked")]


def test_pop3_drain_never_sends_quit() -> None:
    # RFC 1939 section 6: QUIT would commit the client's deletions; closing does not.
    s = pop3()
    assert s.drain() == [PauseClient(), Close("shutdown")]
    assert not s.logout_sent


def test_pop3_drain_waits_for_a_retr_in_flight() -> None:
    s = pop3()
    s.from_client(b"DELE 1\r\nRETR 2\r\n", 1.0)
    s.from_server(b"+OK deleted\r\n+OK 160 octets\r\nSubject: x\r\n\r\n", 1.0)
    assert s.drain() == [PauseClient()]
    assert not s.from_server(b"..dot-stuffed\r\n", 2.0)
    assert s.from_server(b"body\r\n.\r\n", 3.0) == [Close("shutdown")]


def test_pop3_backend_lost_after_quit_is_the_normal_end() -> None:
    s = pop3()
    s.from_client(b"QUIT\r\n", 1.0)
    assert s.backend_lost() == [Close("logout")]


# -- COMPRESS (RFC 4978) --------------------------------------------------------------------


def compressed() -> tuple[RelaySession, list[object]]:
    s = imap()
    s.from_client(b"c1 COMPRESS DEFLATE\r\n", 0.0)
    actions = s.from_server(b"c1 OK DEFLATE active\r\n", 0.0)
    return s, list(actions)


def test_compress_is_logged_once_and_then_not_followed() -> None:
    s, actions = compressed()
    assert len(actions) == 1 and isinstance(actions[0], Log) and actions[0].level == "info"
    assert "RFC 4978" in actions[0].text
    assert s.tracker.opaque
    assert s.from_server(b"\x78\x9c\x4b\x4c\x02\x00", 1.0) is NOTHING
    assert s.from_client(b"\x78\x9c\x4b\x4c\x02\x00", 1.0) is NOTHING


def test_compressed_sessions_are_not_drained_gracefully() -> None:
    s, _ = compressed()
    # Nothing can be told about a compressed stream: the drain timeout closes it.
    assert s.drain() == []
    assert not s.from_server(b"\x01\x02\x03", 1.0)
    assert not s.from_client(b"\x01\x02\x03", 1.0)
    # Nothing can be inserted into it either.
    assert s.backend_lost() == [Close("backend closed")]


def test_compressed_session_times_out_without_a_bye() -> None:
    s, _ = compressed()
    actions = s.tick(1800.0, T)
    assert sent_to_client(actions) == []
    assert actions[-1] == Close("inactivity timeout")


def test_compressed_session_ends_without_a_plain_text_logout() -> None:
    s, _ = compressed()
    assert sent_to_backend(s.end("kicked")) == []

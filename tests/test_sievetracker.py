"""Tests for imapproxy.sievetracker: when a relayed ManageSieve session is quiet (sans-IO),
and what the relay's policy (relaysession.py) says in one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.actions import Close, PauseClient, SendToBackend, SendToClient
from imapproxy.config import Timeouts
from imapproxy.relaysession import RelaySession
from imapproxy.sievetracker import MAX_PENDING, SieveTracker

SCRIPT = b'require "fileinto";\r\nOK "not a response"\r\nkeep;\r\n'
PUT = b'PUTSCRIPT "s" {%d+}\r\n' % len(SCRIPT) + SCRIPT + b"\r\n"
GET_REPLY = b"{%d}\r\n" % len(SCRIPT) + SCRIPT + b'\r\nOK "Getscript completed."\r\n'


def test_a_command_is_in_flight_until_its_ok_no_or_bye() -> None:
    tracker = SieveTracker()
    assert tracker.quiet
    tracker.from_client(b"LISTSCRIPTS\r\n")
    assert not tracker.quiet and tracker.in_flight == 1
    tracker.from_server(b'"s" ACTIVE\r\n')
    assert not tracker.quiet
    tracker.from_server(b'OK "Listscripts completed."\r\n')
    assert tracker.quiet


def test_literals_are_skipped_both_ways() -> None:
    tracker = SieveTracker()
    tracker.from_client(PUT[:30])
    assert not tracker.client_at_boundary
    tracker.from_client(PUT[30:])
    assert tracker.client_at_boundary and tracker.in_flight == 1
    tracker.from_server(b'OK "PUTSCRIPT completed."\r\n')
    tracker.from_client(b'GETSCRIPT "s"\r\n')
    # The script holds a line "OK ..." inside the literal: not the answer.
    tracker.from_server(GET_REPLY[:40])
    assert tracker.in_flight == 1 and not tracker.server_at_boundary
    tracker.from_server(GET_REPLY[40:])
    assert tracker.quiet


def test_logout_bye_and_authenticate_after_unauthenticate() -> None:
    tracker = SieveTracker()
    tracker.from_client(b"UNAUTHENTICATE\r\n")
    tracker.from_server(b"OK\r\n")
    tracker.from_client(b'AUTHENTICATE "PLAIN"\r\n')
    tracker.from_server(b'""\r\n')
    tracker.from_client(b'"dGVzdA=="\r\n')  # the SASL response: not a command
    tracker.from_server(b'OK "Logged in."\r\n')
    assert tracker.quiet
    tracker.from_client(b"\r\nLOGOUT\r\n")
    assert tracker.logout_sent
    tracker.from_server(b'BYE "bye"\r\n')
    assert tracker.saw_bye and tracker.quiet
    assert not tracker.idling and not tracker.opaque


def test_too_many_commands_in_flight_is_never_quiet() -> None:
    tracker = SieveTracker()
    tracker.from_client(b"NOOP\r\n" * (MAX_PENDING + 1))
    tracker.from_server(b"OK\r\n" * (MAX_PENDING + 1))
    assert tracker.overflowed and not tracker.quiet


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_chunking_does_not_matter(data: st.DataObject) -> None:
    client = PUT + b'GETSCRIPT "s"\r\nNOOP\r\n'
    server = b"OK\r\n" + GET_REPLY + b'OK (TAG "x") "Done"\r\n'

    def state(client_chunks: list[bytes], server_chunks: list[bytes]) -> tuple[object, ...]:
        tracker = SieveTracker()
        for chunk in client_chunks:
            tracker.from_client(chunk)
        for chunk in server_chunks:
            tracker.from_server(chunk)
        return (tracker.in_flight, tracker.quiet, tracker.client_at_boundary,
                tracker.server_at_boundary)

    def cut(stream: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    assert state(cut(client), cut(server)) == state([client], [server]) == (0, True, True, True)


# -- the relay's policy in a ManageSieve session --------------------------------------------


def test_drain_waits_for_the_answer_then_logs_out_and_says_bye() -> None:
    session = RelaySession("managesieve", now=0.0)
    assert session.from_client(b"LISTSCRIPTS\r\n", 1.0) == ()
    assert session.drain() == [PauseClient()]
    assert session.from_server(b'OK "done"\r\n', 2.0) == [
        SendToBackend(b"LOGOUT\r\n"),
        SendToClient(b'BYE (TRYLATER) "Server shutting down"\r\n'), Close("shutdown")]


def test_timeout_and_backend_gone_say_bye() -> None:
    session = RelaySession("managesieve", now=0.0)
    timeouts = Timeouts()
    assert session.tick(timeouts.authenticated + 1, timeouts) == [
        SendToClient(b'BYE "Autologout; idle for too long"\r\n'), SendToBackend(b"LOGOUT\r\n"),
        Close("inactivity timeout")]
    session = RelaySession("managesieve", now=0.0)
    assert session.backend_lost() == [
        SendToClient(b'BYE (TRYLATER) "Backend went away, reconnect"\r\n'),
        Close("backend closed")]

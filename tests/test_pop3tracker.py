"""Pop3Tracker: commands in flight and multi-line replies, so drains end between commands."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.pop3tracker import Pop3Tracker


def test_single_line_command_in_flight_until_its_reply() -> None:
    t = Pop3Tracker()
    assert t.quiet
    t.from_client(b"STAT\r\n")
    assert not t.quiet and t.in_flight == 1
    t.from_server(b"+OK 2 320\r\n")
    assert t.quiet


def test_retr_is_in_flight_until_the_dot_line_whatever_the_body_holds() -> None:
    t = Pop3Tracker()
    t.from_client(b"RETR 1\r\n")
    t.from_server(b"+OK 120 octets\r\nSubject: hi\r\n\r\n")
    assert not t.quiet and not t.server_at_boundary
    # a dot-stuffed line and a line that looks like a status are body
    t.from_server(b"..\r\n+OK not a reply\r\n-ERR neither\r\n")
    assert not t.quiet
    t.from_server(b".\r\n")
    assert t.quiet


def test_list_and_uidl_are_multi_line_only_without_an_argument() -> None:
    t = Pop3Tracker()
    t.from_client(b"LIST 1\r\nUIDL\r\n")
    assert t.in_flight == 2
    t.from_server(b"+OK 1 120\r\n")
    assert t.in_flight == 1
    t.from_server(b"+OK\r\n1 abc\r\n")
    assert not t.quiet
    t.from_server(b".\r\n")
    assert t.quiet


def test_an_error_to_a_multi_line_command_is_one_line() -> None:
    t = Pop3Tracker()
    t.from_client(b"RETR 99\r\n")
    t.from_server(b"-ERR no such message\r\n")
    assert t.quiet


def test_partial_lines_are_no_boundary() -> None:
    t = Pop3Tracker()
    t.from_client(b"NO")
    assert not t.client_at_boundary and not t.quiet
    t.from_client(b"OP\r\n")
    t.from_server(b"+OK")
    assert not t.quiet
    t.from_server(b"\r\n")
    assert t.quiet


def test_quit_is_noted() -> None:
    t = Pop3Tracker()
    t.from_client(b"quit\r\n")
    assert t.logout_sent


def test_never_idles_or_goes_opaque() -> None:
    t = Pop3Tracker()
    assert not t.idling and not t.opaque and not t.saw_bye


@given(st.lists(st.binary(max_size=64), max_size=20), st.lists(st.binary(max_size=64),
                                                               max_size=20))
def test_any_bytes_in_any_pieces_are_taken(client: list[bytes], server: list[bytes]) -> None:
    t = Pop3Tracker()
    for piece in client:
        t.from_client(piece)
    for piece in server:
        t.from_server(piece)
    assert t.in_flight >= 0


def test_split_anywhere_gives_the_same_state() -> None:
    stream = b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n+OK bye\r\n"
    for cut in range(len(stream) + 1):
        t = Pop3Tracker()
        t.from_client(b"LIST\r\nQUIT\r\n")
        t.from_server(stream[:cut])
        t.from_server(stream[cut:])
        assert t.quiet, cut

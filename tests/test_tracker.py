"""SessionTracker: follows both IMAP streams after login, whatever the chunking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.tracker import HEAD, Idle, SessionTracker


def feed(steps: list[tuple[str, bytes]], split: bool = False) -> SessionTracker:
    tracker = SessionTracker()
    for side, data in steps:
        feed_side = tracker.from_client if side == "c" else tracker.from_server
        if split:
            for i in range(len(data)):
                feed_side(data[i : i + 1])
        else:
            feed_side(data)
    return tracker


def state(t: SessionTracker) -> tuple[object, ...]:
    return (t.in_flight, t.idle, t.idling, t.quiet, t.opaque, t.saw_bye, t.logout_sent,
            t.client_at_boundary, t.server_at_boundary)


def both(steps: list[tuple[str, bytes]]) -> SessionTracker:
    whole, split = feed(steps), feed(steps, split=True)
    assert state(whole) == state(split)
    return whole


def test_command_in_flight_until_tagged_reply() -> None:
    t = both([("c", b"a1 SELECT INBOX\r\n")])
    assert t.in_flight == 1 and not t.quiet
    t = both([("c", b"a1 SELECT INBOX\r\n"), ("s", b"* 3 EXISTS\r\na1 OK done\r\n")])
    assert t.in_flight == 0 and t.quiet


def test_idle_requested_confirmed_and_done() -> None:
    steps = [("c", b"i1 IDLE\r\n")]
    assert both(steps).idle is Idle.REQUESTED and not both(steps).idling
    steps.append(("s", b"+ idling\r\n"))
    assert both(steps).idling
    steps.append(("s", b"* 4 EXISTS\r\n"))
    t = both(steps)
    assert t.idling and t.server_at_boundary
    steps.append(("c", b"DONE\r\n"))
    t = both(steps)
    assert t.idle is Idle.DONE_SENT and not t.idling
    steps.append(("s", b"i1 OK Idle completed\r\n"))
    t = both(steps)
    assert t.idle is Idle.OFF and t.quiet


def test_literal_containing_done_and_crlf_is_not_a_line() -> None:
    body = b"DONE\r\ni2 IDLE\r\nLOGOUT\r\n"
    steps = [("c", b"a APPEND INBOX {%d}\r\n" % len(body)), ("s", b"+ go\r\n"),
             ("c", body), ("c", b"\r\n")]
    t = both(steps)
    assert t.idle is Idle.OFF and not t.logout_sent
    assert t.in_flight == 1 and t.client_at_boundary
    t = both([*steps, ("s", b"a OK [APPENDUID 1 9] Append completed.\r\n")])
    assert t.quiet


def test_non_synchronising_literal_and_client_mid_literal_is_no_boundary() -> None:
    t = both([("c", b"a APPEND INBOX {10+}\r\n01234")])
    assert not t.client_at_boundary and t.in_flight == 0
    t = both([("c", b"a APPEND INBOX {10+}\r\n0123456789\r\n")])
    assert t.client_at_boundary and t.in_flight == 1


def test_server_literal_with_tagged_looking_bytes_inside() -> None:
    body = b"i1 OK fake\r\n* BYE fake\r\n"
    steps = [("c", b"i1 IDLE\r\n"), ("s", b"+ idling\r\n"),
             ("s", b"* 2 FETCH (BODY[] {%d}\r\n" % len(body) + body)]
    t = both(steps)
    assert t.idle is Idle.IDLING and not t.saw_bye and not t.server_at_boundary
    t = both([*steps, ("s", b")\r\n")])
    assert t.idling and t.server_at_boundary


def test_pipelined_commands_count_each() -> None:
    t = both([("c", b"a NOOP\r\nb NOOP\r\nc SELECT INBOX\r\n"), ("s", b"a OK\r\nb OK\r\n")])
    assert t.in_flight == 1


def test_compress_makes_the_streams_opaque() -> None:
    t = both([("c", b"z COMPRESS DEFLATE\r\n"), ("s", b"z OK DEFLATE active\r\n"),
              ("c", b"\x78\x9c garbage"), ("s", b"\x00\x01")])
    assert t.opaque and not t.quiet and not t.client_at_boundary


def test_refused_compress_keeps_following() -> None:
    t = both([("c", b"z COMPRESS DEFLATE\r\n"), ("s", b"z NO not now\r\n"),
              ("c", b"i IDLE\r\n"), ("s", b"+ idling\r\n")])
    assert not t.opaque and t.idling


def test_bye_and_logout() -> None:
    t = both([("c", b"z LOGOUT\r\n"), ("s", b"* BYE Logging out\r\nz OK done\r\n")])
    assert t.logout_sent and t.saw_bye and t.quiet


def test_long_lines_keep_only_head_and_tail() -> None:
    line = b"a UID SEARCH " + b"1," * 50_000 + b"2\r\n"
    t = SessionTracker()
    t.from_client(line[:70_000])
    assert len(t._c_head) <= HEAD and len(t._c_tail) <= 32
    t.from_client(line[70_000:])
    assert t.in_flight == 1


_pieces = st.sampled_from([b"a NOOP\r\n", b"i IDLE\r\n", b"DONE\r\n", b"+ idling\r\n",
                           b"a OK done\r\n", b"* 3 EXISTS\r\n", b"{5}\r\nhello", b"{3+}\r\n",
                           b"abc", b"\r\n", b"z COMPRESS DEFLATE\r\n", b"z OK\r\n", b"\n",
                           b"* BYE x\r\n", b"x"])


@given(st.lists(st.tuples(st.sampled_from(["c", "s"]), st.lists(_pieces, max_size=6)
                          .map(b"".join)), max_size=12))
def test_any_streams_any_chunking_same_state(steps: list[tuple[str, bytes]]) -> None:
    whole = feed(steps)
    split = feed(steps, split=True)
    assert state(whole) == state(split)
    assert whole.in_flight >= 0
    assert len(whole._c_head) <= HEAD and len(whole._s_head) <= HEAD

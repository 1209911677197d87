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


def every_cut(steps: list[tuple[str, bytes]]) -> SessionTracker:
    """Fed whole, byte by byte, and with each step cut in two at every position: all
    give the same state."""
    whole = both(steps)
    for index, (side, data) in enumerate(steps):
        for cut in range(1, len(data)):
            pieces = [*steps[:index], (side, data[:cut]), (side, data[cut:]),
                      *steps[index + 1:]]
            assert state(feed(pieces)) == state(whole), (index, cut)
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
    assert not t.client_at_boundary and t.in_flight == 1  # in flight from its first line
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


# -- synchronising literals wait for "+" (RFC 3501 section 7.5, RFC 9051 section 7.5) -------

def test_refused_synchronising_literal_is_never_sent() -> None:
    """The issue's session: NO [TRYCREATE] instead of "+", and the 50,000 bytes never come;
    the next command is IDLE, and it must be seen (timeouts, keepalives, drain)."""
    steps = [("c", b"a APPEND NoSuchBox {50000}\r\n"),
             ("s", b"a NO [TRYCREATE] Mailbox doesn't exist: NoSuchBox\r\n")]
    t = every_cut(steps)
    assert t.quiet and t.client_at_boundary and t.in_flight == 0
    steps += [("c", b"b IDLE\r\n"), ("s", b"+ idling\r\n")]
    t = every_cut(steps)
    assert t.idling and t.idle_tag == b"b"
    t = every_cut([*steps, ("c", b"DONE\r\n"), ("s", b"b OK Idle completed.\r\n")])
    assert t.quiet


def test_accepted_synchronising_literal_is_counted_after_the_plus() -> None:
    steps = [("c", b"a APPEND INBOX {14}\r\n")]
    t = every_cut(steps)
    assert not t.client_at_boundary and t.in_flight == 1
    steps += [("s", b"+ OK\r\n"), ("c", b"DONE\r\nb IDLE\r\n"), ("c", b"\r\n")]
    t = every_cut(steps)
    assert t.client_at_boundary and t.idle is Idle.OFF and t.in_flight == 1
    assert every_cut([*steps, ("s", b"a OK [APPENDUID 1 2] Append completed.\r\n")]).quiet


def test_each_synchronising_literal_of_a_command_waits_for_its_own_plus() -> None:
    login = [("c", b"a LOGIN {5}\r\n"), ("s", b"+ OK\r\n"), ("c", b"alice {6}\r\n")]
    t = every_cut([*login, ("s", b"+ OK\r\n"), ("c", b"secret\r\n"),
                   ("s", b"a NO [ALREADYAUTHENTICATED] no\r\n")])
    assert t.quiet
    # Refused at the second literal: its bytes never come, the next command does.
    t = every_cut([*login, ("s", b"a NO too big\r\n"), ("c", b"b IDLE\r\n"),
                   ("s", b"+ idling\r\n")])
    assert t.idling and t.in_flight == 1


def test_a_pipelined_commands_reply_does_not_cancel_another_commands_literal() -> None:
    steps = [("c", b"a NOOP\r\nb APPEND INBOX {5}\r\n"), ("s", b"a OK NOOP completed\r\n")]
    t = every_cut(steps)
    assert not t.client_at_boundary and t.in_flight == 1
    t = every_cut([*steps, ("s", b"+ OK\r\n"), ("c", b"b NO \r\n"),
                   ("s", b"b OK Append completed.\r\n")])
    assert t.quiet


def test_non_synchronising_literals_are_sent_at_once_even_when_refused() -> None:
    """RFC 7888 (and ~{n+}, RFC 3516): the bytes follow the line without a "+"; a refusal
    does not stop them."""
    for marker in (b"{8+}", b"~{8+}"):
        steps = [("c", b"a APPEND NoSuchBox " + marker + b"\r\n"),
                 ("s", b"a NO [TRYCREATE] Mailbox doesn't exist\r\n"),
                 ("c", b"b IDLE\r\n\r\n"), ("c", b"c IDLE\r\n"), ("s", b"+ idling\r\n")]
        t = every_cut(steps)
        assert t.idling and t.idle_tag == b"c", marker


def test_binary_synchronising_literal_waits_too() -> None:
    t = every_cut([("c", b"a APPEND NoSuchBox ~{50000}\r\n"), ("s", b"a NO [TRYCREATE] x\r\n"),
                   ("c", b"b IDLE\r\n"), ("s", b"+ idling\r\n")])
    assert t.idling


def test_a_plus_answers_the_oldest_request_first() -> None:
    """A client that does not wait: IDLE's "+" is the first, the literal's the second."""
    steps = [("c", b"i IDLE\r\na APPEND INBOX {4}\r\n"), ("s", b"+ idling\r\n")]
    t = every_cut(steps)
    assert t.idle is Idle.IDLING and not t.client_at_boundary
    t = every_cut([*steps, ("s", b"+ OK\r\n"), ("c", b"DONE\r\n")])
    assert t.client_at_boundary and t.idle is Idle.IDLING  # DONE was the literal


def test_authenticate_responses_are_not_commands() -> None:
    """After login AUTHENTICATE is refused, but a server that sends "+" challenges gets
    response lines, which have no tag and no tagged reply of their own."""
    t = every_cut([("c", b"a AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"),
                   ("c", b"AGFsaWNlAHNlY3JldA==\r\n"), ("s", b"+ more\r\n"),
                   ("c", b"IDLE\r\n"), ("s", b"a NO [ALREADYAUTHENTICATED] no\r\n")])
    assert t.quiet and t.idle is Idle.OFF
    t = every_cut([("c", b"a AUTHENTICATE PLAIN\r\n"), ("s", b"a BAD Already logged in\r\n"),
                   ("c", b"i IDLE\r\n"), ("s", b"+ idling\r\n")])
    assert t.idling


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

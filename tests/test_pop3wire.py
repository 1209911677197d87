"""Tests for imapproxy.pop3wire: POP3 line framing and status lines, used by both the
front-end session (pop3.py) and the backend dialogue (pop3backend.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.pop3wire import LINE_TOO_LONG, LineReader, reply


def test_reply_strips_control_characters_and_renders_codes() -> None:
    assert reply(True, "fine") == b"+OK fine\r\n"
    assert reply(False, "bad\r\n+OK forged", "IN-USE") == b"-ERR [IN-USE] bad  +OK forged\r\n"


def test_line_reader_take_buffer_and_discard() -> None:
    reader = LineReader(8)
    reader.feed(b"one\r\ntwo")
    assert reader.next_line() == b"one"
    assert reader.next_line() is None
    assert reader.take_buffer() == b"two"
    reader.feed(b"1234567890")
    assert reader.next_line() is LINE_TOO_LONG
    reader.discard()
    reader.feed(b"ok\n")
    assert reader.next_line() == b"ok"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_line_reader_chunking_does_not_matter(chunks: list[bytes]) -> None:
    def lines(feeds: list[bytes]) -> list[object]:
        reader = LineReader(12)
        out: list[object] = []
        for feed in feeds:
            reader.feed(feed)
            while (line := reader.next_line()) is not None:
                out.append(line)
            assert reader.buffered <= 13
        return out

    data = b"".join(chunks)
    assert lines(chunks) == lines([data[i : i + 1] for i in range(len(data))])


def test_line_too_long_has_a_readable_repr() -> None:
    assert repr(LINE_TOO_LONG) == "LINE_TOO_LONG"

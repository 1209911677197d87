"""Tests for imapproxy.sievewire: ManageSieve framing (RFC 5804 section 4), used by both
the front-end session (managesieve.py) and the backend dialogue (sievebackend.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.sievewire import (
    LINE_TOO_LONG,
    Atom,
    LiteralTooLarge,
    Malformed,
    Message,
    MessageReader,
    String,
    capability_line,
    render,
    response,
    string,
    tokens,
)


def read_all(reader: MessageReader) -> list[object]:
    out: list[object] = []
    while (message := reader.next_message()) is not None:
        out.append(message)
    return out


def test_lines_and_literals_make_one_message() -> None:
    reader = MessageReader(100, 100)
    reader.feed(b'PUTSCRIPT "a" {5+}\r\nkeep;\r\nNOOP\nCAPABILITY\r')
    assert read_all(reader) == [Message((b'PUTSCRIPT "a" ', b"keep;", b"")), Message((b"NOOP",))]
    assert not reader.at_boundary
    reader.feed(b"\n")
    assert read_all(reader) == [Message((b"CAPABILITY",))]
    assert reader.at_boundary


def test_synchronising_literal_is_read_the_same_way() -> None:
    reader = MessageReader(100, 100)
    reader.feed(b"{3}\r\nabc\r\n")
    assert tokens(read_all(reader)[0]) == [String(b"abc")]  # type: ignore[arg-type]


def test_line_too_long_skips_to_the_end_of_its_line() -> None:
    reader = MessageReader(8, 100)
    reader.feed(b"123456789012")
    assert reader.next_message() is LINE_TOO_LONG
    reader.feed(b"3456\r\nNOOP\r\n")
    assert read_all(reader) == [Message((b"NOOP",))]
    assert repr(LINE_TOO_LONG) == "LINE_TOO_LONG"


def test_literal_too_large_stops_the_reader() -> None:
    reader = MessageReader(100, 10)
    reader.feed(b'AUTHENTICATE "PLAIN" {11+}\r\nxxxxxxxxxxx\r\nNOOP\r\n')
    result = reader.next_message()
    assert isinstance(result, LiteralTooLarge) and result.size == 11
    assert repr(result) == "LiteralTooLarge(11)"
    reader.feed(b"NOOP\r\n")
    assert reader.next_message() is None and reader.buffered == 0


def test_a_message_is_bounded_as_a_whole() -> None:
    reader = MessageReader(10, 10)  # max_message 20
    reader.feed(b"A {10+}\r\n0123456789 {10+}\r\n")
    assert isinstance(reader.next_message(), LiteralTooLarge)


def test_take_buffer_gives_back_a_message_read_in_part() -> None:
    reader = MessageReader(100, 100)
    reader.feed(b'PUTSCRIPT "a" {5+}\r\nke')
    assert reader.next_message() is None
    assert reader.take_buffer() == b'PUTSCRIPT "a" {5+}\r\nke'
    reader.feed(b"X {2+}\r\nab GO")
    assert reader.next_message() is None
    assert reader.take_buffer() == b"X {2+}\r\nab GO"
    assert reader.buffered == 0


def test_discard_forgets_everything() -> None:
    reader = MessageReader(4, 100)
    reader.feed(b"1234567")
    assert reader.next_message() is LINE_TOO_LONG
    reader.discard()
    reader.feed(b"OK\r\n")
    assert read_all(reader) == [Message((b"OK",))]


def test_tokens_of_quoted_strings_atoms_and_parentheses() -> None:
    message = Message((b'OK (TAG "a\\"b\\\\") "done"  x',))
    assert tokens(message) == [Atom(b"OK"), Atom(b"("), Atom(b"TAG"), String(b'a"b\\'),
                               Atom(b")"), String(b"done"), Atom(b"x")]
    assert repr(String(b"secret")) == "String(<6 octets>)"


@pytest.mark.parametrize("line", [
    b'"unterminated', b'"bad \\x escape"', b'"nul \0 inside"', b"{", b'"' + b"a" * 1025 + b'"',
])
def test_malformed_lines(line: bytes) -> None:
    with pytest.raises(Malformed):
        tokens(Message((line,)))


def test_a_literal_glued_to_an_atom_is_malformed() -> None:
    with pytest.raises(Malformed):
        tokens(Message((b"abc", b"lit", b"")))


def test_string_quotes_when_it_can_and_uses_a_literal_otherwise() -> None:
    assert string(b'a"b\\') == b'"a\\"b\\\\"'
    assert string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert string(b"x" * 1025, to_server=True).startswith(b"{1025+}\r\n")
    # whatever it renders reads back as the same value
    for value in (b'a"b\\', b"a\r\nb", b"\0", b"x" * 2000):
        reader = MessageReader(100, 4096)
        reader.feed(string(value) + b"\r\n")
        assert tokens(read_all(reader)[0]) == [String(value)]  # type: ignore[arg-type]


def test_responses_and_capability_lines() -> None:
    assert response(b"OK") == b"OK\r\n"
    assert response(b"NO", "no\r\nOK forged", b"TRYLATER") == \
        b"NO (TRYLATER) {13}\r\nno\r\nOK forged\r\n"
    assert capability_line(b"STARTTLS") == b'"STARTTLS"\r\n'
    assert capability_line(b"VERSION", b"1.0") == b'"VERSION" "1.0"\r\n'
    assert render([Atom(b"REFERRAL"), String(b"sieve://x")]) == b'REFERRAL "sieve://x"'
    assert render([Atom(b"("), Atom(b"A"), Atom(b")")]) == b"(A)"


MESSAGES = st.lists(st.one_of(
    st.just(b"NOOP\r\n"), st.just(b'AUTHENTICATE "PLAIN" {4+}\r\nabcd\r\n'),
    st.just(b"{3}\r\nab\n\r\n"), st.binary(max_size=30), st.just(b"x" * 40 + b"\n"),
    st.just(b"A {99+}\r\n")), max_size=12)


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data())
def test_chunking_does_not_matter(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def messages(feeds: list[bytes]) -> list[object]:
        reader = MessageReader(32, 16)
        out: list[object] = []
        for feed in feeds:
            reader.feed(feed)
            while (message := reader.next_message()) is not None:
                out.append(message.size if isinstance(message, LiteralTooLarge) else message)
            assert reader.buffered <= reader.max_message + 2
        return out

    whole = messages([stream])
    assert messages(chunks) == whole
    assert messages([stream[i:i + 1] for i in range(len(stream))]) == whole

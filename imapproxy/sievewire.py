# -*- test-case-name: tests.test_sievewire -*-
"""ManageSieve framing (RFC 5804), shared by the front end (managesieve.py) and the
backend dialogue (sievebackend.py): pure bytes, no I/O.

RFC 5804 section 4 has one grammar for both directions: a command or a response is
a line of atoms and strings separated by spaces, where a string is quoted
(``"..."`` with ``\\"`` and ``\\\\`` escapes) or a literal: ``{n+}`` (or ``{n}``) at
the end of a line, CRLF, then exactly n octets, after which the line goes on.
``MessageReader`` cuts a byte stream into such messages, bounded, however TCP splits
it; ``tokens`` are what a message holds. Responses are rendered by ``response``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: RFC 5804 section 4: a quoted string holds at most 1024 octets ("Quoted strings
#: ... MUST NOT be longer than 1024 octets"); longer text goes as a literal.
MAX_QUOTED = 1024

#: A literal marker at the end of a line: ``{n+}`` (client, section 4 literal-c2s) or
#: ``{n}`` (server, literal-s2c; accepted from clients too, as Dovecot does, and
#: never answered with a continuation: ManageSieve has none for literals).
_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}\r?$")


@dataclass(frozen=True, slots=True)
class Atom:
    """A bare word: a command name, OK/NO/BYE, a response code, ``(`` or ``)``."""

    value: bytes


@dataclass(frozen=True, slots=True)
class String:
    """A quoted string or a literal, unescaped. ``repr`` hides it: it may be a password."""

    value: bytes

    def __repr__(self) -> str:
        return f"String(<{len(self.value)} octets>)"


Token = Atom | String


@dataclass(frozen=True, slots=True)
class Message:
    """One command (or response) as it came: line pieces and literals, alternating."""

    #: line, literal, line, literal, ..., line (each line without its CRLF and marker)
    segments: tuple[bytes, ...]


class LineTooLong:
    """A line of the message being read was longer than the limit; the rest of that
    message is skipped up to the end of its line."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


class LiteralTooLarge:
    """A literal announced more octets than allowed. Its octets may already be on
    their way (``{n+}`` needs no go-ahead), so the stream cannot be resynchronised:
    the reader stops, and the caller should say BYE and close."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"LiteralTooLarge({self.size})"


LINE_TOO_LONG = LineTooLong()


class MessageReader:
    """Cuts a byte stream into ManageSieve messages (lines with literals), bounded.

    A line holds at most ``max_line`` octets without its CRLF, a literal at most
    ``max_literal``, and a whole message at most ``max_line + max_literal`` (so at most
    that much is ever held). A bare LF ends a line too (lenient, as servers are).
    """

    __slots__ = ("max_line", "max_literal", "_buffer", "_segments", "_literal", "_size",
                 "_skipping", "_broken")

    def __init__(self, max_line: int, max_literal: int) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self._buffer = bytearray()
        self._segments: list[bytes] = []
        #: octets of the literal being read, None while reading a line
        self._literal: int | None = None
        self._size = 0
        self._skipping = False
        #: a literal was too large: nothing more is read
        self._broken = False

    @property
    def max_message(self) -> int:
        return self.max_line + self.max_literal

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._size

    @property
    def at_boundary(self) -> bool:
        """Between two messages: nothing of a next one read yet."""
        return not self._buffer and not self._segments and not self._skipping

    def feed(self, data: bytes) -> None:
        if not self._broken:
            self._buffer += data

    def next_message(self) -> Message | LineTooLong | LiteralTooLarge | None:
        """The next whole message, an error, or None for "need more data"."""
        buffer = self._buffer
        while not self._broken:
            if self._literal is not None:
                if len(buffer) < self._literal:
                    return None
                self._add(bytes(buffer[: self._literal]))
                del buffer[: self._literal]
                self._literal = None
                continue
            end = buffer.find(b"\n")
            if self._skipping:
                if end < 0:
                    buffer.clear()
                    return None
                del buffer[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                # One octet of slack: the CR of a line of exactly max_line octets.
                if len(buffer) > self.max_line + 1:
                    buffer.clear()
                    self._reset()
                    self._skipping = True
                    return LINE_TOO_LONG
                return None
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                self._reset()
                return LINE_TOO_LONG
            marker = _LITERAL.search(line)
            if marker is None:
                self._add(line)
                segments = tuple(self._segments)
                self._reset()
                return Message(segments)
            size = int(marker.group(1))
            if size > self.max_literal or self._size + end + size > self.max_message:
                self._broken = True
                buffer.clear()
                self._reset()
                return LiteralTooLarge(size)
            self._add(line[: marker.start()])
            self._literal = size
        return None

    def _add(self, segment: bytes) -> None:
        self._segments.append(segment)
        self._size += len(segment)

    def _reset(self) -> None:
        self._segments = []
        self._size = 0
        self._literal = None

    def take_buffer(self) -> bytes:
        """Everything fed but not yet returned as a message (h11's trailing_data),
        re-framed: a message read in part is given back as it came."""
        data = _reframe(self._segments, self._literal) + bytes(self._buffer)
        self._buffer.clear()
        self._reset()
        return data

    def discard(self) -> None:
        self._buffer.clear()
        self._reset()
        self._skipping = False


def _reframe(segments: list[bytes], literal: int | None) -> bytes:
    """The bytes of a message read in part: lines got their marker and CRLF back."""
    if not segments:
        return b""
    out = bytearray()
    for i, segment in enumerate(segments):
        if i % 2 == 0:
            out += segment
        else:
            # the literal before this one was announced by the line before it
            out += b"{%d+}\r\n" % len(segment) + segment
    if literal is not None:
        # The last segment is a line whose literal is being read.
        out += b"{%d+}\r\n" % literal
    return bytes(out)


class Malformed(ValueError):
    """A message that is not a sequence of atoms and strings (RFC 5804 section 4)."""


#: Octets that may not appear in a quoted string (RFC 5804 section 4: SAFE-CHAR
#: excludes NUL, CR and LF).
_NOT_QUOTABLE = frozenset(b"\0\r\n")
#: Octets that end an atom.
_ATOM_END = frozenset(b' "(){}\0\r\n')


def tokens(message: Message) -> list[Token]:
    """The atoms and strings of a message, in order; raises Malformed.

    ``(`` and ``)`` come out as atoms of their own (response codes, section 1.3).
    """
    out: list[Token] = []
    segments = message.segments
    for i, segment in enumerate(segments):
        if i % 2 == 1:
            out.append(String(segment))
            continue
        if i + 1 < len(segments) and segment and not segment.endswith((b" ", b"(")):
            # "abc{3+}" glues a literal to an atom: not a separate string.
            raise Malformed("literal not preceded by a space")
        _line_tokens(segment, out)
    return out


def _line_tokens(line: bytes, out: list[Token]) -> None:
    pos, end = 0, len(line)
    while pos < end:
        octet = line[pos]
        if octet == 0x20:  # SP
            pos += 1
        elif octet in b"()":
            out.append(Atom(line[pos:pos + 1]))
            pos += 1
        elif octet == 0x22:  # DQUOTE
            pos = _quoted(line, pos + 1, out)
        else:
            start = pos
            while pos < end and line[pos] not in _ATOM_END:
                pos += 1
            if pos == start:
                raise Malformed(f"unexpected octet {line[pos:pos + 1]!r}")
            out.append(Atom(line[start:pos]))


def _quoted(line: bytes, pos: int, out: list[Token]) -> int:
    value = bytearray()
    end = len(line)
    while pos < end:
        octet = line[pos]
        if octet == 0x22:
            if len(value) > MAX_QUOTED:
                raise Malformed("quoted string too long")
            out.append(String(bytes(value)))
            return pos + 1
        if octet == 0x5C:  # backslash: only \" and \\ (QUOTED-SPECIALS)
            if pos + 1 >= end or line[pos + 1] not in b'"\\':
                raise Malformed("bad escape in quoted string")
            value.append(line[pos + 1])
            pos += 2
            continue
        if octet in _NOT_QUOTABLE:
            raise Malformed("NUL, CR or LF in a quoted string")
        value.append(octet)
        pos += 1
    raise Malformed("unterminated quoted string")


# -- rendering ----------------------------------------------------------------------------


def string(value: bytes, *, to_server: bool = False) -> bytes:
    """``value`` as a ManageSieve string: quoted when it can be, else a literal.

    RFC 5804 section 4: a literal from the server is ``{n}`` (literal-s2c), from a
    client ``{n+}`` (literal-c2s): ``to_server`` for what the proxy sends a backend.
    """
    if len(value) <= MAX_QUOTED and not _NOT_QUOTABLE.intersection(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return (b"{%d+}\r\n" if to_server else b"{%d}\r\n") % len(value) + value


def response(status: bytes, text: str | bytes | None = None, code: bytes | None = None) -> bytes:
    """One response line: ``OK``, ``NO (CODE) "text"``, ``BYE (CODE) "text"`` (section 1.3).

    ``code`` is already in wire form (``TRYLATER``, ``REFERRAL "sieve://..."``,
    ``TAG "x"``); the text is ours or a backend's and always goes as a string.
    """
    line = status
    if code:
        line += b" (" + code + b")"
    if text is not None:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        line += b" " + string(raw)
    return line + b"\r\n"


def capability_line(name: bytes, value: bytes | None = None) -> bytes:
    """One line of a capability response (RFC 5804 section 1.7): ``"NAME" "value"``."""
    return string(name) + (b"" if value is None else b" " + string(value)) + b"\r\n"


def render(tokens_: list[Token]) -> bytes:
    """Tokens back on the wire (a response code's arguments); strings as ``string``."""
    out = bytearray()
    for i, token in enumerate(tokens_):
        previous = tokens_[i - 1] if i else None
        if i and not (isinstance(previous, Atom) and previous.value == b"(") \
                and not (isinstance(token, Atom) and token.value == b")"):
            out += b" "
        out += token.value if isinstance(token, Atom) else string(token.value)
    return bytes(out)


BYE_SHUTDOWN = response(b"BYE", "Server shutting down", b"TRYLATER")
BYE_TIMEOUT = response(b"BYE", "Autologout; idle for too long")
BYE_BACKEND_GONE = response(b"BYE", "Backend went away, reconnect", b"TRYLATER")

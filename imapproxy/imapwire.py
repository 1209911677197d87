"""IMAP framing and lexing for the pre-login dialogue: pure bytes, no I/O.

The stream is first cut into commands made of line and literal segments (the
"fragmenter" of imap-next), then each command's arguments are read on demand.
Literals are ``{n}`` (synchronising, RFC 3501 section 4.3) or ``{n+}``
(non-synchronising, RFC 7888). Every buffer is bounded by a named limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import Limits
from .errors import ClientProtocolError

#: Default longest pre-login line: [limits] max_line's default (see Limits).
MAX_LINE = Limits.max_line
#: Default largest pre-login literal: a username or password, never a message
#: ([limits] max_preauth_literal's default).
MAX_PREAUTH_LITERAL = Limits.max_preauth_literal
#: Default bound on a whole pre-login command, literals included.
MAX_COMMAND = 3 * MAX_PREAUTH_LITERAL

_LITERAL_AT_END = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
# RFC 3501 section 9: atom-specials are ( ) { SP CTL list-wildcards quoted-specials
# resp-specials. We are lenient with 8-bit bytes (clients send UTF-8 passwords).
_ATOM_SPECIALS = frozenset(b'(){ %*"\\') | frozenset(range(0x20)) | {0x7F}
_ASTRING_SPECIALS = _ATOM_SPECIALS  # astring additionally allows "]", already allowed here
_TAG_SPECIALS = _ATOM_SPECIALS | {ord("+")}


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A whole command: line segments with the literals between them (line, lit, line...)."""

    segments: tuple[bytes, ...] = field(repr=False)

    @property
    def tag(self) -> bytes:
        return tag_of(self.segments[0])


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """A synchronising literal was announced: send "+ ..." before the client sends it."""


@dataclass(frozen=True, slots=True)
class LiteralRejected:
    """A synchronising literal above the limit: answer BAD; the client will not send it."""

    tag: bytes


WireEvent = CommandReceived | NeedContinuation | LiteralRejected


def tag_of(line: bytes) -> bytes:
    """The tag at the start of a command line, or b"*" when there is no valid one."""
    tag = line.split(b" ", 1)[0]
    if not tag or any(b in _TAG_SPECIALS for b in tag):
        return b"*"
    return tag


class CommandAssembler:
    """Cuts a client byte stream into commands, with bounded buffering."""

    __slots__ = ("_buffer", "_segments", "_literal", "_size", "max_line", "max_literal",
                 "max_command")

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_PREAUTH_LITERAL,
                 max_command: int | None = None) -> None:
        self._buffer = bytearray()
        self._segments: list[bytes] = []
        self._literal: int | None = None
        self._size = 0
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_command if max_command is not None else max_line + 2 * max_literal

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """Hand over unprocessed bytes (for the relay after login, like h11 trailing_data)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def discard(self) -> None:
        """Forget everything unprocessed, e.g. plaintext pipelined behind STARTTLS."""
        self._buffer.clear()
        self._segments.clear()
        self._literal = None
        self._size = 0

    @property
    def in_command(self) -> bool:
        """True while part of a command (a line before a literal) has been read."""
        return bool(self._segments)

    def next_event(self) -> WireEvent | None:
        """The next complete event, or None when more bytes are needed."""
        while True:
            if self._literal is not None:
                if len(self._buffer) < self._literal:
                    return None
                size = self._literal
                self._segments.append(bytes(self._buffer[:size]))
                del self._buffer[:size]
                self._literal = None
                continue
            end = self._buffer.find(b"\n", 0, self.max_line + 2)
            if end < 0:
                # max_line octets and a CR may wait for their LF in the next read.
                if len(self._buffer) > self.max_line + 1:
                    raise ClientProtocolError("Line too long", fatal=True)
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                raise ClientProtocolError("Line too long", fatal=True)
            self._size += len(line)
            if self._size > self.max_command:
                raise ClientProtocolError("Command too long", fatal=True)
            match = _LITERAL_AT_END.search(line)
            if match is None:
                self._segments.append(line)
                command = CommandReceived(tuple(self._segments))
                self._segments.clear()
                self._size = 0
                return command
            size = int(match.group(1))
            synchronising = not match.group(2)
            self._segments.append(line)
            if size > self.max_literal or self._size + size > self.max_command:
                tag = tag_of(self._segments[0])
                self._segments.clear()
                self._size = 0
                if synchronising:
                    return LiteralRejected(tag)
                # RFC 7888 section 4: the data follows anyway; we cannot stay in sync
                # without reading it, so the connection ends.
                raise ClientProtocolError("Literal too large", fatal=True)
            self._size += size
            self._literal = size
            if synchronising:
                return NeedContinuation()


class ArgumentReader:
    """Reads IMAP arguments (atoms, quoted strings, literals, lists) from a command."""

    __slots__ = ("_segments", "_index", "_pos")

    def __init__(self, segments: tuple[bytes, ...]) -> None:
        self._segments = segments
        self._index = 0
        self._pos = 0

    @property
    def _line(self) -> bytes:
        return self._segments[self._index]

    def at_end(self) -> bool:
        return self._index == len(self._segments) - 1 and self._pos == len(self._line)

    def expect_end(self) -> None:
        if not self.at_end():
            raise ClientProtocolError("Unexpected extra arguments")

    def space(self) -> None:
        if self._line[self._pos : self._pos + 1] != b" ":
            raise ClientProtocolError("Expected a space")
        self._pos += 1

    def peek(self) -> bytes:
        return self._line[self._pos : self._pos + 1]

    def tag(self) -> bytes:
        value = self._run(_TAG_SPECIALS)
        if not value:
            raise ClientProtocolError("Invalid tag")
        return value

    def atom(self) -> bytes:
        value = self._run(_ATOM_SPECIALS)
        if not value:
            raise ClientProtocolError("Expected an atom")
        return value

    def _run(self, specials: frozenset[int]) -> bytes:
        line = self._line
        start = end = self._pos
        while end < len(line) and line[end] not in specials:
            end += 1
        self._pos = end
        return line[start:end]

    def astring(self) -> bytes:
        """atom / quoted / literal (RFC 3501 section 9, astring)."""
        first = self.peek()
        if first == b'"':
            return self._quoted()
        if first == b"{":
            return self._literal()
        value = self._run(_ASTRING_SPECIALS)
        if not value:
            raise ClientProtocolError("Expected a string")
        return value

    def nstring(self) -> bytes | None:
        """string / NIL."""
        first = self.peek()
        if first in (b'"', b"{"):
            return self.astring()
        value = self.atom()
        if value.upper() != b"NIL":
            raise ClientProtocolError("Expected a string or NIL")
        return None

    def _quoted(self) -> bytes:
        line = self._line
        pos = self._pos + 1
        out = bytearray()
        while pos < len(line):
            byte = line[pos]
            if byte == 0x22:  # closing quote
                self._pos = pos + 1
                return bytes(out)
            if byte == 0x5C:  # backslash: only \\ and \" are quoted-specials
                escaped = line[pos + 1 : pos + 2]
                if escaped not in (b"\\", b'"'):
                    raise ClientProtocolError("Invalid escape in quoted string")
                out += escaped
                pos += 2
                continue
            if byte == 0:
                raise ClientProtocolError("NUL in quoted string")
            out.append(byte)
            pos += 1
        raise ClientProtocolError("Unterminated quoted string")

    def _literal(self) -> bytes:
        match = _LITERAL_AT_END.search(self._line, self._pos)
        if match is None or match.start() != self._pos or self._index + 2 >= len(self._segments):
            raise ClientProtocolError("Invalid literal")
        value = self._segments[self._index + 1]
        self._index += 2
        self._pos = 0
        return value

    def id_parameters(self) -> tuple[tuple[str, str | None], ...]:
        """RFC 2971 section 3.3: "(" field SP value *(SP field SP value) ")" / NIL."""
        if self.peek() != b"(":
            if self.atom().upper() != b"NIL":
                raise ClientProtocolError("Expected a parameter list or NIL")
            return ()
        self._pos += 1
        pairs: list[tuple[str, str | None]] = []
        while True:
            if self.peek() == b")" and not pairs:
                break
            key = self.astring()
            self.space()
            value = self.nstring()
            # RFC 2971 section 3.3: at most 30 pairs, fields up to 30 octets, values 1024.
            if len(pairs) >= 30 or len(key) > 30 or (value is not None and len(value) > 1024):
                raise ClientProtocolError("ID parameters exceed RFC 2971 limits")
            pairs.append((key.decode("utf-8", "replace"),
                          None if value is None else value.decode("utf-8", "replace")))
            if self.peek() == b")":
                break
            self.space()
        self._pos += 1
        return tuple(pairs)


def quoted(value: bytes) -> bytes | None:
    """Encode as an IMAP quoted string, or None when only a literal can carry it."""
    if any(b < 0x20 or b > 0x7E for b in value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def response(tag: bytes, status: bytes, text: str, code: str | None = None) -> bytes:
    """One status response line, tagged or untagged ("*")."""
    code_part = f"[{code}] " if code else ""
    # Texts are ours; never reflect raw client bytes into them.
    return tag + b" " + status + b" " + f"{code_part}{text}".encode() + b"\r\n"


# -- the proxy's own untagged lines ---------------------------------------------------------
# Each text exists here once: the pre-login session (imap.py) and the relay's policy
# (relaysession.py) both say them.

#: RFC 5530 UNAVAILABLE: the client should come back later (a drain, a kick, SIGTERM)
BYE_SHUTDOWN = b"* BYE [UNAVAILABLE] Shutting down\r\n"
#: RFC 3501 section 7.1.5: BYE before closing for inactivity
BYE_TIMEOUT = b"* BYE Autologout; idle for too long\r\n"
#: RFC 5530 UNAVAILABLE: the backend went away; reconnect now
BYE_BACKEND_GONE = b"* BYE [UNAVAILABLE] Backend closed the connection\r\n"
#: RFC 3501 section 7.1: an untagged OK is allowed at any time (a keepalive)
STILL_HERE = b"* OK Still here\r\n"

"""Follows a logged-in IMAP session just enough to know what it is doing: sans-IO.

The relay forwards every byte untouched and unbuffered; it shows the same bytes to
a SessionTracker, which cuts both streams into lines and literals (RFC 3501 section
4.3, RFC 7888 for ``{n+}``, RFC 3516 for ``~{n}``) and notes:

- commands in flight (client commands, from their first line to their tagged reply),
- IDLE (RFC 2177): requested, confirmed by "+", ended by DONE and the tagged reply,
- continuation requests: a synchronising literal ``{n}`` (RFC 3501 section 7.5) is only
  sent after the server's "+"; when the server answers the command with a tagged NO or
  BAD instead, the literal never comes. A "+" answers the oldest request still open:
  IDLE, an AUTHENTICATE exchange, or the current command's synchronising literal.
  Non-synchronising literals (``{n+}``, RFC 7888) follow their line at once,
- whether each stream is at a boundary, so the proxy may inject a line of its own
  (``* OK Still here``, ``* BYE``) without splitting a response or a literal,
- COMPRESS (RFC 4978): once both sides compress, the streams are opaque and
  following stops.

Only the first bytes of each line are kept (enough for a tag and a command name)
plus the last few (enough for a literal marker), so memory per session is constant.
"""

from __future__ import annotations

import re
from enum import Enum, auto

#: Bytes kept from the start of a line: a tag and a command name fit easily.
HEAD = 96
#: Bytes kept from the end of a line: a literal marker {n+} with up to 20 digits.
TAIL = 32

_LITERAL = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?\Z")


class Idle(Enum):
    OFF = auto()
    REQUESTED = auto()  # client sent "tag IDLE", no "+" yet
    IDLING = auto()  # server confirmed with "+"
    DONE_SENT = auto()  # client sent DONE, tagged reply pending


class Sasl(Enum):
    """Where an AUTHENTICATE exchange is (RFC 3501 section 6.2.2)."""

    OFF = auto()
    WAITING = auto()  # for the server: a "+" challenge or the tagged reply
    RESPONSE_DUE = auto()  # the client's next line is a response, not a command


class SessionTracker:
    """Both directions of one session; feed it every byte, in order."""

    __slots__ = (
        "opaque", "in_flight", "idle", "idle_tag", "saw_bye", "logout_sent",
        "_compress_tag", "_c_literal", "_c_head", "_c_tail", "_c_partial", "_c_continued",
        "_c_tag", "_c_sync", "_sasl", "_sasl_tag",
        "_s_literal", "_s_head", "_s_tail", "_s_partial", "_s_continued",
    )

    def __init__(self) -> None:
        #: True after COMPRESS: nothing more can be followed
        self.opaque = False
        #: client commands sent whose tagged reply has not come back
        self.in_flight = 0
        self.idle = Idle.OFF
        self.idle_tag = b""
        #: the server sent an untagged BYE (it is closing on its own)
        self.saw_bye = False
        self.logout_sent = False
        self._compress_tag = b""
        self._c_literal = 0
        self._c_head = b""
        self._c_tail = b""
        self._c_partial = False
        self._c_continued = False  # the current command continues after a literal
        #: the tag of the command the client is sending (at most HEAD bytes)
        self._c_tag = b""
        #: synchronising literals of that command announced, whose "+" has not come (a
        #: client that waits, as it must, has at most one)
        self._c_sync = 0
        self._sasl = Sasl.OFF
        self._sasl_tag = b""
        self._s_literal = 0
        self._s_head = b""
        self._s_tail = b""
        self._s_partial = False
        self._s_continued = False  # the current response continues after a literal

    # -- boundaries ----------------------------------------------------------------------

    @property
    def client_at_boundary(self) -> bool:
        """Between two client commands (not inside a line, a literal or a command)."""
        return (not self.opaque and not self._c_partial and not self._c_literal
                and not self._c_continued)

    @property
    def server_at_boundary(self) -> bool:
        """Between two server responses: a line of ours can be inserted here."""
        return (not self.opaque and not self._s_partial and not self._s_literal
                and not self._s_continued)

    @property
    def idling(self) -> bool:
        """In IDLE with nothing else going on: the state a sleeping phone is in."""
        return self.idle is Idle.IDLING and self.in_flight == 1 and self.client_at_boundary

    @property
    def quiet(self) -> bool:
        """No command in flight and both streams at a boundary."""
        return self.in_flight == 0 and self.client_at_boundary and self.server_at_boundary

    # -- client stream -------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.opaque:
            return
        pos, end = 0, len(data)
        while pos < end:
            if self._c_literal:
                taken = min(self._c_literal, end - pos)
                self._c_literal -= taken
                pos += taken
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._c_add(data, pos, end)
                return
            self._c_add(data, pos, newline)
            pos = newline + 1
            self._client_line(self._c_head, self._c_tail)
            self._c_head = self._c_tail = b""
            self._c_partial = False

    def _c_add(self, data: bytes, start: int, stop: int) -> None:
        if start == stop:
            return
        piece = data[start:stop]
        if len(self._c_head) < HEAD:
            self._c_head += piece[: HEAD - len(self._c_head)]
        self._c_tail = (self._c_tail + piece)[-TAIL:]
        self._c_partial = True

    def _client_line(self, head: bytes, tail: bytes) -> None:
        literal = _LITERAL.search(tail)
        starts_command = not self._c_continued
        if literal is not None:
            self._c_literal = int(literal.group(1))
            self._c_continued = True
            if not literal.group(2):
                # Synchronising: the client sends it after the server's "+" only. The
                # bytes are counted as they come (a client that does not wait gets them
                # followed all the same); a tagged reply before the "+" cancels them.
                self._c_sync += 1
        else:
            self._c_continued = False
        if not starts_command:
            return  # the rest of a command whose literal just ended
        if self._sasl is Sasl.RESPONSE_DUE:
            # RFC 3501 section 6.2.2: a line answering a "+" challenge (or "*" to cancel).
            self._sasl = Sasl.WAITING
            return
        if literal is None and not head.strip():
            return  # an empty line is no command (and gets no tagged reply)
        # RFC 2177: while idling the client's only line is DONE.
        if (self.idle is Idle.IDLING or self.idle is Idle.REQUESTED) \
                and head.rstrip(b"\r").upper() == b"DONE":
            self.idle = Idle.DONE_SENT
            return
        tag, _, rest = head.partition(b" ")
        command = rest.split(b" ", 1)[0].rstrip(b"\r").upper()
        self._c_tag = tag
        self.in_flight += 1
        if command == b"IDLE":
            self.idle = Idle.REQUESTED
            self.idle_tag = tag
        elif command == b"AUTHENTICATE":
            self._sasl = Sasl.WAITING
            self._sasl_tag = tag
        elif command == b"COMPRESS":
            self._compress_tag = tag
        elif command == b"LOGOUT":
            self.logout_sent = True

    # -- server stream -------------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        if self.opaque:
            return
        pos, end = 0, len(data)
        while pos < end:
            if self._s_literal:
                taken = min(self._s_literal, end - pos)
                self._s_literal -= taken
                pos += taken
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._s_add(data, pos, end)
                return
            self._s_add(data, pos, newline)
            pos = newline + 1
            head, tail = self._s_head, self._s_tail
            self._s_head = self._s_tail = b""
            self._s_partial = False
            self._server_line(head, tail)
            if self.opaque:
                return

    def _continuation(self) -> None:
        """A "+" answers the oldest open request. The current command's literal is the
        newest: IDLE and AUTHENTICATE were whole commands sent before it."""
        if self.idle is Idle.REQUESTED:
            self.idle = Idle.IDLING
        elif self._sasl is Sasl.WAITING:
            self._sasl = Sasl.RESPONSE_DUE
        elif self._c_sync:
            self._c_sync -= 1

    def _s_add(self, data: bytes, start: int, stop: int) -> None:
        if start == stop:
            return
        piece = data[start:stop]
        if len(self._s_head) < HEAD:
            self._s_head += piece[: HEAD - len(self._s_head)]
        self._s_tail = (self._s_tail + piece)[-TAIL:]
        self._s_partial = True

    def _server_line(self, head: bytes, tail: bytes) -> None:
        literal = _LITERAL.search(tail)
        continued = self._s_continued
        self._s_continued = literal is not None
        if literal is not None:
            self._s_literal = int(literal.group(1))
        if continued:
            return  # the rest of a response whose literal just ended
        if head.startswith(b"+"):
            self._continuation()
            return
        tag, _, rest = head.partition(b" ")
        if tag == b"*":
            if rest[:4].upper() == b"BYE " or rest.rstrip(b"\r").upper() == b"BYE":
                self.saw_bye = True
            return
        status = rest.split(b" ", 1)[0].rstrip(b"\r").upper()
        if status not in (b"OK", b"NO", b"BAD"):
            return
        if self.in_flight:
            self.in_flight -= 1
        if self._c_sync and tag == self._c_tag:
            # The command is over before its "+": the literal it announced is never sent
            # (RFC 3501 section 7.5), and neither is the rest of the command.
            self._c_sync = 0
            self._c_literal = 0
            self._c_continued = False
        if self._sasl is not Sasl.OFF and tag == self._sasl_tag:
            self._sasl = Sasl.OFF
            self._sasl_tag = b""
        if tag == self.idle_tag and self.idle is not Idle.OFF:
            self.idle = Idle.OFF
            self.idle_tag = b""
        if self._compress_tag and tag == self._compress_tag:
            self._compress_tag = b""
            if status == b"OK":
                # RFC 4978 section 3: compression starts right after this response.
                self.opaque = True

# -*- test-case-name: tests.test_sievetracker -*-
"""Follows a logged-in ManageSieve session just enough to know when it is quiet: sans-IO.

The ManageSieve counterpart of tracker.py and pop3tracker.py, for the same reason: a
drain or a kick may end a session only between commands, never in the middle of a
PUTSCRIPT. ManageSieve is strict request and response (RFC 5804 section 1.2): every
command gets exactly one final OK, NO or BYE (section 1.3); everything else the
server sends (capability lines, LISTSCRIPTS lines, a GETSCRIPT literal) comes before
it. Both streams are lines whose last bytes may announce a literal, ``{n}`` or
``{n+}`` (section 4), whose octets are skipped unread, so memory per session is
constant whatever the scripts' size. During an AUTHENTICATE (after UNAUTHENTICATE,
section 2.14) the client's messages are SASL responses, not commands.

The interface is tracker.SessionTracker's (the relay uses either): ManageSieve has no
IDLE and no COMPRESS.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Bytes kept from the start of a message: a command name or a status is short.
HEAD = 16
#: Bytes kept from the end of a line: enough for the longest literal marker,
#: "{" 20 digits "+}" CR.
TAIL = 26
#: Commands in flight counted at most; past it the session is never quiet.
MAX_PENDING = 1024

_MARKER = re.compile(rb"\{(\d{1,20})\+?\}\r?$")


class _Stream:
    """One direction: cuts messages (lines with literals) without keeping them."""

    __slots__ = ("head", "tail", "inside", "literal")

    def __init__(self) -> None:
        self.head = b""
        self.tail = b""
        #: part of a message has been seen, not its end
        self.inside = False
        #: octets of a literal still to skip
        self.literal = 0

    def feed(self, data: bytes, on_message: Callable[[bytes], None]) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.literal:
                taken = min(self.literal, end - pos)
                self.literal -= taken
                pos += taken
                continue
            self.inside = True
            newline = data.find(b"\n", pos)
            line_end = end if newline < 0 else newline
            if len(self.head) < HEAD:
                self.head += data[pos:min(line_end, pos + HEAD - len(self.head))]
            self.tail = (self.tail + data[max(pos, line_end - TAIL):line_end])[-TAIL:]
            if newline < 0:
                return
            pos = newline + 1
            marker = _MARKER.search(self.tail)
            self.tail = b""
            if marker is not None:
                # The message goes on after the literal; its head stays the first line's.
                self.literal = int(marker.group(1))
                continue
            head, self.head = self.head, b""
            self.inside = False
            on_message(head)

    @property
    def at_boundary(self) -> bool:
        return not self.inside and not self.literal


class SieveTracker:
    """Both directions of one ManageSieve session; feed it every byte, in order."""

    __slots__ = ("pending", "logout_sent", "saw_bye", "overflowed", "_client", "_server",
                 "_sasl")

    #: interface of tracker.SessionTracker: ManageSieve has neither
    opaque = False
    idling = False

    def __init__(self) -> None:
        #: commands sent and not yet answered with OK, NO or BYE
        self.pending = 0
        #: the client sent LOGOUT (the backend answers OK and closes, section 2.3)
        self.logout_sent = False
        #: the backend said BYE: it is closing
        self.saw_bye = False
        self.overflowed = False
        self._client = _Stream()
        self._server = _Stream()
        #: an AUTHENTICATE is in flight: client messages are SASL responses
        self._sasl = False

    @property
    def in_flight(self) -> int:
        return self.pending

    @property
    def client_at_boundary(self) -> bool:
        return self._client.at_boundary

    @property
    def server_at_boundary(self) -> bool:
        return self._server.at_boundary

    @property
    def quiet(self) -> bool:
        """No command awaiting its answer, and both streams between messages."""
        return (not self.pending and not self.overflowed and self.client_at_boundary
                and self.server_at_boundary)

    def from_client(self, data: bytes) -> None:
        self._client.feed(data, self._client_message)

    def from_server(self, data: bytes) -> None:
        self._server.feed(data, self._server_message)

    def _client_message(self, head: bytes) -> None:
        if self._sasl:
            return  # a SASL response (RFC 5804 section 2.1), answered by the same OK/NO
        words = head.split(None, 1)
        if not words:
            return  # an empty line is no command
        name = words[0].upper()
        if name == b"LOGOUT":
            self.logout_sent = True
        elif name == b"AUTHENTICATE":
            self._sasl = True
        if self.pending >= MAX_PENDING:
            self.overflowed = True
            return
        self.pending += 1

    def _server_message(self, head: bytes) -> None:
        words = head.split(None, 1)
        status = words[0].upper() if words else b""
        if status not in (b"OK", b"NO", b"BYE"):
            return  # a capability or script line, a literal, a SASL challenge
        if status == b"BYE":
            self.saw_bye = True
        self._sasl = False
        if self.pending:
            self.pending -= 1

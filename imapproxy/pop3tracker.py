# -*- test-case-name: tests.test_pop3tracker -*-
"""Follows a logged-in POP3 session just enough to know when it is quiet: sans-IO.

The POP3 counterpart of tracker.py, for the same reason: a drain or a kick may end a
session only between commands, never in the middle of a RETR. POP3 is strict
request and response (RFC 1939 section 3), pipelined or not (RFC 2449 section 6.6),
and the server never speaks unprompted, so one queue of commands awaiting their
reply says it all. A reply is one status line, or, after ``+OK`` to a command that
lists something, more lines up to a lone "." (RFC 1939 section 3, dot-stuffed).

Only the first bytes of each line are looked at, so memory per session is constant
whatever the messages' size. The interface is tracker.SessionTracker's (the relay
uses either): POP3 has no IDLE, no COMPRESS, no BYE.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: Bytes kept from the start of a line: a command name and a status are short.
HEAD = 16
#: Commands in flight remembered at most; a client pipelining more than this is not
#: waiting for replies, and its session is never quiet anyway.
MAX_PENDING = 1024

#: Commands whose +OK reply is multi-line (RFC 1939 sections 5 and 7, RFC 2449 section
#: 5): always, or only without an argument (LIST and UIDL of one message are one line).
_MULTI_ALWAYS = frozenset({b"RETR", b"TOP", b"CAPA"})
_MULTI_WITHOUT_ARGUMENT = frozenset({b"LIST", b"UIDL", b"AUTH"})


class Pop3Tracker:
    """Both directions of one POP3 session; feed it every byte, in order."""

    __slots__ = ("pending", "logout_sent", "_c_head", "_c_partial", "_s_head",
                 "_s_partial", "_s_body", "overflowed")

    #: interface of tracker.SessionTracker: POP3 has none of these
    opaque = False
    idling = False
    saw_bye = False

    def __init__(self) -> None:
        #: for each command sent and not yet answered: does its +OK bring a body?
        self.pending: deque[bool] = deque()
        #: the client sent QUIT (the backend now commits deletions and closes)
        self.logout_sent = False
        self.overflowed = False
        self._c_head = b""
        self._c_partial = False
        self._s_head = b""
        self._s_partial = False
        #: inside a multi-line reply, up to its "." line
        self._s_body = False

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    @property
    def client_at_boundary(self) -> bool:
        return not self._c_partial

    @property
    def server_at_boundary(self) -> bool:
        return not self._s_partial and not self._s_body

    @property
    def quiet(self) -> bool:
        """No command awaiting its reply, and both streams between lines."""
        return (not self.pending and not self.overflowed and self.client_at_boundary
                and self.server_at_boundary)

    # -- client stream -------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self._c_head, self._c_partial = self._lines(data, self._c_head, self._c_partial,
                                                    self._client_line)

    def _client_line(self, head: bytes) -> None:
        keyword, _, argument = head.rstrip(b"\r").partition(b" ")
        name = keyword.upper()
        if not name:
            return  # an empty line is no command; servers answer nothing (or -ERR)
        if name == b"QUIT":
            self.logout_sent = True
        multi = name in _MULTI_ALWAYS or (name in _MULTI_WITHOUT_ARGUMENT
                                          and not argument.strip())
        if len(self.pending) >= MAX_PENDING:
            self.overflowed = True
            return
        self.pending.append(multi)

    # -- server stream -------------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        self._s_head, self._s_partial = self._lines(data, self._s_head, self._s_partial,
                                                    self._server_line)

    def _server_line(self, head: bytes) -> None:
        line = head.rstrip(b"\r")
        if self._s_body:
            if line == b".":  # the end of a multi-line reply; ".." is a stuffed dot
                self._s_body = False
                self._answered()
            return
        status = line.split(b" ", 1)[0].upper()
        if status == b"+OK":
            if self.pending and self.pending[0]:
                self._s_body = True
            else:
                self._answered()
        elif status == b"-ERR":
            self._answered()
        # A "+ " continuation (SASL) or anything else answers nothing.

    def _answered(self) -> None:
        if self.pending:
            self.pending.popleft()

    # -- lines ---------------------------------------------------------------------------

    @staticmethod
    def _lines(data: bytes, head: bytes, partial: bool,
               on_line: Callable[[bytes], None]) -> tuple[bytes, bool]:
        """Cut ``data`` into lines, calling ``on_line(first bytes)`` for each one ended."""
        pos, end = 0, len(data)
        while pos < end:
            newline = data.find(b"\n", pos)
            if newline < 0:
                if len(head) < HEAD:
                    head += data[pos:pos + HEAD - len(head)]
                return head, True
            if len(head) < HEAD:
                head += data[pos:min(newline, pos + HEAD - len(head))]
            on_line(head)
            head, pos = b"", newline + 1
        return head, partial and pos == 0

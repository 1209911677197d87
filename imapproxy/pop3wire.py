"""POP3 framing, shared by the front end (pop3.py) and the backend dialogue (pop3backend.py).

Pure bytes, no I/O: ``LineReader`` cuts a stream into bounded CRLF lines (RFC 1939
section 3) and ``reply`` renders one status line (RFC 1939 section 3, RFC 2449 section 8).
"""

from __future__ import annotations

#: RFC 2449 section 4: a command line is at most 255 octets with its CRLF. We allow
#: Limits.max_line (8 KiB by default) instead: RFC 5034 section 4 lets SASL response
#: lines grow past 255 octets, and a generous limit costs nothing while still bounded.
RFC_COMMAND_LINE = 255


class LineTooLong:
    """The line being read exceeded the limit; it is being skipped up to its LF."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()


class LineReader:
    """Cuts a byte stream into lines (RFC 1939 section 3: CRLF-terminated), bounded.

    A bare LF ends a line too (lenient, as common servers are). A line of more than
    ``max_line`` octets (without its CRLF) yields one ``LINE_TOO_LONG`` and the rest of it
    is dropped, so the stream stays in sync and at most ``max_line + 1`` octets are held.
    """

    __slots__ = ("max_line", "_buffer", "_skipping")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | LineTooLong | None:
        """The next line without its line end, LINE_TOO_LONG, or None for "need data"."""
        while True:
            end = self._buffer.find(b"\n")
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                # One octet of slack: the CR of a line of exactly max_line octets.
                if len(self._buffer) > self.max_line + 1:
                    self._buffer.clear()
                    self._skipping = True
                    return LINE_TOO_LONG
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                return LINE_TOO_LONG
            return line

    def take_buffer(self) -> bytes:
        """Everything fed but not yet returned as a line (h11's trailing_data)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def discard(self) -> None:
        self._buffer.clear()
        self._skipping = False


def reply(ok: bool, text: str, code: str | None = None) -> bytes:
    """One status line: ``+OK text`` or ``-ERR [CODE] text`` (RFC 2449 section 8)."""
    code_part = f"[{code}] " if code else ""
    # Texts are ours or a backend's; control characters would let one reply forge another.
    clean = "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in code_part + text)
    return (b"+OK " if ok else b"-ERR ") + clean.encode("utf-8") + b"\r\n"

"""A blocking IMAP/POP3/ManageSieve client that measures how its session ends.

Used by the session-end tests: it connects in one of the four listener modes (IMAP
STARTTLS, IMAPS, POP3 STLS, POP3S, or plain), logs in, and then waits for the
connection to end, recording when the last byte came and when EOF came: first as
the TLS layer reports it (close_notify or FIN), then on the TCP socket itself, so a
server that sends close_notify but keeps TCP open is caught.

It never closes or answers first: like mbsync after LOGOUT, it waits for the server.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass

#: listener modes: (protocol, tls)
MODES = {
    "imap-starttls": ("imap", "starttls"),
    "imaps": ("imap", "implicit"),
    "pop3-stls": ("pop3", "starttls"),
    "pop3s": ("pop3", "implicit"),
    "imap-plain": ("imap", "none"),
    "pop3-plain": ("pop3", "none"),
    "sieve-starttls": ("managesieve", "starttls"),
    "sieves": ("managesieve", "implicit"),
}


@dataclass
class Ending:
    """How a session ended, as the client saw it."""

    #: everything received after the mark (see mark())
    data: bytes
    #: seconds from the last byte received to EOF as the client's reads report it
    eof_after_last_byte: float
    #: seconds from the last byte received to the TCP FIN (None: no TLS, same as above)
    tcp_eof_after_last_byte: float


class EndClient:
    """One client connection; blocking, with a generous per-read timeout."""

    def __init__(self, mode: str, port: int, ca_path: str, timeout: float = 10.0,
                 host: str = "127.0.0.1") -> None:
        self.protocol, self.tls = MODES[mode]
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=ca_path)
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock: socket.socket = raw
        self._buffer = b""
        self._received = b""
        self.last_byte_at = time.monotonic()
        if self.tls == "implicit":
            self._wrap()
        # ManageSieve greets with its capability list, then OK (RFC 5804 section 1.7).
        self.greeting = (self.readline() if self.protocol != "managesieve"
                         else b"".join(self.response()))
        if self.tls == "starttls":
            if self.protocol == "managesieve":
                assert self.command(b"STARTTLS", b"")[-1].startswith(b"OK")
            elif self.protocol == "imap":
                self.command(b"s0 STARTTLS", b"s0 ")
            else:
                self.send(b"STLS\r\n")
                assert self.readline().startswith(b"+OK")
            self._wrap()
            if self.protocol == "managesieve":
                self.response()  # the capabilities again (RFC 5804 section 2.2)

    def _wrap(self) -> None:
        self.sock = self._context.wrap_socket(self.sock, server_hostname="localhost")

    # -- lines ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if chunk:
            self.last_byte_at = time.monotonic()
            self._received += chunk
        return chunk

    def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self._recv()
            if not chunk:
                raise ConnectionError(f"closed; buffered {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def response(self) -> list[bytes]:
        """ManageSieve: lines up to the OK, NO or BYE that ends a response (no literals)."""
        lines = []
        while not (lines and lines[-1].split(b" ", 1)[0].strip() in (b"OK", b"NO", b"BYE")):
            lines.append(self.readline())
        return lines

    def command(self, line: bytes, until: bytes) -> list[bytes]:
        """Send ``line``; read lines up to one starting with ``until`` (included)."""
        self.send(line + b"\r\n")
        lines = []
        while True:
            reply = self.readline()
            lines.append(reply)
            if reply.startswith(until):
                return lines

    # -- sessions ---------------------------------------------------------------------

    def login(self, user: str, password: str) -> None:
        """Log in (IMAP LOGIN with quoted strings / POP3 USER and PASS) and check OK."""
        if self.protocol == "managesieve":
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            self.send(f'AUTHENTICATE "PLAIN" "{token}"\r\n'.encode())
            reply = self.response()
            assert reply[-1].startswith(b"OK"), reply
            self.send(b"LISTSCRIPTS\r\n")
            reply = self.response()
            assert reply[-1].startswith(b"OK"), reply
        elif self.protocol == "imap":
            quoted = password.replace("\\", "\\\\").replace('"', '\\"')
            reply = self.command(f'a1 LOGIN "{user}" "{quoted}"'.encode(), b"a1 ")
            assert reply[-1].startswith(b"a1 OK"), reply
            reply = self.command(b"a2 SELECT INBOX", b"a2 ")
            assert reply[-1].startswith(b"a2 OK"), reply
        else:
            assert self.command(f"USER {user}".encode(), b"")[-1].startswith(b"+OK")
            reply = self.command(f"PASS {password}".encode(), b"")
            assert reply[-1].startswith(b"+OK"), reply
            assert self.command(b"STAT", b"")[-1].startswith(b"+OK")

    def idle(self) -> None:
        """IMAP: enter IDLE (RFC 2177) and wait for the continuation."""
        assert self.command(b"i1 IDLE", b"+")[-1].startswith(b"+")

    def mark(self) -> None:
        """Start collecting what arrives from here on."""
        self._received = self._buffer

    # -- the end ----------------------------------------------------------------------

    def wait_end(self, timeout: float = 15.0) -> Ending:
        """Read until EOF (never sending anything) and time it; raises on timeout."""
        self.sock.settimeout(timeout)
        while self._recv():
            pass
        eof_at = time.monotonic()
        tcp_eof_at = eof_at
        if isinstance(self.sock, ssl.SSLSocket):
            # The TLS layer reports EOF on the peer's close_notify. The TCP connection
            # must end too without our answering it: read the socket beneath TLS.
            try:
                while socket.socket.recv(self.sock, 65536):
                    pass
            except ConnectionResetError:
                pass
            tcp_eof_at = time.monotonic()
        return Ending(self._received, eof_at - self.last_byte_at, tcp_eof_at - self.last_byte_at)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

"""A raw IMAP client for tests that need exact control of the bytes on the wire."""

from __future__ import annotations

import socket
import ssl


class RawImap:
    """Send exact bytes; read lines until a tagged reply."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                 timeout: float = 10.0, source: str | None = None) -> None:
        # ``source``: connect from this local address (e.g. 127.0.0.2, to tell a client
        # from the proxies and load balancers that all run on 127.0.0.1).
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        self.sock: socket.socket = (tls.wrap_socket(sock, server_hostname="localhost")
                                    if tls else sock)
        self._buffer = b""
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line + b"\r\n"

    def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def until_tagged(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged reply for ``tag``."""
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def starttls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (after any buffered lines)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buffer += chunk
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()

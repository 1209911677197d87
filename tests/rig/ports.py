"""Free TCP ports for child daemons."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks the port; we close the socket before the daemon binds it, so
    there is a small race with other processes. Daemons we start set SO_REUSEADDR,
    so TIME_WAIT leftovers from an earlier user of the port do not matter.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port

"""Free TCP ports for child daemons."""

from __future__ import annotations

import socket

#: every port handed out in this test process: never handed out twice. The kernel may
#: well pick the same free port for two calls in a row (nothing is bound to it yet),
#: and two listeners of one proxy on one port fail in confusing ways.
_GIVEN: set[int] = set()


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago, and that no earlier call
    of this process returned.

    The kernel picks the port; we close the socket before the daemon binds it, so
    there is a small race with other processes. Daemons we start set SO_REUSEADDR,
    so TIME_WAIT leftovers from an earlier user of the port do not matter.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A free port whose next one is free too (worker 1's address is port + 1), neither
    handed out before."""
    while True:
        port = free_port(host)
        if port < 65535 and port + 1 not in _GIVEN and _bindable(host, port + 1):
            _GIVEN.add(port + 1)
            return port

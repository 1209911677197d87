"""What the proxy tells its supervisor: readiness for systemd, the stack in the start line.

Readiness is sd_notify(3), for the ``Type=notify`` unit (conf/imapproxy.service).

systemd names a datagram socket in ``$NOTIFY_SOCKET``; the service sends newline-separated
``KEY=VALUE`` assignments to it: ``READY=1`` once it serves (``systemctl start`` returns
then, not before), ``STOPPING=1`` when it begins to shut down, ``STATUS=...`` for
``systemctl status``. Without the variable (not under systemd, or another ``Type=``)
nothing is sent. A name starting with ``@`` is in the abstract namespace: the ``@`` stands
for the leading NUL byte (sd_notify(3), "Notes").
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.application import service
from twisted.copyright import version as twisted_version
from twisted.logger import Logger

if TYPE_CHECKING:
    from .config import Listener

log = Logger(namespace="imapproxy")

#: Seconds a send may block: systemd reads at once, and a stuck manager must not stall
#: the start or the drain for long.
SEND_TIMEOUT = 5.0


def socket_address(environ: Mapping[str, str]) -> str | None:
    """The address in $NOTIFY_SOCKET, in the form socket.connect takes; None if unusable."""
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # Unset, or a form this module does not speak (systemd 254+ also passes vsock:...).
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; True if it was sent. Never raises: readiness is advisory."""
    address = socket_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warn("systemd notification {message!r} not sent: {error}",
                 message=message.split("\n", 1)[0], error=e)
        return False
    return True


def stack() -> str:
    """What runs the proxy, for the start-up line: the TLS memory per session depends on it."""
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return f"Python {sys.version.split()[0]}, Twisted {twisted_version}, {openssl}"


def serving(listeners: Iterable[Listener]) -> str:
    """The STATUS= text once ready: what the proxy listens on."""
    parts = []
    for listener in listeners:
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        header = ", PROXY header" if listener.proxy_protocol else ""
        parts.append(f"{listener.protocol} on {host}:{listener.port} ({listener.tls}{header})")
    return "serving " + ", ".join(parts)


def listener_failed(child: Any) -> bool:
    """True if a listening service of the tree could not bind.

    StreamServerEndpointService logs a failed listen and carries on; its Deferred then
    holds None instead of the port (ReusePortService raises instead, ending the start).
    """
    waiting = getattr(child, "_waitingForPort", None)
    return waiting is not None and waiting.called and waiting.result is None


class ReadyNotifier(service.Service):
    """Added last to the service tree, so started after every listener has bound (twistd
    binds in privilegedStartService, before any startService) and stopped first, as the
    shutdown and the drain begin."""

    def __init__(self, status: str, environ: Mapping[str, str] | None = None,
                 systemd: bool = True) -> None:
        self.status = status
        self.environ = environ
        #: tell systemd (the main process only; workers just keep ``serving``)
        self.systemd = systemd
        #: every listener is up and the process is not stopping (GET /readyz)
        self.serving = False

    def startService(self) -> None:  # noqa: N802
        super().startService()
        siblings = list(self.parent) if self.parent is not None else []
        if any(listener_failed(child) for child in siblings):
            # No READY=1: systemd fails the start after TimeoutStartSec instead of
            # reporting a proxy that does not serve as running.
            log.critical("not ready: a listener could not bind (see the error above)")
            if self.systemd:
                notify("STATUS=a listener could not bind", self.environ)
            return
        self.serving = True
        if self.systemd:
            notify(f"READY=1\nSTATUS={self.status}", self.environ)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.serving = False
        if self.systemd:
            notify("STOPPING=1\nSTATUS=draining sessions", self.environ)

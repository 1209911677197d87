"""The post-login byte pump between a client and its backend.

Bytes pass through untouched and unbuffered, with backpressure both ways (as in
twisted.protocols.portforward). Beside them a SessionTracker follows the IMAP
stream, so the relay knows when a session idles (timeouts, keepalives), when it
is safe to add a line of our own (BYE), and how to end it without losing anything
(drain). POP3 sessions get a Pop3Tracker (pop3tracker.py), which knows when they are
between commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger

from .imap import BYE_SHUTDOWN
from .pop3tracker import Pop3Tracker
from .tracker import SessionTracker

log = Logger(namespace="imapproxy")

#: RFC 5530 UNAVAILABLE: the client should come back later (here: reconnect now).
BYE_BACKEND_GONE = b"* BYE [UNAVAILABLE] Backend closed the connection\r\n"
BYE_TIMEOUT = b"* BYE Autologout; idle for too long\r\n"
STILL_HERE = b"* OK Still here\r\n"
#: our own tag for the LOGOUT the proxy sends when it ends a session itself
DRAIN_TAG = b"PXYDRAIN"


@dataclass(frozen=True, slots=True)
class Lines:
    """What the proxy itself may say in a relayed session of one protocol (None: nothing)."""

    #: to the client, before closing an inactive session
    timeout: bytes | None
    #: to the client, when a drain or a kick ends the session
    shutdown: bytes | None
    #: to the client, when the backend went away
    backend_gone: bytes | None
    #: to an idling client, now and then
    keepalive: bytes | None
    #: to the backend, when the proxy ends the session itself
    logout: bytes | None


IMAP_LINES = Lines(BYE_TIMEOUT, BYE_SHUTDOWN, BYE_BACKEND_GONE, STILL_HERE,
                   DRAIN_TAG + b" LOGOUT\r\n")
#: A POP3 server never speaks unprompted (RFC 1939 section 3): nothing can be added to
#: the stream. And never QUIT for the client: that would commit its deletions (RFC 1939
#: section 6); a closed connection leaves the maildrop as it was.
POP3_LINES = Lines(None, None, None, None, None)


#: transports write_now may send on directly (exact types: subclasses may differ)
PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """Write, sending at once when nothing is queued on a plain TCP transport.

    Twisted's write() only queues; the send happens on the reactor's next turn, once
    epoll reports the socket writable. On the relay's hot path that turn is pure
    latency (one per hop, two per round trip), so when the queue is empty we send
    right away and queue only what the kernel did not take. TLS transports (and
    anything else) keep the ordinary path.
    """
    if type(transport) not in PLAIN_TCP or (
            transport.TLS  # after startTLS the same transport encrypts inside write()
            or len(transport.dataBuffer) > transport.offset or transport._tempDataLen
            or transport.disconnecting or not transport.connected):
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if isinstance(sent, Exception) or sent < 0:
        transport.write(data)  # the reactor's next write attempt reports the error
    elif sent < len(data):
        transport.write(data[sent:])


class Relay:
    """One relayed session: the two transports, the tracker and the clock readings."""

    __slots__ = ("client", "backend", "tracker", "lines", "clock", "last_client",
                 "last_server", "draining", "detached", "client_paused", "opaque_noted",
                 "logout_sent")

    def __init__(self, client: Any, backend: Any, clock: Any, imap: bool) -> None:
        self.client = client  # the FrontendProtocol
        self.backend = backend  # the BackendProtocol
        self.tracker: SessionTracker | Pop3Tracker = SessionTracker() if imap else Pop3Tracker()
        self.lines = IMAP_LINES if imap else POP3_LINES
        self.clock = clock
        self.last_client = self.last_server = clock.seconds()
        self.draining = False
        #: the client has been sent its last line; what the backend says now is dropped
        self.detached = False
        self.client_paused = False
        self.opaque_noted = False
        #: the proxy sent LOGOUT to the backend: it closes by itself once it has answered
        self.logout_sent = False

    # -- the pump ------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.tracker.from_client(data)
        self.last_client = self.clock.seconds()
        write_now(self.backend.transport, data)
        if self.draining:
            self._drain_step()

    def from_backend(self, data: bytes) -> None:
        if self.detached:
            return
        tracker = self.tracker
        tracker.from_server(data)
        if tracker.opaque and not self.opaque_noted:
            self.opaque_noted = True
            log.info("session id={session_id} compressed (RFC 4978): no longer followed; "
                     "IDLE timeouts, keepalives and graceful drain do not apply to it",
                     session_id=self.client.session_id)
        self.last_server = self.clock.seconds()
        client = self.client
        write_now(client.transport, data)
        client.bytes_to_client += len(data)
        if self.draining:
            self._drain_step()

    def backend_lost(self) -> None:
        """The backend went away: tell the client at once so it reconnects (no silent hang)."""
        tracker, line = self.tracker, self.lines.backend_gone
        if (line is not None and not self.detached and not tracker.saw_bye
                and not tracker.logout_sent and tracker.server_at_boundary):
            self._to_client(line)
        # After the client's LOGOUT or QUIT the backend closing is the normal end.
        self.client.close("logout" if tracker.logout_sent else "backend closed")

    def _to_client(self, line: bytes) -> None:
        self.client.transport.write(line)
        self.client.bytes_to_client += len(line)
        self.last_server = self.clock.seconds()

    # -- the one timer ---------------------------------------------------------------------

    def tick(self, now: float, timeouts: Any) -> None:
        """Timeouts by state and keepalives; called for every session by the registry sweep."""
        tracker, lines = self.tracker, self.lines
        idling = tracker.idling
        limit = timeouts.idle if idling else timeouts.authenticated
        if now - self.last_client >= limit:
            if lines.timeout is not None and tracker.server_at_boundary:
                self._to_client(lines.timeout)
            self.end("idle timeout" if idling else "inactivity timeout")
            return
        if (idling and timeouts.idle_keepalive and lines.keepalive is not None
                and now - self.last_server >= timeouts.idle_keepalive
                and tracker.server_at_boundary):
            # RFC 3501 section 7.1: an untagged OK is allowed at any time.
            self._to_client(lines.keepalive)

    # -- ending ---------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        """Close now: LOGOUT to the backend (so it cleans up), then close both sides."""
        if not self.detached:
            self.detached = True
            self._logout()
        self.client.close(reason)

    def _logout(self) -> None:
        if self.lines.logout is not None:
            self.backend.transport.write(self.lines.logout)
            self.logout_sent = True

    def drain(self) -> None:
        """End the session as soon as nothing would be lost by it."""
        if self.draining:
            return
        self.draining = True
        self._drain_step()

    def _drain_step(self) -> None:
        tracker = self.tracker
        if self.detached or tracker.opaque:
            return
        if tracker.client_at_boundary and not self.client_paused:
            # No new command may start: stop reading the client (and keep the backend's
            # backpressure from resuming it).
            self.client_paused = True
            self.backend.leg.unregister()
            self.client.transport.pauseProducing()
        if tracker.idling:
            # RFC 2177: end IDLE with DONE; the backend's reply to it goes nowhere.
            self.backend.transport.write(b"DONE\r\n")
            self._shut_down()
        elif tracker.quiet:
            self._shut_down()

    def _shut_down(self) -> None:
        self.detached = True
        self._logout()
        if self.lines.shutdown is not None:
            self._to_client(self.lines.shutdown)
        self.client.close("shutdown")

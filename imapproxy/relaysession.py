# -*- test-case-name: tests.test_relaysession -*-
"""What happens in a relayed session besides the bytes themselves: sans-IO.

After login the proxy relays bytes untouched (relay.py pumps them). Beside them this
module decides everything else, from what a tracker (tracker.py for IMAP,
pop3tracker.py for POP3) sees of the two streams:

- timeouts by state: ``[timeouts] idle`` in IDLE (RFC 2177: clients re-IDLE every 29
  minutes), ``authenticated`` otherwise (RFC 3501 section 5.4: at least 30 minutes);
- keepalives to an idling client (``* OK Still here``, RFC 3501 section 7.1: an
  untagged OK is allowed at any time), only between two server responses;
- the backend going away: ``* BYE [UNAVAILABLE]`` at once (RFC 5530), so the client
  reconnects instead of waiting on a dead session;
- a drain or a kick: end the session as soon as nothing would be lost (IDLE gets DONE,
  a command in flight such as an APPEND finishes first), then the proxy's own LOGOUT
  to the backend and a BYE to the client.

It never sees a transport or a clock: every input carries the time, and every answer
is a list of actions (actions.py) that relay.py carries out. The common case, bytes
passing while nothing is decided, answers with an empty tuple and allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Close, Log, PauseClient, SendToBackend, SendToClient
from .config import Timeouts
from .imapwire import BYE_BACKEND_GONE, BYE_SHUTDOWN, BYE_TIMEOUT, STILL_HERE
from .pop3tracker import Pop3Tracker
from .sievetracker import SieveTracker
from .sievewire import BYE_BACKEND_GONE as SIEVE_BACKEND_GONE
from .sievewire import BYE_SHUTDOWN as SIEVE_SHUTDOWN
from .sievewire import BYE_TIMEOUT as SIEVE_TIMEOUT
from .tracker import SessionTracker

#: our own tag for the LOGOUT the proxy sends when it ends a session itself
DRAIN_TAG = b"PXYDRAIN"
#: the answer when there is nothing to do (shared: the hot path allocates nothing)
NOTHING: tuple[()] = ()

RelayAction = SendToClient | SendToBackend | PauseClient | Close | Log


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
#: RFC 5804 section 1.3: BYE tells the client the server is closing, and may come
#: between commands; TRYLATER says to come back. No keepalive: a ManageSieve client
#: waits for nothing unprompted. The proxy's LOGOUT (section 2.3) lets the backend
#: end its side cleanly.
SIEVE_LINES = Lines(SIEVE_TIMEOUT, SIEVE_SHUTDOWN, SIEVE_BACKEND_GONE, None, b"LOGOUT\r\n")

#: listener protocol -> (its tracker, what the proxy may say in it)
PROTOCOLS: dict[str, tuple[type[SessionTracker | Pop3Tracker | SieveTracker], Lines]] = {
    "imap": (SessionTracker, IMAP_LINES),
    "pop3": (Pop3Tracker, POP3_LINES),
    "managesieve": (SieveTracker, SIEVE_LINES),
}


class RelaySession:
    """The policy of one relayed session."""

    __slots__ = ("tracker", "lines", "last_client", "last_server", "draining", "detached",
                 "client_paused", "opaque_noted", "logout_sent")

    def __init__(self, protocol: str, now: float) -> None:
        tracker, self.lines = PROTOCOLS[protocol]
        self.tracker: SessionTracker | Pop3Tracker | SieveTracker = tracker()
        self.last_client = self.last_server = now
        self.draining = False
        #: the client has been sent its last line; what the backend says now is dropped
        self.detached = False
        self.client_paused = False
        self.opaque_noted = False
        #: the proxy sent LOGOUT to the backend: it closes by itself once it has answered
        self.logout_sent = False

    # -- the bytes, as the pump forwards them ------------------------------------------------

    def from_client(self, data: bytes, now: float) -> tuple[RelayAction, ...] | list[RelayAction]:
        """Bytes the client sent (forwarded to the backend before these actions)."""
        self.tracker.from_client(data)
        self.last_client = now
        return self._drain_step() if self.draining else NOTHING

    def from_server(self, data: bytes, now: float) -> tuple[RelayAction, ...] | list[RelayAction]:
        """Bytes the backend sent (forwarded to the client before these actions), unless
        ``detached``: then the pump drops them."""
        tracker = self.tracker
        tracker.from_server(data)
        self.last_server = now
        actions: list[RelayAction] = []
        if tracker.opaque and not self.opaque_noted:
            self.opaque_noted = True
            actions.append(Log("info", "compressed (RFC 4978): no longer followed; IDLE "
                               "timeouts, keepalives and graceful drain do not apply to it"))
        if self.draining:
            actions += self._drain_step()
        return actions or NOTHING

    # -- events ------------------------------------------------------------------------------

    def tick(self, now: float, timeouts: Timeouts) -> list[RelayAction]:
        """Timeouts by state and keepalives (the registry's one timer, for every session)."""
        if self.detached:
            # The client has had its last line (RFC 3501 section 7.1.5: BYE is the
            # server's last word); the leg's own deadline ends the close.
            return []
        tracker, lines = self.tracker, self.lines
        idling = tracker.idling
        limit = timeouts.idle if idling else timeouts.authenticated
        if now - self.last_client >= limit:
            actions: list[RelayAction] = []
            if lines.timeout is not None and tracker.server_at_boundary:
                actions.append(self._to_client(lines.timeout, now))
            return actions + self.end("idle timeout" if idling else "inactivity timeout")
        if (idling and timeouts.idle_keepalive and lines.keepalive is not None
                and now - self.last_server >= timeouts.idle_keepalive
                and tracker.server_at_boundary):
            return [self._to_client(lines.keepalive, now)]
        return []

    def backend_lost(self) -> list[RelayAction]:
        """The backend went away: tell the client at once so it reconnects (no silent hang)."""
        tracker, line = self.tracker, self.lines.backend_gone
        actions: list[RelayAction] = []
        if (line is not None and not self.detached and not tracker.saw_bye
                and not tracker.logout_sent and tracker.server_at_boundary):
            actions.append(SendToClient(line))
        # After the client's LOGOUT or QUIT the backend closing is the normal end.
        actions.append(Close("logout" if tracker.logout_sent else "backend closed"))
        return actions

    def end(self, reason: str) -> list[RelayAction]:
        """End now: the proxy's LOGOUT to the backend (so it cleans up), then close."""
        actions: list[RelayAction] = []
        if not self.detached:
            self.detached = True
            actions += self._logout()
        actions.append(Close(reason))
        return actions

    def drain(self) -> list[RelayAction]:
        """End the session as soon as nothing would be lost by it (a drain, a kick)."""
        if self.draining:
            return []
        self.draining = True
        return self._drain_step()

    # -- inside --------------------------------------------------------------------------------

    def _to_client(self, line: bytes, now: float) -> SendToClient:
        self.last_server = now  # a line of ours counts as the server speaking
        return SendToClient(line)

    def _logout(self) -> list[RelayAction]:
        tracker = self.tracker
        if self.lines.logout is None or tracker.opaque:
            # Nothing in plain text can go into a compressed stream (RFC 4978 section
            # 3): the connection is closed instead, as for POP3.
            return []
        self.logout_sent = True
        if tracker.idling:
            # RFC 2177: in IDLE the server takes nothing but DONE; then the LOGOUT.
            return [SendToBackend(b"DONE\r\n"), SendToBackend(self.lines.logout)]
        return [SendToBackend(self.lines.logout)]

    def _drain_step(self) -> list[RelayAction]:
        tracker = self.tracker
        if self.detached or tracker.opaque:
            return []
        actions: list[RelayAction] = []
        if tracker.client_at_boundary and not self.client_paused:
            # No new command may start: stop reading the client (and keep the backend's
            # backpressure from resuming it).
            self.client_paused = True
            actions.append(PauseClient())
        if tracker.idling:
            # RFC 2177: _logout ends IDLE with DONE; the backend's reply goes nowhere.
            actions += self._shut_down()
        elif tracker.quiet:
            actions += self._shut_down()
        return actions

    def _shut_down(self) -> list[RelayAction]:
        self.detached = True
        actions = self._logout()
        if self.lines.shutdown is not None:
            actions.append(SendToClient(self.lines.shutdown))
        actions.append(Close("shutdown"))
        return actions

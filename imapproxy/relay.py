# -*- test-case-name: tests.test_relay -*-
"""The post-login byte pump between a client and its backend.

Bytes pass through untouched and unbuffered, with backpressure both ways (as in
twisted.protocols.portforward), and are counted. Everything else (timeouts, keepalives,
the drain, the backend going away) is decided by the session's policy
(relaysession.py, sans-IO), which sees the same bytes; the pump carries out what it
asks, in one flat chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from .actions import Close, Log, PauseClient, SendToBackend, SendToClient
from .config import Timeouts
from .relaysession import RelayAction, RelaySession
from .transports import write_now

log = Logger(namespace="imapproxy")


class Relay:
    """One relayed session: the two connections, its policy, the clock."""

    __slots__ = ("client", "backend", "session", "clock")

    def __init__(self, client: Any, backend: Any, clock: Any, protocol: str) -> None:
        self.client = client  # the FrontendProtocol
        self.backend = backend  # the BackendProtocol
        self.session = RelaySession(protocol, clock.seconds())
        self.clock = clock

    @property
    def tracker(self) -> Any:
        """What the session's policy knows of the streams (metrics, admin read it)."""
        return self.session.tracker

    @property
    def logout_sent(self) -> bool:
        return self.session.logout_sent

    # -- the pump ------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        actions = self.session.from_client(data, self.clock.seconds())
        write_now(self.backend.transport, data)
        if actions:
            self._carry_out(actions)

    def from_backend(self, data: bytes) -> None:
        session = self.session
        if session.detached:
            return  # the client has had its last line
        actions = session.from_server(data, self.clock.seconds())
        client = self.client
        write_now(client.transport, data)
        client.bytes_to_client += len(data)
        if actions:
            self._carry_out(actions)

    # -- events, passed to the policy ---------------------------------------------------

    def tick(self, now: float, timeouts: Timeouts) -> None:
        self._carry_out(self.session.tick(now, timeouts))

    def backend_lost(self) -> None:
        self._carry_out(self.session.backend_lost())

    def drain(self) -> None:
        self._carry_out(self.session.drain())

    def end(self, reason: str) -> None:
        self._carry_out(self.session.end(reason))

    def _carry_out(self, actions: Iterable[RelayAction]) -> None:
        client = self.client
        for action in actions:
            if isinstance(action, SendToClient):
                client.transport.write(action.data)
                client.bytes_to_client += len(action.data)
            elif isinstance(action, SendToBackend):
                self.backend.transport.write(action.data)
            elif isinstance(action, PauseClient):
                self.backend.leg.unregister()
                client.transport.pauseProducing()
            elif isinstance(action, Close):
                client.close(action.reason)
            elif isinstance(action, Log):
                getattr(log, action.level)("session id={session_id} {text}",
                                           session_id=client.session_id, text=action.text)

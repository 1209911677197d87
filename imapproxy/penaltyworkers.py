# -*- test-case-name: tests.test_penaltyworkers -*-
"""One brute-force penalty for every worker of a host (``workers = N``), over AMP.

Every worker must see the same penalty, whichever of them a connection lands on: the
main process keeps the one Penalty (penaltygate.LocalGate) and serves it to the others
over a UNIX socket (``GateServerFactory``, AMP), in a directory only this user can
enter. A worker's ``RemoteGate`` asks it; user names travel only as keyed hashes and
passwords never (the workers get the hashing key from the main process). If the main
process cannot be reached, a worker falls back to a penalty of its own, says so once
in the log, and goes back to the shared one when it can. ``process_gate`` gives each
process the gate it uses.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from .errors import LoginsRefused
from .penalty import (
    Outcome,
    Penalty,
)
from .penaltygate import Admission, LocalGate

log = Logger(namespace="imapproxy")

class Hello(amp.Command):
    """A worker connects: the keyed-hash key, so it hashes names as the main process does."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"key", amp.String())]


class Enter(amp.Command):
    """Answered when the attempt may be checked (admitted) or at once if refused."""

    arguments = [(b"attempt", amp.Integer()), (b"address", amp.Unicode()),
                 (b"user", amp.String()),
                 # what other instances learnt (the shared state, redisstate.py)
                 (b"known", amp.Boolean(optional=True)),
                 (b"user_failures", amp.Boolean(optional=True))]
    response = [(b"admitted", amp.Boolean()), (b"reason", amp.Unicode()),
                (b"waited", amp.Float())]


class Leave(amp.Command):
    """The client went away while waiting."""

    arguments = [(b"attempt", amp.Integer())]
    requiresAnswer = False


class Finish(amp.Command):
    arguments = [(b"attempt", amp.Integer()), (b"outcome", amp.Unicode()),
                 (b"fingerprint", amp.String())]
    requiresAnswer = False


class _GateServerProtocol(amp.AMP):
    """The main process's side of one worker's connection."""

    factory: GateServerFactory

    def __init__(self, gate: LocalGate) -> None:
        super().__init__()
        self.gate = gate
        #: the worker's attempt number -> (our Deferred while waiting, our Admission)
        self.attempts: dict[int, Any] = {}

    @Hello.responder
    def hello(self) -> dict[str, bytes]:
        return {"key": self.gate.penalty.key}

    @Enter.responder
    def enter(self, attempt: int, address: str, user: bytes, known: bool | None = None,
              user_failures: bool | None = None) -> defer.Deferred[dict[str, Any]]:
        d = self.gate.enter(address, user, known=bool(known),
                            user_failures=bool(user_failures))
        self.attempts[attempt] = d

        def admitted(admission: Admission) -> dict[str, Any]:
            self.attempts[attempt] = admission
            return {"admitted": True, "reason": "", "waited": admission.waited}

        def refused(failure: Any) -> dict[str, Any]:
            self.attempts.pop(attempt, None)
            if failure.trap(LoginsRefused, defer.CancelledError) is defer.CancelledError:
                # The worker said Leave: it no longer waits for this answer.
                return {"admitted": False, "reason": "left", "waited": 0.0}
            return {"admitted": False, "reason": failure.value.reason, "waited": 0.0}

        return d.addCallbacks(admitted, refused)

    @Leave.responder
    def leave(self, attempt: int) -> dict[str, Any]:
        self._end(attempt, Outcome.NEUTRAL, b"")
        return {}

    @Finish.responder
    def finish(self, attempt: int, outcome: str, fingerprint: bytes) -> dict[str, Any]:
        self._end(attempt, Outcome(outcome), fingerprint)
        return {}

    def _end(self, attempt: int, outcome: Outcome, fingerprint: bytes) -> None:
        state = self.attempts.pop(attempt, None)
        if isinstance(state, Admission):
            state.finish(outcome, fingerprint)
        elif state is not None:
            state.cancel()

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.factory.connections.discard(self)
        for attempt in list(self.attempts):  # the worker is gone: so are its attempts
            self._end(attempt, Outcome.NEUTRAL, b"")


class GateServerFactory(Factory):
    """Serves the main process's LocalGate to the workers (listen on a UNIX socket)."""

    noisy = False

    def __init__(self, gate: LocalGate) -> None:
        self.gate = gate
        self.connections: set[_GateServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> _GateServerProtocol:  # noqa: N802
        protocol = _GateServerProtocol(self.gate)
        protocol.factory = self
        return protocol


class _GateClientProtocol(amp.AMP):
    """A worker's connection to the main process's gate."""

    def __init__(self, gate: RemoteGate) -> None:
        super().__init__()
        self.gate = gate

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.gate.lost(self)


class RemoteGate(Service):
    """A worker's gate: the main process's penalty, or its own while that cannot be had.

    As a service it keeps a connection to the main process, reconnecting when it is lost.
    """

    def __init__(self, reactor: Any, path: str, fallback: LocalGate) -> None:
        self.reactor = reactor
        self.path = path
        self.fallback = fallback
        self._ids = itertools.count(1)
        self._protocol: _GateClientProtocol | None = None
        self._failures = 0
        self._retry: Any = None
        self._said_fallback = False

    @property
    def service(self) -> RemoteGate:
        """The service to add to the tree: the gate itself."""
        return self

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._connect()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.transport.loseConnection()

    def _connect(self) -> None:
        self._retry = None
        endpoint = UNIXClientEndpoint(self.reactor, self.path)
        connectProtocol(endpoint, _GateClientProtocol(self)).addCallback(
            self._connected).addErrback(self._again)

    def _connected(self, protocol: _GateClientProtocol) -> defer.Deferred[None]:
        def keyed(answer: dict[str, bytes]) -> None:
            # The same hashes from either side: and from our own penalty, should we
            # fall back to it.
            self.fallback.penalty.key = answer["key"]
            self._protocol = protocol
            self._failures = 0
            if self._said_fallback:
                log.info("penalty: shared with the main process again")
                self._said_fallback = False
        return protocol.callRemote(Hello).addCallback(keyed)

    def _again(self, failure: Any = None) -> None:
        """Reconnect soon: quickly at first, then every 2 s."""
        if not self.running or self._retry is not None:
            return
        delay = min(2.0, 0.1 * 2 ** self._failures)
        self._failures += 1
        self._retry = self.reactor.callLater(delay, self._connect)

    def lost(self, protocol: _GateClientProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._again()

    @property
    def shared(self) -> bool:
        return self._protocol is not None

    def reconfigure(self, limits: Any) -> None:
        """New settings (SIGHUP reaches every worker): for the penalty counted here while
        the main process cannot be reached; the main process's own applies to all."""
        self.fallback.reconfigure(limits)

    def user_key(self, user: str) -> bytes:
        return self.fallback.user_key(user)

    def fingerprint(self, user: str, password: bytes) -> bytes:
        return self.fallback.fingerprint(user, password)

    def enter(self, address: str, user_key: bytes, *, known: bool = False,
              user_failures: bool = False) -> defer.Deferred[Admission]:
        protocol = self._protocol
        if protocol is None:
            if not self._said_fallback:
                self._said_fallback = True
                log.warn("penalty: the main process cannot be reached; this worker counts "
                         "on its own until it can")
            return self.fallback.enter(address, user_key, known=known,
                                       user_failures=user_failures)
        attempt = next(self._ids)
        waiting = protocol.callRemote(Enter, attempt=attempt, address=address, user=user_key,
                                      known=known, user_failures=user_failures)
        d: defer.Deferred[Admission] = defer.Deferred(
            lambda _d: self._leave(protocol, attempt, waiting))

        def answered(answer: dict[str, Any]) -> None:
            if d.called:
                return
            if answer["admitted"]:
                d.callback(Admission(_RemoteFinish(protocol), attempt, answer["waited"]))
            else:
                d.errback(LoginsRefused(answer["reason"]))

        def failed(failure: Any) -> None:
            # The main process went away while this attempt waited: ask our own.
            if not d.called:
                self.fallback.enter(address, user_key, known=known,
                                    user_failures=user_failures).chainDeferred(d)
        waiting.addCallbacks(answered, failed)
        return d

    @staticmethod
    def _leave(protocol: amp.AMP, attempt: int, waiting: defer.Deferred[Any]) -> None:
        waiting.addErrback(lambda _f: None)
        # No answer is asked for; on a lost connection AMP drops it (and the main
        # process has dropped the attempt already).
        protocol.callRemote(Leave, attempt=attempt)


class _RemoteFinish:
    """What an Admission reports to, for an attempt the main process admitted."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: amp.AMP) -> None:
        self.protocol = protocol

    def finish(self, attempt: int, outcome: Outcome, fingerprint: bytes) -> None:
        self.protocol.callRemote(Finish, attempt=attempt, outcome=outcome.value,
                                 fingerprint=fingerprint)


class _GateServerService(StreamServerEndpointService):
    """Serves the gate to the workers; removes its private directory when stopped."""

    def __init__(self, reactor: Any, directory: str, gate: LocalGate) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "penalty.sock")
        self.server_factory = GateServerFactory(gate)
        super().__init__(UNIXServerEndpoint(reactor, self.path, mode=0o600),
                         self.server_factory)

    def stopService(self) -> Any:  # noqa: N802
        stopped = super().stopService()
        for connection in list(self.server_factory.connections):
            connection.transport.loseConnection()  # the workers count alone from now

        def remove(result: object) -> object:
            shutil.rmtree(self.directory, ignore_errors=True)
            return result
        if isinstance(stopped, defer.Deferred):
            return stopped.addBoth(remove)
        return remove(stopped)


def process_gate(limits: Any, reactor: Any, *, workers: int, worker: bool,
                 socket_path: str | None) -> tuple[Any, Service | None, str | None]:
    """This process's gate, the service it needs running (if any), and the socket path
    the workers are to be given (if any).

    One process: its own. With workers, the main process serves its own to the others
    on a socket in a new private directory, and a worker asks that one.
    """
    local = LocalGate(Penalty.from_limits(limits, reactor.seconds), reactor)
    if workers <= 1:
        return local, None, None
    if worker:
        if socket_path is None:
            log.warn("penalty: no --penalty-socket given to this worker; it counts alone")
            return local, None, None
        remote = RemoteGate(reactor, socket_path, local)
        return remote, remote, None
    server = _GateServerService(reactor, tempfile.mkdtemp(prefix="imapproxy-"), local)
    return local, server, server.path

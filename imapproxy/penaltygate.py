# -*- test-case-name: tests.test_penaltygate -*-
"""The brute-force penalty (penalty.py) on a reactor, in one process or shared by workers.

``LocalGate`` turns the Penalty's admissions into Deferreds: ``enter()`` fires with an
``Admission`` when the attempt may be checked (cancel the Deferred when the client
goes away: the attempt leaves its queue at once), and the session reports what the
check found with ``Admission.finish()``. One timer serves every attempt waiting on a
penalty.

With ``workers = N`` every worker must see the same penalty, whichever of them a
connection lands on: the main process keeps the one Penalty and serves it to the
others over a UNIX socket (``GateServer``, AMP), in a directory only this user can
enter. A worker's ``RemoteGate`` asks it; user names travel only as keyed hashes and
passwords never (the workers get the hashing key from the main process). If the main
process cannot be reached, a worker falls back to a penalty of its own, says so once
in the log, and goes back to the shared one when it can.
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
from .penalty import Outcome, Penalty, Refused

log = Logger(namespace="imapproxy")


class Admission:
    """One admitted attempt: report the outcome of its check exactly once."""

    __slots__ = ("_gate", "attempt", "waited")

    def __init__(self, gate: Any, attempt: int, waited: float) -> None:
        self._gate = gate
        self.attempt = attempt
        #: seconds the attempt waited for its turn
        self.waited = waited

    def finish(self, outcome: Outcome, fingerprint: bytes = b"") -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.finish(self.attempt, outcome, fingerprint)


class LocalGate:
    """The penalty of this process."""

    def __init__(self, penalty: Penalty, clock: Any) -> None:
        self.penalty = penalty
        self.clock = clock
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[defer.Deferred[Admission], float]] = {}
        self._timer: Any = None

    # what sessions use (RemoteGate has the same three)

    def user_key(self, user: str) -> bytes:
        return self.penalty.user_key(user)

    def fingerprint(self, user: str, password: bytes) -> bytes:
        return self.penalty.fingerprint(user, password)

    def enter(self, address: str, user_key: bytes) -> defer.Deferred[Admission]:
        """Fires with an Admission when the attempt may be checked; LoginsRefused if not."""
        attempt = next(self._ids)
        d: defer.Deferred[Admission] = defer.Deferred(lambda _d: self._cancel(attempt))
        self._waiting[attempt] = (d, self.clock.seconds())
        result = self.penalty.submit(attempt, address, user_key)
        if isinstance(result, Refused):
            del self._waiting[attempt]
            d.errback(LoginsRefused(result.reason))
            return d
        self._admit(result)
        return d

    # the rest

    def finish(self, attempt: int, outcome: Outcome, fingerprint: bytes = b"") -> None:
        self._admit(self.penalty.finish(attempt, outcome, fingerprint))

    def reconfigure(self, limits: Any) -> None:
        self.penalty.reconfigure(limits)
        self._admit([])

    def _cancel(self, attempt: int) -> None:
        if self._waiting.pop(attempt, None) is not None:
            self._admit(self.penalty.cancel(attempt))

    def _admit(self, admitted: list[int]) -> None:
        now = self.clock.seconds()
        for attempt in admitted:
            waiting = self._waiting.pop(attempt, None)
            if waiting is not None:
                d, since = waiting
                d.callback(Admission(self, attempt, now - since))
        self._reschedule()

    def _reschedule(self) -> None:
        wakeup = self.penalty.next_wakeup()
        timer = self._timer
        if timer is not None and timer.active():
            if wakeup is not None and timer.getTime() == wakeup:
                return
            timer.cancel()
        self._timer = None
        if wakeup is not None:
            self._timer = self.clock.callLater(max(0.0, wakeup - self.clock.seconds()),
                                               self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._admit(self.penalty.poll())


# -- shared by workers -------------------------------------------------------------------


class Hello(amp.Command):
    """A worker connects: the keyed-hash key, so it hashes names as the main process does."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"key", amp.String())]


class Enter(amp.Command):
    """Answered when the attempt may be checked (admitted) or at once if refused."""

    arguments = [(b"attempt", amp.Integer()), (b"address", amp.Unicode()),
                 (b"user", amp.String())]
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
    def enter(self, attempt: int, address: str, user: bytes) -> defer.Deferred[dict[str, Any]]:
        d = self.gate.enter(address, user)
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

    def enter(self, address: str, user_key: bytes) -> defer.Deferred[Admission]:
        protocol = self._protocol
        if protocol is None:
            if not self._said_fallback:
                self._said_fallback = True
                log.warn("penalty: the main process cannot be reached; this worker counts "
                         "on its own until it can")
            return self.fallback.enter(address, user_key)
        attempt = next(self._ids)
        waiting = protocol.callRemote(Enter, attempt=attempt, address=address, user=user_key)
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
                self.fallback.enter(address, user_key).chainDeferred(d)
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

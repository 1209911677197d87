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

With ``[shared] redis`` set, ``SharedGate`` goes in front of this process's gate
(local, or the main process's for a worker): it asks Redis first (redisstate.py,
sharedstate.py) what every instance learnt of the attempt's address and user, and
for its turn in their penalised lanes; it waits for that turn on the reactor's clock,
then enters the gate behind it, telling it what the other instances know (the user's
known address, the user's failures), and reports the check's end to both. Redis
unavailable, it is the gate behind it alone, as without Redis. Every process talks to
Redis itself, workers included (they count their own sessions there anyway): the
main process's gate still serves the local queues of every worker, so the
parallelism of lanes without failures stays per host, and while Redis is away the
workers still share one penalty.
"""

from __future__ import annotations

import itertools
import os
import secrets
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
    Refused,
    exempt_networks,
    fingerprint,
    is_exempt,
    user_key,
)
from .sharedstate import BUSY, POLL, POLL_MAX, PenaltySettings, Verdict

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

    def enter(self, address: str, user_key: bytes, *, known: bool = False,
              user_failures: bool = False) -> defer.Deferred[Admission]:
        """Fires with an Admission when the attempt may be checked; LoginsRefused if not.
        ``known``, ``user_failures``: what other instances learnt (Penalty.submit)."""
        attempt = next(self._ids)
        d: defer.Deferred[Admission] = defer.Deferred(lambda _d: self._cancel(attempt))
        self._waiting[attempt] = (d, self.clock.seconds())
        result = self.penalty.submit(attempt, address, user_key, known=known,
                                     user_failures=user_failures)
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


# -- shared by instances, through Redis ------------------------------------------------


class SharedGate:
    """The penalty every instance shares through Redis, in front of this process's gate
    (``inner``: a LocalGate, or a worker's RemoteGate). ``state`` is the RedisState;
    while it is off or unavailable, the inner gate alone decides."""

    def __init__(self, inner: Any, state: Any, clock: Any, limits: Any) -> None:
        self.inner = inner
        self.state = state
        self.clock = clock
        self.reconfigure_shared(limits)

    def reconfigure_shared(self, limits: Any) -> None:
        self.exempt = exempt_networks(limits.penalty_exempt)
        self.settings = PenaltySettings.from_limits(limits)

    def reconfigure(self, limits: Any) -> None:
        self.inner.reconfigure(limits)
        self.reconfigure_shared(limits)

    def _key(self) -> bytes | None:
        return self.state.key if self.state is not None else None

    # Names are hashed with the key every instance shares, once it is known (until
    # then, with the inner gate's: such attempts count locally). A login that
    # straddles the moment the key becomes known sends one odd hash to Redis, which
    # expires unused.

    def user_key(self, user: str) -> bytes:
        key = self._key()
        return user_key(key, user) if key is not None else self.inner.user_key(user)  # type: ignore[no-any-return]

    def fingerprint(self, user: str, password: bytes) -> bytes:
        key = self._key()
        if key is not None:
            return fingerprint(key, user, password)
        return self.inner.fingerprint(user, password)  # type: ignore[no-any-return]

    def enter(self, address: str, ukey: bytes) -> defer.Deferred[Admission]:
        """As LocalGate.enter: an Admission once the attempt's turn came on every instance
        and in this process's queues; LoginsRefused if a queue is full."""
        state = self.state
        if state is None or not state.enabled or is_exempt(address, self.exempt):
            return self.inner.enter(address, ukey)  # type: ignore[no-any-return]
        return _SharedAttempt(self, address, ukey).start()


class _SharedAttempt:
    """One attempt through a SharedGate: Redis' answer, the wait for its turn, the inner
    gate's admission; cancelled at any of those steps when the client goes away."""

    def __init__(self, gate: SharedGate, address: str, ukey: bytes) -> None:
        self.gate = gate
        self.address = address
        self.ukey = ukey
        #: names this attempt's turns in Redis
        self.token = secrets.token_hex(8)
        self.settings = gate.settings
        self.d: defer.Deferred[Admission] = defer.Deferred(self._cancel)
        #: the inner gate's admission, while waited for
        self.pending: defer.Deferred[Any] | None = None
        self.timer: Any = None
        #: seconds waited for its turn in Redis
        self.waited = 0.0
        #: turns are held in Redis for it
        self.holds_turns = False
        #: a START is under way (its answer gives the turns back if cancelled meanwhile)
        self.asking = False
        #: seconds before asking START again while an earlier check has not ended
        self.poll = POLL
        self.cancelled = False
        #: what the other instances know (Verdict): for the gate behind this one
        self.known = self.user_failures = False

    def start(self) -> defer.Deferred[Admission]:
        # Not cancelled with the attempt: a LEAVE must follow ENTER's answer, or it
        # could overtake it on another thread and leave its turns held.
        self.gate.state.enter(self.address, self.ukey, self.token,
                              self.settings).addCallback(self._answered)
        return self.d

    def _answered(self, verdict: Verdict | Refused | None) -> None:
        if self.cancelled:
            if isinstance(verdict, Verdict) and verdict.turns:
                self.gate.state.leave(self.address, self.ukey, self.token)
            return
        if verdict is None:  # Redis unavailable: this process's gate alone
            self._enter_inner()
        elif isinstance(verdict, Refused):
            self.d.errback(LoginsRefused(verdict.reason))
        else:
            self.holds_turns = verdict.turns > 0
            self.known, self.user_failures = verdict.known, verdict.user_failures > 0
            if not self.holds_turns:
                self._enter_inner()
            elif verdict.wait > 0:
                self._wait(verdict.wait)
            else:
                self._start()

    def _wait(self, seconds: float) -> None:
        """For the turn (then START)."""
        self.waited += seconds
        self.timer = self.gate.clock.callLater(seconds, self._start)

    def _start(self) -> None:
        """The turn came: may it start? (Not while an earlier check in its lanes runs,
        nor before their penalty since its end: sharedstate.START.)"""
        self.timer = None
        started = self.gate.clock.seconds()

        def answered(wait: float | None) -> None:
            self.asking = False
            if self.cancelled:
                self.gate.state.leave(self.address, self.ukey, self.token)
                return
            self.waited += self.gate.clock.seconds() - started
            if wait == BUSY:  # an earlier check has not ended: ask again, less often
                self._wait(self.poll)
                self.poll = min(POLL_MAX, self.poll * 2)
            elif wait:
                self._wait(wait)
            else:  # now, or Redis unavailable: this process's gate decides the rest
                self._enter_inner()
        self.asking = True
        self.gate.state.start(self.address, self.ukey, self.token).addCallback(answered)

    def _enter_inner(self) -> None:
        self.timer = None
        self.asking = False
        self.pending = self.gate.inner.enter(self.address, self.ukey, known=self.known,
                                             user_failures=self.user_failures)
        self.pending.addCallbacks(self._admitted, self._refused)

    def _admitted(self, admission: Admission) -> None:
        self.pending = None
        finish = _SharedFinish(admission, self.gate.state, self.address, self.ukey,
                               self.token, self.settings)
        self.d.callback(Admission(finish, admission.attempt, self.waited + admission.waited))

    def _refused(self, failure: Any) -> None:
        self.pending = None
        if self.cancelled:
            return
        self._leave()
        self.d.errback(failure)

    def _leave(self) -> None:
        if self.holds_turns and not self.asking:  # (else START's answer does it)
            self.holds_turns = False
            self.gate.state.leave(self.address, self.ukey, self.token)

    def _cancel(self, _d: defer.Deferred[Admission]) -> None:
        self.cancelled = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        self._leave()


class _SharedFinish:
    """What an Admission from a SharedGate reports to: the inner gate, and Redis."""

    __slots__ = ("admission", "state", "address", "ukey", "token", "settings")

    def __init__(self, admission: Admission, state: Any, address: str, ukey: bytes,
                 token: str, settings: PenaltySettings) -> None:
        self.admission = admission
        self.state = state
        self.address = address
        self.ukey = ukey
        self.token = token
        self.settings = settings

    def finish(self, attempt: int, outcome: Outcome, fingerprint: bytes) -> None:
        self.admission.finish(outcome, fingerprint)
        # Also when Redis was not asked at the start (it was away): what was learnt is
        # shared if it can be now.
        self.state.finish(self.address, self.ukey, self.token, outcome.value, fingerprint,
                          self.settings)


# -- shared by workers -------------------------------------------------------------------


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

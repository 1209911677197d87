# -*- test-case-name: tests.test_sharedgate -*-
"""The brute-force penalty shared by every instance through Redis: ``SharedGate``.

With ``[shared] redis`` set, ``SharedGate`` goes in front of this process's gate
(penaltygate.LocalGate, or the main process's for a worker: penaltyworkers.RemoteGate):
it asks Redis first (redisstate.py, sharedstate.py) what every instance learnt of the
attempt's address and user, and for its turn in their penalised lanes; it waits for
that turn on the reactor's clock, then enters the gate behind it, telling it what the
other instances know (the user's known address, the user's failures), and reports the
check's end to both. Redis unavailable, it is the gate behind it alone, as without
Redis. Every process talks to Redis itself, workers included (they count their own
sessions there anyway): the main process's gate still serves the local queues of
every worker, so the parallelism of lanes without failures stays per host, and while
Redis is away the workers still share one penalty.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .errors import LoginsRefused
from .penalty import (
    Outcome,
    Refused,
    exempt_networks,
    fingerprint,
    is_exempt,
    user_key,
)
from .penaltygate import Admission
from .sharedstate import BUSY, POLL, POLL_MAX, PenaltySettings, Verdict

log = Logger(namespace="imapproxy")

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

# -*- test-case-name: tests.test_penaltygate -*-
"""The brute-force penalty (penalty.py) on a reactor: ``LocalGate``, this process's.

``LocalGate`` turns the Penalty's admissions into Deferreds: ``enter()`` fires with an
``Admission`` when the attempt may be checked (cancel the Deferred when the client
goes away: the attempt leaves its queue at once), and the session reports what the
check found with ``Admission.finish()``. One timer serves every attempt waiting on a
penalty.

The same interface (``user_key``, ``fingerprint``, ``enter``, ``reconfigure``) has two
more gates: a worker's ``RemoteGate``, which asks the main process's LocalGate
(penaltyworkers.py, ``workers = N``), and ``SharedGate``, which puts what every
instance learnt, through Redis, in front of either (sharedgate.py, ``[shared] redis``).
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

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

# -*- test-case-name: tests.test_pacinggate -*-
"""Admission pacing (pacing.py) on a reactor: a Deferred per login waiting its turn.

``PacingGate.enter()`` answers at once when the login may go on (the seconds waited:
0.0; or None with pacing off, so that nothing is counted), raises LoginQueueFull when
the queue is full, or returns a Deferred that fires with the seconds waited when the
login's turn comes. Cancelling that Deferred (the client went away, its pre-login
timeout ran out, a drain) takes the login out of the queue at once. One timer serves
every login waiting, set for the first in line.

Each process paces its own logins: with ``workers = N`` every worker has a gate of its
own, and the rate is per worker (the README says so). The rate protects the directory
and the backends from one process's share of a storm; unlike the penalty, it needs no
agreement between workers, and asking the main process for every turn would put a
round trip on every login.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer

from .config import Limits
from .errors import LoginQueueFull
from .pacing import Pacer, Turn


class PacingGate:
    """The login pacer of this process."""

    def __init__(self, pacer: Pacer, clock: Any) -> None:
        self.pacer = pacer
        self.clock = clock
        self._ids = itertools.count(1)
        #: ticket -> (its Deferred, when it began to wait)
        self._waiting: dict[int, tuple[defer.Deferred[float], float]] = {}
        self._timer: Any = None
        #: the time the timer is set for
        self._due: float | None = None

    @classmethod
    def from_limits(cls, limits: Limits, reactor: Any) -> PacingGate:
        return cls(Pacer.from_limits(limits, reactor.seconds), reactor)

    @property
    def waiting(self) -> int:
        """Logins waiting for their turn (the metrics' gauge)."""
        return self.pacer.waiting

    def enter(self) -> float | None | defer.Deferred[float]:
        """A login wants its turn: see the module docstring for the answers."""
        if not self.pacer.rate:
            return None
        ticket = next(self._ids)
        turn = self.pacer.submit(ticket)
        if turn is Turn.NOW:
            return 0.0
        if turn is Turn.REFUSED:
            raise LoginQueueFull()
        d: defer.Deferred[float] = defer.Deferred(lambda _d: self._cancel(ticket))
        self._waiting[ticket] = (d, self.clock.seconds())
        self._reschedule()
        return d

    def reconfigure(self, limits: Limits) -> None:
        """A reload: the new rate and bound; a faster rate (or none) lets logins go now."""
        self._admit(self.pacer.reconfigure(limits))

    def _cancel(self, ticket: int) -> None:
        if self._waiting.pop(ticket, None) is not None:
            self.pacer.cancel(ticket)
            self._reschedule()

    def _admit(self, tickets: list[int]) -> None:
        now = self.clock.seconds()
        for ticket in tickets:
            waiting = self._waiting.pop(ticket, None)
            if waiting is not None:
                d, since = waiting
                d.callback(now - since)
        self._reschedule()

    def _reschedule(self) -> None:
        """The one timer, set for the first in line's turn (a newcomer behind it leaves
        it as it is)."""
        wakeup = self.pacer.next_wakeup()
        timer = self._timer
        if timer is not None and timer.active():
            if wakeup == self._due:
                return
            timer.cancel()
        self._timer = None
        self._due = wakeup
        if wakeup is not None:
            self._timer = self.clock.callLater(max(0.0, wakeup - self.clock.seconds()),
                                               self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._admit(self.pacer.poll())

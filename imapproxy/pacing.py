# -*- test-case-name: tests.test_pacing -*-
"""Admission pacing: a reconnect storm served at a steady rate of logins. Sans-IO.

When an instance dies, its thousands of clients come back at once, to the instances
left, and every one of their logins costs a directory lookup and a backend login.
Let through all at once, they overrun the directory and the backends, everything
slows down, and the clients time out and come back again: the storm feeds itself.
Paced, the logins go through at the rate the backends take (``[limits]
max_login_rate``, per second and per process), and the rest wait their turn in one
first-come, first-served queue; a storm of N clients is over in about N / rate
seconds instead of never.

The rate is a token bucket, kept as GCRA (the generic cell rate algorithm, ITU-T
I.371): instead of a count of tokens refilled on every look, one time is kept, when
the bucket would be full again (``_full``); a login may pass at ``now`` when that is
no later than ``now + burst / rate - 1 / rate``, and each that passes moves it
``1 / rate`` on. Both forms let through at most ``burst + rate * t`` logins in any
window of ``t`` seconds; this one turns "when is the next turn" into one subtraction,
exact in floating point, which is what a timer needs. The bucket holds one second's
worth (``BURST_SECONDS``; at least one login), so a quiet proxy lets a small burst
through without a wait, and a fresh one (just restarted, the storm already at the
door) starts with a full bucket.

The queue is bounded (``[limits] max_login_queue``): over it, a login is refused at
once (the client is told to come back later, RFC 5530 UNAVAILABLE) rather than left
to wait for a turn it would not get before the pre-login timeout ends its session.
The automatic bound is what the rate lets through in half the pre-login timeout
(``QUEUE_SHARE``), the other half being left for the client's TLS handshake, the
lookup and the backend login once its turn comes. A login that leaves (its client
gone, its pre-login time up) leaves the queue at once: ``cancel()``.

Nothing here reads a clock of its own or sets a timer: the clock is injected, and the
adapter (pacinggate.py) asks ``next_wakeup()`` when to call ``poll()``, as for the
brute-force penalty (penalty.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

from .config import Limits

#: The bucket holds this many seconds' worth of logins at the rate (at least one).
BURST_SECONDS = 1.0
#: A turn due within this many seconds is due now: a timer set for a time computed in
#: floating point may fire a hair before it (tests/test_pacing.py bounds what it costs).
EPSILON = 1e-6
#: The automatic queue bound: the logins let through in this share of preauth_timeout.
QUEUE_SHARE = 0.5


class Turn(Enum):
    """What ``submit()`` decided for a login."""

    #: it may go on at once
    NOW = "now"
    #: it waits in the queue; ``poll()`` names it when its turn comes
    WAIT = "wait"
    #: the queue is full: refuse it, unchecked
    REFUSED = "refused"


def automatic_queue(rate: float, preauth_timeout: float) -> int:
    """The default bound: what ``rate`` lets through in QUEUE_SHARE of the timeout."""
    return max(1, math.ceil(rate * preauth_timeout * QUEUE_SHARE))


def settings(limits: Limits) -> tuple[float, int]:
    """(rate, queue bound) from [limits]: max_login_queue = 0 is the automatic bound."""
    rate = limits.max_login_rate
    bound = limits.max_login_queue or automatic_queue(rate, limits.preauth_timeout)
    return rate, bound


class Pacer:
    """Lets logins through at ``rate`` per second; the rest wait, first come first served.

    A login is a ticket (any int the caller picks, unique while it waits); ``rate`` 0
    lets everything through at once.
    """

    def __init__(self, clock: Callable[[], float], *, rate: float = 0.0,
                 max_waiting: int = 0) -> None:
        self.clock = clock
        self.rate = 0.0
        self.max_waiting = 0
        #: when the bucket would be full again if nobody took a turn meanwhile (GCRA's
        #: theoretical arrival time); in the past: it is full
        self._full = -math.inf
        self._waiting: OrderedDict[int, None] = OrderedDict()
        #: 1 / rate, and how far ahead of the bucket being full a login may pass
        self._interval = 0.0
        self._tolerance = 0.0
        self.configure(rate=rate, max_waiting=max_waiting)

    @classmethod
    def from_limits(cls, limits: Limits, clock: Callable[[], float]) -> Pacer:
        rate, bound = settings(limits)
        return cls(clock, rate=rate, max_waiting=bound)

    @property
    def burst(self) -> float:
        """Logins the full bucket lets through at once."""
        return max(1.0, self.rate * BURST_SECONDS)

    @property
    def waiting(self) -> int:
        """Logins waiting for their turn."""
        return len(self._waiting)

    def configure(self, *, rate: float, max_waiting: int) -> list[int]:
        """New settings (a reload); returns the logins they let through now.

        The bucket keeps the logins taken from it (at most the new burst): they are
        still being served by the backends, whatever the new rate, so a reload during a
        storm does not refill it; a bigger one (a faster rate) lets through at once
        only what it holds beyond them. Nobody waiting is refused for a smaller bound:
        it applies to the next login.
        """
        if rate < 0 or not math.isfinite(rate) or max_waiting < 0:
            raise ValueError(f"rate {rate!r} and max_waiting {max_waiting!r} must be >= 0")
        now = self.clock()
        spent = max(0.0, self._full - now) * self.rate if self.rate else 0.0
        self.rate = float(rate)
        self.max_waiting = max_waiting
        self._full = now + min(spent, self.burst) / self.rate if self.rate else -math.inf
        # Worked out once here rather than on every login.
        self._interval = 1.0 / self.rate if self.rate else 0.0
        self._tolerance = (self.burst - 1.0) * self._interval
        return self._admit(now)

    def reconfigure(self, limits: Limits) -> list[int]:
        rate, bound = settings(limits)
        return self.configure(rate=rate, max_waiting=bound)

    def submit(self, ticket: int) -> Turn:
        """A login that wants its turn: NOW, WAIT (``poll()`` will name it) or REFUSED."""
        if not self.rate:
            return Turn.NOW
        now = self.clock()
        # First come, first served: with anyone waiting, a newcomer waits behind them
        # even if the bucket has a token by now (poll() hands it to the first in line).
        if not self._waiting and self._conforms(now):
            self._take(now)
            return Turn.NOW
        if len(self._waiting) >= self.max_waiting:
            return Turn.REFUSED
        self._waiting[ticket] = None
        return Turn.WAIT

    def cancel(self, ticket: int) -> None:
        """A waiting login went away (client gone, pre-login timeout): it leaves the queue.
        Its turn was not taken, so the bucket is as it was."""
        self._waiting.pop(ticket, None)

    def next_wakeup(self) -> float | None:
        """When ``poll()`` will let the first in line through; None: nobody waits."""
        if not self._waiting or not self.rate:
            return None
        return self._next_turn()

    def poll(self) -> list[int]:
        """The logins whose turn has come, in the order they came."""
        return self._admit(self.clock())

    # -- the bucket ------------------------------------------------------------------------

    def _next_turn(self) -> float:
        """The earliest time the next login may pass."""
        return self._full - self._tolerance

    def _conforms(self, now: float) -> bool:
        return now + EPSILON >= self._full - self._tolerance

    def _take(self, now: float) -> None:
        full = self._full
        self._full = (full if full > now else now) + self._interval

    def _admit(self, now: float) -> list[int]:
        admitted: list[int] = []
        while self._waiting and (not self.rate or self._conforms(now)):
            ticket, _ = self._waiting.popitem(last=False)
            if self.rate:
                self._take(now)
            admitted.append(ticket)
        return admitted

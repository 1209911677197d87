# -*- test-case-name: tests.test_penaltylane -*-
"""One lane of the brute-force penalty (penalty.py): what is known of one client
address or of one user. Sans-IO.

A lane remembers recent failures (by keyed fingerprint of user and password, never the
password: the same wrong password again is not a new failure) and, for a user, the
addresses it logged in from lately; it counts the checks running and holds the attempts
waiting their turn. It estimates its own size, so penalty.py can keep its tables within
a byte budget. What a lane's contents mean for admission is penalty.py's to decide.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: Distinct failures remembered per address or user: past 4 the delay is at its default
#: cap (2, 4, 8, 15 s); more only remember which wrong passwords were seen already.
MAX_FINGERPRINTS = 16

#: the shared, always empty "nothing waits" of every lane
_NO_WAITING: deque[int] = deque(maxlen=0)


class Lane:
    """One address or one user: recent failures, and the attempts waiting or running."""

    __slots__ = ("failures", "known", "running", "waiting", "next_start", "due", "counted")

    def __init__(self) -> None:
        #: fingerprint -> (user key, time of the failure)
        self.failures: dict[bytes, tuple[bytes, float]] = {}
        #: users only: address -> time of the last success from there
        self.known: dict[str, float] = {}
        self.running = 0
        #: attempts waiting their turn, oldest first (a deque costs 600 bytes even
        #: empty: kept only while something waits)
        self.waiting: deque[int] = _NO_WAITING
        #: the next check may not start before this (set while penalised)
        self.next_start = 0.0
        #: a wake-up is scheduled for this lane at this time (0: none)
        self.due = 0.0
        #: its weight() as last added to the table's byte count
        self.counted = 0

    def weight(self) -> int:
        """Estimated bytes held (measured with tracemalloc, rounded up): the entry with
        its key in the table, its dicts and their items. Attempts waiting are not
        counted: they are few, short-lived, and bounded by the connections."""
        return 600 + 260 * len(self.failures) + 200 * len(self.known)

    def wait(self, attempt: int) -> None:
        if self.waiting is _NO_WAITING:
            self.waiting = deque()
        self.waiting.append(attempt)

    def unwait(self, attempt: int | None = None) -> None:
        """The first waiting attempt (or ``attempt``) waits no more."""
        if attempt is None:
            self.waiting.popleft()
        else:
            self.waiting.remove(attempt)
        if not self.waiting:
            self.waiting = _NO_WAITING

    def expire(self, before: float) -> None:
        for fingerprint in [f for f, (_u, when) in self.failures.items() if when < before]:
            del self.failures[fingerprint]

    @property
    def idle(self) -> bool:
        return not (self.failures or self.known or self.running or self.waiting)


@dataclass(slots=True)
class Attempt:
    """One login waiting for admission or being checked, and the lanes it counts in."""

    address: str | None  # None: exempt
    user: bytes
    #: it waits in (and counts against) the address's queue
    in_address_lane: bool
    #: it waits in (and counts against) the user's queue
    in_user_lane: bool
    running: bool = False


def add_failure(lane: Lane, fingerprint: bytes, user: bytes, now: float) -> None:
    """Remember a failure (the newest last; the same fingerprint again moves it there),
    keeping at most MAX_FINGERPRINTS."""
    lane.failures.pop(fingerprint, None)
    lane.failures[fingerprint] = (user, now)
    while len(lane.failures) > MAX_FINGERPRINTS:
        del lane.failures[next(iter(lane.failures))]

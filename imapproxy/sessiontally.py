# -*- test-case-name: tests.test_sessiontally -*-
"""This instance's logged-in sessions per (user, client address), as Redis should count
them for ``max_connections_per_user_ip`` over every instance (sharedstate.py's CLAIM,
RELEASE and RESYNC; redisstate.py asks). Sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Claim:
    """One logged-in session counted under (user, client address)."""

    user: str
    client: str
    #: the tally's epoch when it was made
    epoch: int
    #: Redis counted it (CLAIM granted)
    counted: bool = False
    done: bool = False
    released: bool = False


class SessionTally:
    """This instance's logged-in sessions per (user, address), and whether Redis holds
    the same counts.

    A session is counted here when it logs in, whether Redis could count it or not; a
    release takes it away. Whenever Redis may hold other counts than these (a write
    failed or timed out, or this instance was taken for dead), ``needs_resync`` is set,
    and the adapter writes them whole (``snapshot``) once no CLAIM is in flight (a CLAIM
    answered after the snapshot would be counted twice, or not at all). Sessions that
    Redis did not count (it was away) count there from the next snapshot on: until then
    their release sends nothing. Users are kept by name (casefolded) here, in memory
    only; the adapter hashes them when it writes.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.epoch = 0
        self.in_flight = 0
        self.needs_resync = False

    def begin(self, user: str, client: str) -> Claim:
        """A login asks to be counted (CLAIM goes out)."""
        self.in_flight += 1
        return Claim(user.casefold(), client, self.epoch)

    def granted(self, claim: Claim) -> None:
        """Redis counted it."""
        self._end(claim, counted=True)

    def refused(self, claim: Claim) -> None:
        """Redis says the user has its limit of sessions from there: not counted."""
        claim.done = True
        self.in_flight -= 1

    def counted_locally(self, claim: Claim) -> None:
        """Redis could not be asked, or did not answer in time (it may have counted it,
        or not): counted here, and Redis is to be told the whole again."""
        self._end(claim, counted=False)
        self.needs_resync = True

    def _end(self, claim: Claim, *, counted: bool) -> None:
        claim.done = True
        claim.counted = counted
        self.in_flight -= 1
        key = (claim.user, claim.client)
        self.counts[key] = self.counts.get(key, 0) + 1

    def release(self, claim: Claim) -> bool:
        """The session ended; whether Redis is to be told (RELEASE)."""
        if claim.released or not claim.done:
            return False
        claim.released = True
        key = (claim.user, claim.client)
        left = self.counts.get(key, 0) - 1
        if left > 0:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)
        return claim.counted or claim.epoch < self.epoch

    def write_failed(self) -> None:
        """A RELEASE (or a RESYNC) may not have been applied."""
        self.needs_resync = True

    def snapshot(self) -> list[tuple[str, str, int]] | None:
        """The counts to write whole now, or None if it cannot be done yet (a CLAIM is
        in flight). Every session counted so far counts in Redis from here on."""
        if self.in_flight:
            return None
        self.needs_resync = False
        self.epoch += 1
        return [(user, client, count) for (user, client), count in self.counts.items()]

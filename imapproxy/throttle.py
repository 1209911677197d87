# -*- test-case-name: tests.test_throttle -*-
"""Brute-force defence: a delay before answering a failed login, growing per client and user.

Pure bookkeeping with an injected clock (no Twisted import); the adapter schedules the
answer with ``reactor.callLater`` and never blocks.

- Each distinct wrong (user, password) pair counts once per client address and once per
  username; the delay is ``base * 2**(n-1)`` for the larger count ``n``, capped
  (2, 4, 8, ... s). Password spraying (one password, many users, one address) grows the
  client's count; a botnet guessing one user's password grows the user's count.
- Retrying the same wrong password (a phone with a stale password, every few minutes)
  does not count again. Only a keyed hash of it is kept, never the password: HMAC-SHA256
  under a random key made at start-up and never written anywhere.
- The right password is never locked out: successful logins are not delayed at all, and
  they clear the user's count and that user's failures from the client's count.
- Unknown users are counted and delayed exactly like known ones, so neither the reply nor
  its timing tells them apart (the adapter measures the delay from the start of the login,
  so a quick "no such user" waits as long as a slow backend refusal).

Failures are forgotten ``memory`` seconds after the last one; the tables are bounded
(least recently failed entries go first), so a flood of random names costs bounded memory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable

from .config import Limits

#: Distinct failures remembered per client or user. Past this the delay is at its cap
#: anyway (2 * 2**31 s), so older fingerprints may go.
MAX_FINGERPRINTS = 32
#: Client addresses and usernames tracked at most (each table).
MAX_ENTRIES = 100_000


class _Record:
    """Recent distinct failures of one client or one user: fingerprint -> (user, when)."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def add(self, fingerprint: bytes, user: str, now: float) -> None:
        self.failures[fingerprint] = (user, now)
        self.failures.move_to_end(fingerprint)
        while len(self.failures) > MAX_FINGERPRINTS:
            self.failures.popitem(last=False)

    def expire(self, before: float) -> None:
        while self.failures:
            fingerprint, (_user, when) = next(iter(self.failures.items()))
            if when >= before:
                break
            del self.failures[fingerprint]

    def forget_user(self, user: str) -> None:
        for fingerprint in [f for f, (u, _w) in self.failures.items() if u == user]:
            del self.failures[fingerprint]


class LoginThrottle:
    """Decides how long to wait before answering a failed login. ``base_delay`` 0 = off."""

    def __init__(self, clock: Callable[[], float], base_delay: float = 2.0,
                 max_delay: float = 30.0, memory: float = 900.0,
                 max_entries: int = MAX_ENTRIES, key: bytes | None = None) -> None:
        self.clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.memory = memory
        self.max_entries = max_entries
        self._key = key if key is not None else os.urandom(32)
        # Least recently failed first, so the oldest entries are dropped first.
        self._clients: OrderedDict[str, _Record] = OrderedDict()
        self._users: OrderedDict[str, _Record] = OrderedDict()

    @classmethod
    def from_limits(cls, limits: Limits, clock: Callable[[], float]) -> LoginThrottle:
        return cls(clock, limits.login_delay, limits.login_delay_max,
                   limits.login_failure_memory)

    def fingerprint(self, user: str, password: bytes) -> bytes:
        """A keyed hash of the pair; the password itself is never stored."""
        message = user.encode("utf-8") + b"\x00" + password
        return hmac.new(self._key, message, hashlib.sha256).digest()[:16]

    def failed(self, client: str, user: str, password: bytes) -> float:
        """Record a failed login; the seconds to wait before answering it."""
        if self.base_delay <= 0:
            return 0.0
        now = self.clock()
        user = user.casefold()
        fingerprint = self.fingerprint(user, password)
        counts = []
        for table, key in ((self._clients, client), (self._users, user)):
            record = self._touch(table, key, now)
            record.add(fingerprint, user, now)
            counts.append(len(record.failures))
        return self.delay(max(counts))

    def succeeded(self, client: str, user: str) -> None:
        """A successful login: it clears the user's failures here and everywhere."""
        user = user.casefold()
        self._users.pop(user, None)
        record = self._clients.get(client)
        if record is not None:
            record.forget_user(user)
            if not record.failures:
                del self._clients[client]

    def failures(self, client: str, user: str) -> tuple[int, int]:
        """The current (client, user) failure counts, as the next failure would see them."""
        before = self.clock() - self.memory
        result = []
        for table, key in ((self._clients, client), (self._users, user.casefold())):
            record = table.get(key)
            if record is None:
                result.append(0)
                continue
            record.expire(before)
            result.append(len(record.failures))
        return result[0], result[1]

    def delay(self, count: int) -> float:
        """``base * 2**(count-1)`` seconds, capped at ``max_delay``; 0 for no failures."""
        if count <= 0 or self.base_delay <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(count - 1, 64))

    @property
    def tracked(self) -> int:
        """Client and user entries held (for tests and metrics)."""
        return len(self._clients) + len(self._users)

    def _touch(self, table: OrderedDict[str, _Record], key: str, now: float) -> _Record:
        before = now - self.memory
        # Drop entries whose last failure is too old, oldest first; then bound the table.
        while table:
            oldest_key, oldest = next(iter(table.items()))
            oldest.expire(before)
            full = key not in table and len(table) >= self.max_entries
            if oldest.failures and not full:
                break
            del table[oldest_key]
        record = table.get(key)
        if record is None:
            record = table[key] = _Record()
        else:
            record.expire(before)
            table.move_to_end(key)
        return record

# -*- test-case-name: tests.test_routecache -*-
"""The directory's answers, remembered: ``RouteCache``.

Positive and negative TTLs, a bound on the number of entries (least recently used
goes first), and stale positive answers for when the directory is down. Pure: every
time comes from an injected clock (anything with ``seconds()``, such as the reactor
or ``twisted.internet.task.Clock``); nothing here imports Twisted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .breaker import Clock
from .config import CacheConfig
from .ldapentry import Entry


@dataclass(slots=True)
class _Cached:
    entry: Entry | None  # None: the directory said "no such user"
    reason: str
    at: float


class RouteCache:
    """LRU cache of directory answers, keyed by lookup name; all times from ``clock``.

    Positive answers are fresh for ``positive_ttl`` and may be served stale, while
    the directory is down, up to ``stale_ttl`` after they were fetched. Negative
    answers are fresh for ``negative_ttl`` and never served stale: a user created
    during an outage must get "try again later", not "wrong password".
    """

    def __init__(self, cfg: CacheConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self._entries: OrderedDict[str, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _age(self, cached: _Cached) -> float:
        return self.clock.seconds() - cached.at

    def fresh(self, key: str) -> _Cached | None:
        """A fresh answer, if any (positive or negative)."""
        cached = self._entries.get(key)
        if cached is None:
            return None
        ttl = self.cfg.positive_ttl if cached.entry is not None else self.cfg.negative_ttl
        if self._age(cached) < ttl:
            self._entries.move_to_end(key)
            return cached
        if cached.entry is None or self._age(cached) >= self.cfg.stale_ttl:
            del self._entries[key]  # of no further use
        return None

    def stale(self, key: str) -> tuple[Entry, float] | None:
        """A positive answer young enough to serve while the directory is down."""
        cached = self._entries.get(key)
        if cached is None or cached.entry is None:
            return None
        age = self._age(cached)
        if age >= self.cfg.stale_ttl:
            del self._entries[key]
            return None
        return cached.entry, age

    def put(self, key: str, entry: Entry | None, reason: str = "") -> None:
        """Remember an answer (None: not found), evicting the least recently used."""
        if self.cfg.max_entries <= 0:
            return
        self._entries[key] = _Cached(entry, reason, self.clock.seconds())
        self._entries.move_to_end(key)
        while len(self._entries) > self.cfg.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (reload / SIGHUP)."""
        self._entries.clear()

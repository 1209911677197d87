# -*- test-case-name: tests.test_breaker -*-
"""A circuit breaker for backends (and LDAP servers): skip what failed, for a while.

A server that failed is "down" for ``cooldown`` seconds, then tried again (half-open):
one more failure opens the breaker for another cooldown, a success closes it.
Down servers are not dropped, only tried last, so a login whose every server is
marked down still gets a try rather than an instant failure: the mark may be stale.

Pure: the clock is injected (anything with ``seconds()``, such as the reactor or
``twisted.internet.task.Clock``); nothing here imports Twisted.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class Clock(Protocol):
    """The part of IReactorTime the breaker needs."""

    def seconds(self) -> float: ...


class CircuitBreaker(Generic[K]):
    """Remembers which servers failed recently."""

    def __init__(self, clock: Clock, cooldown: float) -> None:
        self.clock = clock
        self.cooldown = cooldown
        # Only servers that failed are held, and each is dropped on success or on the
        # first check after its cooldown: the map cannot outgrow the set of servers.
        self._down_until: dict[K, float] = {}

    def mark_failed(self, server: K) -> None:
        """Record a failure (connect refused, timeout, TLS failure): skip it for a while."""
        if self.cooldown > 0:
            self._down_until[server] = self.clock.seconds() + self.cooldown

    def mark_ok(self, server: K) -> None:
        """Record a success: the server is up again at once."""
        self._down_until.pop(server, None)

    def is_down(self, server: K) -> bool:
        """True while the server's cooldown runs."""
        until = self._down_until.get(server)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._down_until[server]
            return False
        return True

    def order(self, servers: Iterable[K]) -> list[K]:
        """The given order, with servers that are down moved (in order) to the end."""
        servers = list(servers)
        up = [s for s in servers if not self.is_down(s)]
        down = [s for s in servers if s in self._down_until]
        return up + down

    def down(self) -> list[K]:
        """The servers down now (for status pages and logs)."""
        return [s for s in list(self._down_until) if self.is_down(s)]

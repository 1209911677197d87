# -*- test-case-name: tests.test_limits -*-
"""Concurrent connection limits: in total, per client network, per user and client network.

Pure bookkeeping with no I/O (no Twisted import). The adapter asks ``admit()`` when a
client connects and gets a ``Ticket`` or a ``Refusal``; a refused client is answered
(``* BYE [UNAVAILABLE]`` / ``-ERR [SYS/TEMP]``) and closed while the listener goes on
accepting. Perdition's ``--connection_limit`` made the listening daemon exit instead.

Mobile carriers put thousands of phones behind one address (CGNAT, RFC 6598), so the
per-client limit must be generous; the per user+client limit is the tight one, and is
separate: it is what stops one account from hogging a shared address.
"""

from __future__ import annotations

import ipaddress
import resource
from enum import Enum

from .config import Limits

#: File descriptors kept back from the automatic total: listeners, logs, LDAP, backends
#: being dialled.
FD_RESERVE = 64


class Refusal(Enum):
    """Why a connection or a login was refused; the value goes into the log line."""

    #: this process holds max_connections sessions already
    TOTAL = "too many connections"
    #: this client address (IPv6: its /64) holds max_connections_per_ip already
    PER_CLIENT = "too many connections from this address"
    #: this user from this client address holds max_connections_per_user_ip already
    PER_USER_CLIENT = "too many connections for this user from this address"


def client_key(host: str, ipv6_prefix: int = 64) -> str:
    """The unit counted per client: an IPv4 address, or the IPv6 network of ``ipv6_prefix``.

    One IPv6 subscriber gets a whole /64 or more (RFC 6177), and every address in it is
    theirs to use, so counting single IPv6 addresses would count nothing. IPv4-mapped
    IPv6 addresses (a dual-stack listener) count as the IPv4 address they carry.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an IP address (a UNIX socket): counted as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def automatic_total(reserve: int = FD_RESERVE) -> int:
    """The default total: every session takes two descriptors (client and backend)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, (soft - reserve) // 2)


class Ticket:
    """One admitted connection. ``login()`` adds the user; ``release()`` gives it all back."""

    __slots__ = ("_limiter", "client", "user", "released")

    def __init__(self, limiter: ConnectionLimiter, client: str) -> None:
        self._limiter = limiter
        self.client = client
        self.user: str | None = None
        self.released = False

    def login(self, user: str) -> Refusal | None:
        """Count a logged-in ``user`` on this connection; a Refusal when over the limit."""
        assert self.user is None and not self.released
        key = user.casefold()
        refusal = self._limiter._add_user(key, self.client)
        if refusal is None:
            self.user = key
        return refusal

    def logout(self) -> None:
        """Undo login(): the user is counted no more on this connection (another
        instance's sessions made it one too many, see redisstate.py)."""
        if self.user is not None and not self.released:
            self._limiter._remove_user(self.user, self.client)
            self.user = None

    def release(self) -> None:
        """The connection is gone. Safe to call more than once."""
        if self.released:
            return
        self.released = True
        self._limiter._remove(self.client, self.user)


class ConnectionLimiter:
    """Counts live connections; each limit is off when 0."""

    def __init__(self, max_total: int = 0, max_per_client: int = 0,
                 max_per_user_client: int = 0, ipv6_prefix: int = 64) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_per_user_client = max_per_user_client
        self.ipv6_prefix = ipv6_prefix
        self.total = 0
        # Entries are deleted at zero, so memory follows the live connections only.
        self._clients: dict[str, int] = {}
        self._user_clients: dict[tuple[str, str], int] = {}

    @classmethod
    def from_limits(cls, limits: Limits) -> ConnectionLimiter:
        limiter = cls()
        limiter.reconfigure(limits)
        return limiter

    def reconfigure(self, limits: Limits) -> None:
        """New limits (a reload): they apply to the next connection or login; nobody
        already in is turned out. The client network of a connection is the one it
        was counted under, so a new ipv6_prefix is safe too."""
        self.max_total = limits.max_connections if limits.max_connections else \
            automatic_total()
        self.max_per_client = limits.max_connections_per_ip
        self.max_per_user_client = limits.max_connections_per_user_ip
        self.ipv6_prefix = limits.ipv6_prefix

    def admit(self, host: str) -> Ticket | Refusal:
        """A new client connection from ``host``: a Ticket, or why it is refused."""
        if self.max_total and self.total >= self.max_total:
            return Refusal.TOTAL
        client = client_key(host, self.ipv6_prefix)
        count = self._clients.get(client, 0)
        if self.max_per_client and count >= self.max_per_client:
            return Refusal.PER_CLIENT
        self._clients[client] = count + 1
        self.total += 1
        return Ticket(self, client)

    def connections_from(self, host: str) -> int:
        return self._clients.get(client_key(host, self.ipv6_prefix), 0)

    def sessions_of(self, user: str, host: str) -> int:
        return self._user_clients.get((user.casefold(), client_key(host, self.ipv6_prefix)), 0)

    def _add_user(self, user: str, client: str) -> Refusal | None:
        key = (user, client)
        count = self._user_clients.get(key, 0)
        if self.max_per_user_client and count >= self.max_per_user_client:
            return Refusal.PER_USER_CLIENT
        self._user_clients[key] = count + 1
        return None

    def _remove(self, client: str, user: str | None) -> None:
        self.total -= 1
        _decrement(self._clients, client)
        if user is not None:
            self._remove_user(user, client)

    def _remove_user(self, user: str, client: str) -> None:
        _decrement(self._user_clients, (user, client))


def _decrement(counts: dict, key: object) -> None:  # type: ignore[type-arg]
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]

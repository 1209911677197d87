# -*- test-case-name: tests.test_penalty -*-
"""Brute-force defence: a penalty paid before the password is checked. Sans-IO.

Every login is an *attempt* that must be admitted before the directory or a backend
sees its credentials. Admission is decided here, from what earlier attempts taught;
the adapter (penaltygate.py) only waits for the admission, runs the check, and
reports the outcome back.

Per client address (IPv6: its network, limits.client_key):
- An address without recent failures may have ``parallel`` checks running at once
  (32: carriers put thousands of phones behind one address, and a reconnect storm must
  flow); more wait their turn, and are never refused for it.
- An address with recent failures is *penalised*: its attempts wait in one queue and
  are checked one at a time, each starting no sooner than ``delay(n)`` after the
  previous one ended, where n is the number of distinct failures: 2, 4, 8, 15 s by
  default (Dovecot's anvil penalty). A correct password waits like a wrong one, so
  an answer's speed tells a guesser nothing, and guesses sent in parallel are checked
  one after the other. Dovecot applies its penalty before the lookup too, but lets
  parallel attempts through at once; here they queue.
- A success from the address forgets that user's failures there.
- A user who logged in successfully from the address lately, and whose password nobody
  is guessing (no recent failures for that user), does not queue behind the address's
  penalty: one typo behind a carrier's shared address must not hold back the
  reconnecting phones of everyone else behind it.

Per user (a guesser spreading one user's guesses over many addresses):
- Attempts from addresses where this user has NOT logged in successfully lately
  (``known_memory``) also go through a queue of the user's: ``USER_PARALLEL`` (4)
  checks at once while the user has no recent failures (so a burst of guesses for one
  user, from one address or many, is not all checked at once), and once it has, one at
  a time, each after the penalty of the user's distinct failures from anywhere, with
  the same doubling.
- The owner logging in from an address they used before is not held back by the
  user penalty at all, however hard the account is attacked from elsewhere. From a
  new address, while the account is attacked, they wait their turn behind at most
  ``MAX_WAITING_USER`` attempts (about a minute at the 15 s cap), or are told to come
  back later when that queue is full: a guesser cannot be told from the owner there.
- A success clears the user's failures and makes its address known.

For both: the same wrong password again (a phone with a stale password) is not a new
failure: only a keyed hash of (user, password) is kept, never the password, under a
random key made at start-up. Addresses in ``exempt`` (webmail hosts, trusted
callers; CIDR) are neither held back nor counted. Failures are forgotten ``memory``
seconds after they happened. A penalised queue is bounded (``MAX_WAITING``,
``MAX_WAITING_USER``): an attempt over the bound is refused at once, unchecked; others
are bounded by the connection limits (and the pre-auth timeout). The tables are
bounded in bytes: users are kept by a keyed hash of their name (fixed size, whatever
the client sent), and idle entries are evicted least recently used first past
``max_bytes``.

No I/O and no Twisted: the clock is injected; admissions are returned as attempt ids.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import Limits
from .penaltylane import Attempt, Lane, add_failure

#: Addresses remembered per user as "logged in from here lately" (the owner's devices).
MAX_KNOWN = 8
#: Attempts waiting at most per address; more are refused unchecked. A client retries
#: after a refusal; 16 queued attempts at 15 s each is already 4 minutes.
MAX_WAITING = 16
#: Attempts waiting at most per user (from addresses the user has not logged in from
#: lately). Small, so that the owner on a new network waits at most about a minute
#: behind a guesser's attempts (or is told to come back later) while the attack lasts.
MAX_WAITING_USER = 4
#: Checks at once for one user from addresses it has not logged in from lately, while
#: the user has no recent failures (a guesser's burst for one user gets no further).
USER_PARALLEL = 4
#: Bytes the tables may hold (an estimate per entry, see Lane.weight).
MAX_BYTES = 64 * 1024 * 1024


class Outcome(Enum):
    """What the check of an admitted attempt found."""

    #: the backend accepted the credentials
    SUCCESS = "success"
    #: wrong credentials or unknown user: a guess that failed
    FAILURE = "failure"
    #: nothing learnt about the credentials (backend or directory down, a limit)
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class Refused:
    """The attempt was not admitted (a queue is full); the client may come back later."""

    reason: str


class Penalty:
    """Admits login attempts; see the module docstring for the policy."""

    def __init__(self, clock: Callable[[], float], *, max_bytes: int = MAX_BYTES,
                 key: bytes | None = None, **settings: Any) -> None:
        """``settings`` are configure()'s; any not given take [limits]' defaults (config.py
        holds each default once)."""
        self.clock = clock
        self.key = key if key is not None else os.urandom(32)
        self.max_bytes = max_bytes
        self.configure(**{**_settings(Limits()), **settings})
        self._addresses: OrderedDict[str, Lane] = OrderedDict()
        self._users: OrderedDict[bytes, Lane] = OrderedDict()
        self._attempts: dict[int, Attempt] = {}
        #: (time, "a"/"u", lane key): lanes to look at again at that time
        self._wakeups: list[tuple[float, str, str | bytes]] = []
        self._bytes = 0

    @classmethod
    def from_limits(cls, limits: Limits, clock: Callable[[], float],
                    key: bytes | None = None) -> Penalty:
        return cls(clock, key=key, **_settings(limits))

    def configure(self, *, base: float, cap: float, memory: float, parallel: int,
                  known_memory: float, exempt: Iterable[str]) -> None:
        """Apply new settings (a reload); what was learnt is kept."""
        self.base, self.cap, self.memory = base, cap, memory
        self.parallel = max(1, parallel)
        self.known_memory = known_memory
        self.exempt = exempt_networks(exempt)

    def reconfigure(self, limits: Limits) -> None:
        self.configure(**_settings(limits))

    # -- keys ----------------------------------------------------------------------------

    def user_key(self, user: str) -> bytes:
        """A user as the tables know it: a keyed hash of the case-folded name."""
        return user_key(self.key, user)

    def fingerprint(self, user: str, password: bytes) -> bytes:
        """A keyed hash of the pair; the password itself is never stored."""
        return fingerprint(self.key, user, password)

    def is_exempt(self, address: str) -> bool:
        return is_exempt(address, self.exempt)

    def delay(self, count: int) -> float:
        """``base * 2**(count-1)`` seconds, capped; 0 for no failures."""
        return delay(count, self.base, self.cap)

    # -- attempts ------------------------------------------------------------------------

    def submit(self, attempt: int, address: str, ukey: bytes, *, known: bool = False,
               user_failures: bool = False) -> list[int] | Refused:
        """A new attempt from ``address`` (a client key) for the user ``ukey`` (user_key()).

        ``known`` and ``user_failures`` say what other proxy instances learnt (the shared
        state, redisstate.py): the user logged in from this address lately, the user
        has recent failures; what this one learnt itself counts as well.

        Returns the attempts admitted now (this one among them if it may start at once),
        or Refused when a queue it would wait in is full.
        """
        now = self.clock()
        exempt = self.is_exempt(address)
        lane = None if exempt else self._lane(self._addresses, address, now)
        user_lane = self._users.get(ukey)
        if user_lane is not None and not exempt:
            user_lane.expire(now - self.memory)
            since = user_lane.known.get(address)
            known = known or (since is not None and since >= now - self.known_memory)
            user_failures = user_failures or bool(user_lane.failures)
        # A user who logged in from this address lately skips the user's queue; and,
        # while nobody is guessing that user's password, the address's queue too: one
        # typo behind a carrier's shared address must not queue the logins of every
        # phone that uses it.
        in_user_lane = not exempt and not known
        in_address_lane = not exempt and not (known and not user_failures)
        # Only a penalised queue is bounded: one without failures holds a reconnect storm
        # (the connection limits bound it), never refused for being busy.
        for queue, name, bound in ((lane if in_address_lane else None, "address", MAX_WAITING),
                                   (user_lane if in_user_lane else None, "user",
                                    MAX_WAITING_USER)):
            if queue is not None and queue.failures and len(queue.waiting) >= bound:
                return Refused(f"too many login attempts waiting for this {name}")
        if in_user_lane:
            user_lane = self._lane(self._users, ukey, now)
        self._attempts[attempt] = Attempt(None if exempt else address, ukey, in_address_lane,
                                           in_user_lane)
        if in_address_lane and lane is not None:
            lane.wait(attempt)
        if in_user_lane and user_lane is not None:
            user_lane.wait(attempt)
        granted = self._try(attempt, now)
        self._trim(lane, user_lane)
        return granted

    def finish(self, attempt: int, outcome: Outcome, fingerprint: bytes = b"") -> list[int]:
        """An admitted attempt's check is over; returns the attempts admitted now."""
        state = self._attempts.get(attempt)
        if state is None:
            return []
        if not state.running:
            return self.cancel(attempt)  # never admitted: nothing was checked
        del self._attempts[attempt]
        now = self.clock()
        lane = self._addresses.get(state.address) if state.address is not None else None
        user_lane = self._users.get(state.user)
        if state.in_address_lane and lane is not None:
            lane.running -= 1
        if state.in_user_lane and user_lane is not None:
            user_lane.running -= 1
        exempt = state.address is None
        if outcome is Outcome.FAILURE and fingerprint and not exempt:
            assert state.address is not None
            lane = self._lane(self._addresses, state.address, now)
            add_failure(lane, fingerprint, state.user, now)
            user_lane = self._lane(self._users, state.user, now)
            add_failure(user_lane, fingerprint, state.user, now)
        elif outcome is Outcome.SUCCESS:
            if lane is not None:
                for f in [f for f, (u, _w) in lane.failures.items() if u == state.user]:
                    del lane.failures[f]
            if not exempt:
                assert state.address is not None
                user_lane = self._lane(self._users, state.user, now)
                user_lane.failures.clear()
                user_lane.known[state.address] = now
                while len(user_lane.known) > MAX_KNOWN:
                    del user_lane.known[next(iter(user_lane.known))]
        for penalised in (lane, user_lane):
            if penalised is not None:
                penalised.expire(now - self.memory)
                penalised.next_start = now + self.delay(len(penalised.failures))
        granted = self._lanes_changed(now, lane if state.in_address_lane else None,
                                      user_lane if state.in_user_lane else None)
        self._trim(lane, user_lane)
        return granted

    def cancel(self, attempt: int) -> list[int]:
        """The client went away: the attempt leaves its queues (or ends, if running)."""
        state = self._attempts.get(attempt)
        if state is None:
            return []
        if state.running:
            return self.finish(attempt, Outcome.NEUTRAL)
        del self._attempts[attempt]
        now = self.clock()
        lane = self._addresses.get(state.address) if state.in_address_lane else None  # type: ignore[arg-type]
        user_lane = self._users.get(state.user) if state.in_user_lane else None
        for queue in (lane, user_lane):
            if queue is not None and attempt in queue.waiting:
                queue.unwait(attempt)
        granted = self._lanes_changed(now, lane, user_lane)
        self._trim(lane, user_lane)
        return granted

    def next_wakeup(self) -> float | None:
        """When ``poll()`` may admit something waiting on a penalty; None: nothing waits."""
        while self._wakeups:
            when, kind, key = self._wakeups[0]
            lane = self._table(kind).get(key)
            if lane is not None and lane.due == when:
                if lane.waiting:
                    return when
                lane.due = 0.0  # nobody waits any more: a newcomer schedules anew
            heapq.heappop(self._wakeups)
        return None

    def poll(self) -> list[int]:
        """Admit whatever is due now."""
        now = self.clock()
        granted: list[int] = []
        while self._wakeups and self._wakeups[0][0] <= now:
            when, kind, key = heapq.heappop(self._wakeups)
            lane = self._table(kind).get(key)
            if lane is None or lane.due != when:
                continue
            lane.due = 0.0
            granted += self._lanes_changed(now, *((lane, None) if kind == "a" else (None, lane)))
        return granted

    # -- what callers and tests may ask -------------------------------------------------

    def failures(self, address: str, user: str) -> tuple[int, int]:
        """The current (address, user) distinct failure counts."""
        before = self.clock() - self.memory
        counts = []
        for kind, key in (("a", address), ("u", self.user_key(user))):
            lane = self._table(kind).get(key)
            failures = lane.failures.values() if lane is not None else ()
            counts.append(sum(1 for _user, when in failures if when >= before))
        return counts[0], counts[1]

    @property
    def tracked(self) -> int:
        """Address and user entries held."""
        return len(self._addresses) + len(self._users)

    @property
    def waiting(self) -> int:
        return sum(1 for a in self._attempts.values() if not a.running)

    # -- the rules -------------------------------------------------------------------------

    def _table(self, kind: str) -> OrderedDict[Any, Lane]:
        """The lanes of addresses ("a") or of users ("u")."""
        return self._addresses if kind == "a" else self._users

    def _lane(self, table: OrderedDict[Any, Lane], key: str | bytes, now: float) -> Lane:
        lane = table.get(key)
        if lane is None:
            lane = table[key] = Lane()
        else:
            table.move_to_end(key)
            lane.expire(now - self.memory)
        return lane

    def _may_start(self, lane: Lane, attempt: int, now: float, limit: int) -> bool:
        if not lane.waiting or lane.waiting[0] != attempt:
            return False
        if lane.failures:
            return lane.running == 0 and now >= lane.next_start
        return lane.running < limit

    def _try(self, attempt: int, now: float) -> list[int]:
        """Start ``attempt`` if both of its queues let it; then whoever follows it."""
        state = self._attempts.get(attempt)
        if state is None or state.running:
            return []
        lane = self._addresses.get(state.address) if state.in_address_lane else None  # type: ignore[arg-type]
        user_lane = self._users.get(state.user) if state.in_user_lane else None
        if lane is not None and not self._may_start(lane, attempt, now, self.parallel):
            self._schedule("a", state.address, lane)  # type: ignore[arg-type]
            return []
        if user_lane is not None and not self._may_start(user_lane, attempt, now,
                                                         USER_PARALLEL):
            self._schedule("u", state.user, user_lane)
            return []
        state.running = True
        for queue in (lane, user_lane):
            if queue is not None:
                queue.unwait()
                queue.running += 1
        return [attempt] + self._lanes_changed(now, lane, user_lane)

    def _lanes_changed(self, now: float, lane: Lane | None, user_lane: Lane | None,
                       ) -> list[int]:
        granted: list[int] = []
        for queue in (lane, user_lane):
            if queue is not None and queue.waiting:
                granted += self._try(queue.waiting[0], now)
        return granted

    def _schedule(self, kind: str, key: str | bytes, lane: Lane) -> None:
        """Wake this lane up when its penalty has run out (if that is what it waits for)."""
        if lane.failures and lane.running == 0 and lane.next_start > self.clock() \
                and lane.due != lane.next_start:
            lane.due = lane.next_start
            heapq.heappush(self._wakeups, (lane.next_start, kind, key))

    def _trim(self, *touched: Lane | None) -> None:
        """Account for the lanes just changed; drop idle entries, oldest first, when
        expired or while over the byte budget."""
        for lane in touched:
            if lane is not None:
                self._bytes += lane.weight() - lane.counted
                lane.counted = lane.weight()
        now = self.clock()
        for kind in ("a", "u"):
            table = self._table(kind)
            while table:
                key, lane = next(iter(table.items()))
                lane.expire(now - self.memory)
                for address in [a for a, t in lane.known.items()
                                if t < now - self.known_memory]:
                    del lane.known[address]
                if not lane.idle and self._bytes <= self.max_bytes:
                    self._bytes += lane.weight() - lane.counted
                    lane.counted = lane.weight()
                    break
                if lane.running or lane.waiting:
                    table.move_to_end(key)
                    break  # in use: never dropped; what follows it waits for next time
                self._bytes -= lane.counted
                del table[key]

    @property
    def bytes_counted(self) -> int:
        """The tables' estimated size in bytes, as kept up to date."""
        return self._bytes


def user_key(key: bytes, user: str) -> bytes:
    """A user as the tables know it: a keyed hash of the case-folded name."""
    return hmac.new(key, b"u\x00" + user.casefold().encode("utf-8", "replace"),
                    hashlib.blake2b).digest()[:16]


def fingerprint(key: bytes, user: str, password: bytes) -> bytes:
    """A keyed hash of the (user, password) pair; the password itself is never stored."""
    message = b"p\x00" + user.casefold().encode("utf-8", "replace") + b"\x00" + password
    return hmac.new(key, message, hashlib.sha256).digest()[:16]


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def exempt_networks(networks: Iterable[str]) -> Networks:
    """[limits] penalty_exempt, parsed (config.py checked each)."""
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def is_exempt(address: str, networks: Networks) -> bool:
    """Whether the client key ``address`` lies in one of ``networks``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.split("/", 1)[0])
    except ValueError:
        return False
    return any(ip in network for network in networks)


def delay(count: int, base: float, cap: float) -> float:
    """The penalty after ``count`` distinct failures: ``base * 2**(count-1)`` seconds,
    capped at ``cap``; 0 for no failures."""
    if count <= 0 or base <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(count - 1, 64))


def _settings(limits: Limits) -> dict[str, Any]:
    return {"base": limits.login_delay, "cap": limits.login_delay_max,
            "memory": limits.login_failure_memory,
            "parallel": limits.max_parallel_logins_per_ip,
            "known_memory": limits.known_address_memory, "exempt": limits.penalty_exempt}

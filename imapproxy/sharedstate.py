# -*- test-case-name: tests.test_sharedstate -*-
"""What several proxy instances share through Redis, and how they ask for it: sans-IO.

With ``[shared] redis`` set, every instance (and every worker of one) keeps two things
in one Redis database besides its own memory, so that a guesser gains nothing by
landing on another instance, and a user's sessions are counted wherever they are:

- **What the brute-force penalty learnt** (penalty.py): failures per client address
  and per user, and the addresses each user logged in from lately; and, per
  penalised lane, the *turns* reserved by the attempts waiting in it. ``ENTER`` is
  asked before an attempt enters this process's own gate: it answers what is known
  (failures, known address) and, for each penalised lane the attempt is in, reserves
  a turn at ``slot = max(now, last turn + delay(n), next)``; it refuses when a lane
  already holds MAX_WAITING (address) or MAX_WAITING_USER (user) waiting turns, as
  the local queues do. When the slot comes, ``START`` says whether the attempt may
  start: not while an earlier turn of its lanes is there (a check running), nor
  before the lane's ``next``; so guesses spread over instances are checked one at a
  time, each ``delay(n)`` after the previous one ended, as in one process's queues.
  ``FINISH`` records what the check found (a failure; or a success, which clears
  the user's failures and makes the address known), ends its turns and sets the
  lanes' ``next`` start to ``delay(n)`` after the check ended; ``LEAVE`` gives the
  turns back when the client goes away.
- **Logged-in sessions per user and client address** (limits.py's
  ``max_connections_per_user_ip``): one hash per (user, address) with a field per
  instance. ``CLAIM`` sums the fields of live instances and adds one unless that
  reaches the limit; ``RELEASE`` takes one away. Instances are live while their
  heartbeat (``HEARTBEAT``, every HEARTBEAT seconds) is younger than INSTANCE_TTL: a
  crashed instance's sessions stop counting then, and a live one's heartbeat drops
  their fields (the janitor). An instance that could not write what it counted
  (Redis was away) writes it all again, whole (``RESYNC``; SessionTally knows when).

Only keyed hashes go to Redis: users as ``penalty.user_key`` (an HMAC whose key every
instance shares: ``[shared] key_file``, or a random one kept in Redis), wrong
passwords as ``penalty.fingerprint`` (HMAC of user and password); never a name or a
password. Client addresses (as limits.client_key counts them) are kept as they are.

Times are Redis' own clock (TIME), so the instances' clocks need not agree; each
script takes an explicit ``now`` instead for tests. The scripts run atomically in
Redis (EVALSHA), and need a standalone Redis 5 or later (not a Cluster: the janitor
reaches keys it is not given).

What is not shared: the local parallelism of lanes without failures (32 checks at
once per address, 4 per user) is per process; so are the connection limits other than
per user and address.

No I/O here: redisstate.py runs the scripts on a thread pool and feeds back what came
of them; this module says what to ask and what the answers mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Limits
from .penalty import MAX_KNOWN, MAX_WAITING, MAX_WAITING_USER, Refused
from .penaltylane import MAX_FINGERPRINTS

#: Seconds between an instance's heartbeats (also how often a down Redis is tried
#: when no login tries it).
HEARTBEAT = 5.0
#: Seconds after its last heartbeat an instance's sessions stop counting.
INSTANCE_TTL = 20.0
#: Seconds a turn is held at most after its start: a check that never reported its end
#: (its instance died) stops holding its lane then. Longer than any login takes
#: ([backend] connect_timeout + login_timeout are 40 s by default).
LEASE = 120.0
#: Seconds between two STARTs of an attempt whose turn came while an earlier one in
#: its lane has not ended: POLL first, doubling to POLL_MAX (a check takes
#: milliseconds, a failed one at Dovecot 0.5 s, or its auth_failure_delay, 2 s by
#: default; an attempt may also wait for its turn of admission pacing).
POLL = 0.1
POLL_MAX = 1.0
#: START's answer when an earlier turn has not ended (parse_start)
BUSY = -1.0
#: Seconds after Redis failed during which logins count locally without trying it.
RETRY_AFTER = 2.0
#: (user, address) pairs written per RESYNC call: a long script blocks Redis.
RESYNC_CHUNK = 500

# -- key names -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyNames:
    """Where everything is kept; ``prefix`` ([shared] prefix) comes first in every name."""

    prefix: str

    def address(self, address: str) -> tuple[str, str]:
        """An address's lane (failures, next start) and its turns."""
        return f"{self.prefix}a:{address}", f"{self.prefix}a:{address}:t"

    def user(self, ukey: bytes) -> tuple[str, str]:
        """A user's lane (failures, known addresses, next start) and its turns."""
        return f"{self.prefix}u:{ukey.hex()}", f"{self.prefix}u:{ukey.hex()}:t"

    def sessions(self, ukey: bytes, client: str) -> str:
        """The logged-in sessions of a user from a client address, per instance."""
        return f"{self.prefix}s:{ukey.hex()}:{client}"

    @property
    def instances(self) -> str:
        """The live instances, by time of their last heartbeat."""
        return f"{self.prefix}instances"

    def instance_keys(self, instance: str) -> str:
        """The session count keys an instance has a field in."""
        return f"{self.instance_keys_prefix}{instance}"

    @property
    def instance_keys_prefix(self) -> str:
        return f"{self.prefix}ik:"

    @property
    def hashing_key(self) -> str:
        """The key of the keyed hashes, when no [shared] key_file gives it."""
        return f"{self.prefix}key"


# -- what to ask ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One script to run: its name in sharedscripts.SCRIPTS, its KEYS and its ARGV."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class PenaltySettings:
    """The [limits] the scripts apply (every instance should have the same)."""

    base: float
    cap: float
    memory: float
    known_memory: float

    @classmethod
    def from_limits(cls, limits: Limits) -> PenaltySettings:
        return cls(limits.login_delay, limits.login_delay_max, limits.login_failure_memory,
                   limits.known_address_memory)


def _now(now: float | None) -> str:
    return "" if now is None else repr(now)


def enter(names: KeyNames, address: str, ukey: bytes, token: str,
          settings: PenaltySettings, now: float | None = None) -> Call:
    a_lane, a_turns = names.address(address)
    u_lane, u_turns = names.user(ukey)
    return Call("enter", (a_lane, a_turns, u_lane, u_turns),
                (address, token, _now(now), settings.base, settings.cap, settings.memory,
                 settings.known_memory, MAX_WAITING, MAX_WAITING_USER, LEASE))


def start(names: KeyNames, address: str, ukey: bytes, token: str,
          now: float | None = None) -> Call:
    return Call("start", (*names.address(address), *names.user(ukey)),
                (token, _now(now), LEASE))


def finish(names: KeyNames, address: str, ukey: bytes, token: str, outcome: str,
           fingerprint: bytes, settings: PenaltySettings, now: float | None = None) -> Call:
    """``outcome``: a penalty.Outcome's value."""
    a_lane, a_turns = names.address(address)
    u_lane, u_turns = names.user(ukey)
    return Call("finish", (a_lane, a_turns, u_lane, u_turns),
                (address, token, outcome, ukey.hex(), fingerprint.hex(), _now(now),
                 settings.base, settings.cap, settings.memory, settings.known_memory,
                 MAX_FINGERPRINTS, MAX_KNOWN))


def leave(names: KeyNames, address: str, ukey: bytes, token: str) -> Call:
    return Call("leave", (names.address(address)[1], names.user(ukey)[1]), (token,))


def claim(names: KeyNames, instance: str, ukey: bytes, client: str, limit: int,
          now: float | None = None) -> Call:
    return Call("claim", (names.sessions(ukey, client), names.instances,
                          names.instance_keys(instance)),
                (instance, limit, _now(now), INSTANCE_TTL))


def release(names: KeyNames, instance: str, ukey: bytes, client: str) -> Call:
    return Call("release", (names.sessions(ukey, client), names.instance_keys(instance)),
                (instance,))


def heartbeat(names: KeyNames, instance: str, offer: bytes | None,
              now: float | None = None) -> Call:
    """``offer``: the hashing key to keep in Redis if it has none (None: a key_file)."""
    return Call("heartbeat", (names.instances, names.hashing_key),
                (instance, _now(now), INSTANCE_TTL, names.instance_keys_prefix,
                 offer.hex() if offer is not None else ""))


def resync(names: KeyNames, instance: str, counts: Sequence[tuple[bytes, str, int]],
           now: float | None = None) -> list[Call]:
    """Write this instance's counts whole: ``counts`` is (user key, client, sessions)."""
    calls = []
    for start in range(0, max(1, len(counts)), RESYNC_CHUNK):
        pairs: list[str | int] = []
        for ukey, client, count in counts[start:start + RESYNC_CHUNK]:
            pairs += [names.sessions(ukey, client), count]
        calls.append(Call("resync", (names.instances, names.instance_keys(instance)),
                          (instance, _now(now), 1 if start == 0 else 0, *pairs)))
    return calls


def goodbye(names: KeyNames, instance: str) -> Call:
    return Call("goodbye", (names.instances, names.instance_keys(instance)), (instance,))


# -- what the answers mean -----------------------------------------------------------------


class BadAnswer(ValueError):
    """Redis answered something the scripts never send (another program's keys?)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the instances know of an attempt, and how long it must wait for its turn."""

    #: the user logged in from this address lately (on any instance)
    known: bool
    address_failures: int
    user_failures: int
    #: seconds until the turn reserved for it (0: none was needed)
    wait: float
    #: lanes a turn was reserved in (0, 1 or 2): LEAVE gives them back
    turns: int


#: ENTER's lane name -> the local Penalty's words for the same refusal
_REFUSALS = {b"address": "too many login attempts waiting for this address",
             b"user": "too many login attempts waiting for this user"}


def _text(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int | str):
        return str(value).encode()
    raise BadAnswer(f"unexpected {type(value).__name__}")


def parse_start(answer: Any) -> float:
    """START's answer: seconds to wait still (0: start now), or BUSY."""
    try:
        text = _text(answer)
        if text == b"busy":
            return BUSY
        return max(0.0, float(text))
    except (TypeError, ValueError) as e:
        raise BadAnswer(f"START: {e}") from None


def parse_enter(answer: Any) -> Verdict | Refused:
    try:
        status = _text(answer[0])
        if status == b"refused":
            return Refused(_REFUSALS[_text(answer[1])])
        if status != b"ok" or len(answer) != 6:
            raise BadAnswer(f"ENTER answered {status[:20]!r}")
        known, a_n, u_n, wait, turns = (_text(v) for v in answer[1:])
        return Verdict(known == b"1", int(a_n), int(u_n), max(0.0, float(wait)), int(turns))
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise BadAnswer(f"ENTER: {e}") from None


@dataclass(frozen=True, slots=True)
class Claimed:
    """CLAIM's answer."""

    granted: bool
    #: sessions of this user from this address on every live instance, this one included
    #: if granted
    sessions: int
    #: False: this instance had been taken for dead; its counts must be written again
    live: bool


def parse_claim(answer: Any) -> Claimed:
    try:
        granted, sessions, live = (int(_text(v)) for v in answer)
    except (TypeError, ValueError) as e:
        raise BadAnswer(f"CLAIM: {e}") from None
    return Claimed(granted == 1, sessions, live == 1)


@dataclass(frozen=True, slots=True)
class Beat:
    """HEARTBEAT's answer."""

    live: bool
    #: the hashing key kept in Redis (None with a key_file)
    key: bytes | None


def parse_heartbeat(answer: Any) -> Beat:
    try:
        live, key = answer
        text = _text(key)
        shared = bytes.fromhex(text.decode("ascii")) if text else None
        if shared is not None and len(shared) < 16:
            raise ValueError("the hashing key kept in Redis is too short")
        return Beat(int(_text(live)) == 1, shared)
    except (TypeError, ValueError) as e:
        raise BadAnswer(f"HEARTBEAT: {e}") from None


def key_from_file(secret: bytes) -> bytes:
    """The hashing key from a [shared] key_file's content (any length past the minimum)."""
    return hashlib.sha256(b"imapproxy shared key\x00" + secret).digest()


# -- whether to ask Redis at all -----------------------------------------------------------


class Availability:
    """Up, or down since a failure: then logins count locally without asking for
    RETRY_AFTER seconds, after which one call (a login's or the heartbeat's) tries
    again while the others still count locally. So a dead Redis costs one timeout per
    RETRY_AFTER, not one per login. The transitions return True once each, for the
    one log line they deserve."""

    def __init__(self, retry_after: float = RETRY_AFTER) -> None:
        self.retry_after = retry_after
        self.up = True
        self.retry_at = 0.0
        self.probing = False
        #: why it is down (for the log line)
        self.reason = ""

    def may_ask(self, now: float) -> bool:
        if self.up:
            return True
        if self.probing or now < self.retry_at:
            return False
        self.probing = True
        return True

    def failed(self, now: float, reason: str) -> bool:
        """A call failed or timed out; True if Redis was up until now."""
        self.probing = False
        self.retry_at = now + self.retry_after
        went_down = self.up
        self.up = False
        if went_down:
            self.reason = reason
        return went_down

    def answered(self) -> bool:
        """A call was answered; True if Redis was down until now."""
        self.probing = False
        came_back = not self.up
        self.up = True
        return came_back

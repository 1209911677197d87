# -*- test-case-name: tests.test_redisstate -*-
"""The shared state's Redis connection ([shared] redis): sharedstate.py's scripts, run
without blocking the reactor, with a fallback to counting locally.

The client library is redis-py (``redis`` on PyPI, ``python3-redis`` in Debian 12): it
is maintained by Redis itself and packaged in Debian 12, the stack this project
supports (txredisapi, the Twisted-native one, is neither in Debian nor much
maintained). It blocks, so it runs on Twisted ThreadPools of its own
(``deferToThreadPool``), as ldap3 does in ldapdirectory.py: one small pool for the
penalty's calls, and one single thread for the session counts, whose writes must
reach Redis in the order they were made (RESYNC writes absolute counts that later
increments build on). redis-py's socket_connect_timeout and socket_timeout are
``[shared] timeout``, with no retries, and each call also gets ``Deferred.addTimeout``
on the reactor's side: a login never waits on Redis longer than the timeout, even
when the threads are all busy (a call that waited past its time in the queue is
dropped unrun).

When Redis cannot be asked (unreachable, slow, its answer unreadable, the hashing key
not yet known), each login counts locally (this process's own penalty and limits),
the first such failure is logged once (``shared state unavailable, counting
locally: <reason>``), and counted (``imapproxy_shared_state_fallbacks_total``,
``imapproxy_shared_state_up``). For RETRY_AFTER seconds after a failure nobody asks
Redis; then one call tries it again (a login's, or the heartbeat's every HEARTBEAT
seconds), and when it answers, ``shared state available again`` is logged once and
this instance writes its session counts whole (SessionTally).

``reconfigure`` applies a changed [shared] section (SIGHUP): the old connection says
goodbye (its session counts leave Redis) and stops; the new one starts, and the
counts are written to it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import redis
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from . import sharedscripts, sharedstate
from .config import SharedConfig
from .metrics import NULL_METRICS, NullMetrics
from .penalty import Refused, user_key
from .redislink import Expired, Link, instance_id, redis_client
from .sessiontally import Claim, SessionTally
from .sharedstate import (
    HEARTBEAT,
    RETRY_AFTER,
    Availability,
    BadAnswer,
    Call,
    KeyNames,
    PenaltySettings,
    Verdict,
)

log = Logger(namespace="imapproxy")

#: Threads for the penalty's calls: a login makes one at its start and one at its end.
PENALTY_THREADS = 4


class RedisState(Service):
    """This process's side of the shared state; off while [shared] redis is unset."""

    def __init__(self, reactor: Any, config: SharedConfig, metrics: NullMetrics = NULL_METRICS,
                 *, instance: str | None = None, now: Callable[[], float | None] | None = None,
                 retry_after: float = RETRY_AFTER) -> None:
        self.reactor = reactor
        self.metrics = metrics
        self.instance = instance or instance_id()
        #: the time the scripts are given: None (Redis' own) but in tests
        self.now: Callable[[], float | None] = now or (lambda: None)
        self.tally = SessionTally()
        self.retry_after = retry_after
        self.availability = Availability(retry_after)
        #: offered to Redis as the hashing key if it has none yet
        self._candidate = os.urandom(32)
        self.config = config
        #: the key of the keyed hashes: from key_file, else learnt from Redis
        self._key: bytes | None = self._file_key(config)
        self._link: Link | None = None
        self._beat: task.LoopingCall | None = None
        self._resyncing = False
        #: links being closed (their goodbye under way)
        self._closing: set[defer.Deferred[None]] = set()

    @staticmethod
    def _file_key(config: SharedConfig) -> bytes | None:
        if config.url is None or config.key is None:
            return None
        return sharedstate.key_from_file(config.key.reveal())

    @property
    def enabled(self) -> bool:
        return self.config.url is not None

    @property
    def key(self) -> bytes | None:
        """The key of the keyed hashes every instance shares; None while unknown (or off)."""
        return self._key if self._link is not None else None

    @property
    def up(self) -> bool:
        return self._link is not None and self.availability.up

    # -- lifecycle -------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.enabled:
            self._open()

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802
        super().stopService()
        self._close()
        # With the links a reload replaced that are still saying goodbye.
        return defer.gatherResults(list(self._closing))

    def reconfigure(self, config: SharedConfig) -> None:
        """A reload: a changed [shared] section takes effect now."""
        old = self.config
        if config == old:
            return
        self._close()
        self.config = config
        if (config.url, config.prefix, config.key) != (old.url, old.prefix, old.key):
            self._key = self._file_key(config)  # learnt again from the new place
        self.availability = Availability(self.retry_after)
        if config.url is None:
            log.info("shared state: off; every process counts alone")
        if self.running and self.enabled:
            self._open()

    def _open(self) -> None:
        config = self.config
        client = redis_client(config)
        scripts = {name: client.register_script(text)
                   for name, text in sharedscripts.SCRIPTS.items()}
        penalty_pool = ThreadPool(1, PENALTY_THREADS, name="imapproxy-redis")
        sessions_pool = ThreadPool(1, 1, name="imapproxy-redis-sessions")
        penalty_pool.start()
        sessions_pool.start()
        self._link = Link(config, client, scripts, KeyNames(config.prefix), penalty_pool,
                           sessions_pool)
        log.info("shared state through {url}, this instance {instance}",
                 url=self._link.label, instance=self.instance)
        # Whatever Redis held of this instance is gone or stale: written whole once it
        # answers.
        self.tally.needs_resync = True
        self._beat = task.LoopingCall(self.heartbeat)
        self._beat.clock = self.reactor
        self._beat.start(HEARTBEAT, now=True)

    def _close(self) -> defer.Deferred[None]:
        """Stop the heartbeat; this instance's counts leave Redis (within the timeout);
        then the threads stop."""
        link, self._link = self._link, None
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        self._resyncing = False
        if link is None:
            return defer.succeed(None)
        goodbye = self._ask(link, link.sessions_pool,
                            sharedstate.goodbye(link.names, self.instance))

        def stop(_result: object) -> None:
            self._closing.discard(closed)
            link.penalty_pool.stop()
            link.sessions_pool.stop()
            link.client.close()
        closed = goodbye.addErrback(lambda _f: None).addCallback(stop)
        if not closed.called:
            self._closing.add(closed)
        return closed

    # -- calls -----------------------------------------------------------------------------

    def _ask(self, link: Link, pool: ThreadPool, *calls: Call) -> defer.Deferred[Any]:
        """Run the calls in order on a thread of ``pool``: the last one's answer, or a
        failure; within the timeout (for each call) whatever happens."""
        deadline = time.monotonic() + link.timeout

        def work() -> Any:
            if time.monotonic() > deadline:
                raise Expired()  # waited too long in the queue: its caller has moved on
            answer = None
            for call in calls:
                answer = link.scripts[call.script](keys=list(call.keys), args=list(call.args))
            return answer
        d = threads.deferToThreadPool(self.reactor, pool, work)
        d.addTimeout(link.timeout * len(calls), self.reactor)
        return d

    def _usable(self, what: str | None) -> Link | None:
        """The link to ask now, or None: count locally (``what`` is counted so)."""
        link = self._link
        if link is None or self._key is None \
                or not self.availability.may_ask(self.reactor.seconds()):
            if what is not None and link is not None:
                self.metrics.shared_state_fallback(what)
            return None
        return link

    def _answered(self, link: Link) -> None:
        if link is not self._link:
            return
        if self.availability.answered():
            log.info("shared state available again ({url}); sharing the penalty and the "
                     "session counts", url=link.label)
            self._maybe_resync()
        self.metrics.shared_state_up(True)

    def _failed(self, link: Link, failure: Failure) -> None:
        if link is not self._link:
            return
        reason = self._reason(link, failure)
        if self.availability.failed(self.reactor.seconds(), reason):
            log.warn("shared state unavailable, counting locally: {reason} ({url})",
                     reason=reason, url=link.label)
        self.metrics.shared_state_up(False)

    @staticmethod
    def _reason(link: Link, failure: Failure) -> str:
        """Why a call failed, in words fit for the log (never the password)."""
        # Whichever gave up first: the reactor's addTimeout, or redis-py's socket
        # timeout in the thread (the same [shared] timeout).
        if failure.check(defer.TimeoutError, Expired, redis.exceptions.TimeoutError,
                         TimeoutError):
            reason = f"no answer within {link.timeout:g} s"
        elif failure.check(redis.exceptions.RedisError, OSError, BadAnswer):
            reason = f"{type(failure.value).__name__}: {str(failure.value)[:200]}"
        else:
            log.failure("shared state: unexpected error", failure)
            reason = f"unexpected {type(failure.value).__name__}"
        password = link.config.url.password if link.config.url is not None else None
        if password is not None:
            reason = reason.replace(password.reveal().decode("utf-8", "replace"), "***")
        return reason

    # -- the penalty (sharedgate.SharedGate) -----------------------------------------------

    def enter(self, address: str, ukey: bytes, token: str,
              settings: PenaltySettings) -> defer.Deferred[Verdict | Refused | None]:
        """What the instances know of this attempt, and its turn: a Verdict, Refused,
        or None (count locally). Fails only with CancelledError."""
        link = self._usable("penalty")
        if link is None:
            return defer.succeed(None)
        d = self._ask(link, link.penalty_pool,
                      sharedstate.enter(link.names, address, ukey, token, settings,
                                        self.now()))

        def answered(answer: Any) -> Verdict | Refused:
            verdict = sharedstate.parse_enter(answer)
            self._answered(link)
            return verdict

        def failed(failure: Failure) -> Any:
            if failure.check(defer.CancelledError):
                return failure  # the client went away: nobody waits for an answer
            self._failed(link, failure)
            self.metrics.shared_state_fallback("penalty")
            return None
        return d.addCallback(answered).addErrback(failed)

    def start(self, address: str, ukey: bytes, token: str) -> defer.Deferred[float | None]:
        """An attempt's turn came: seconds it must wait still (0: start now), BUSY (an
        earlier check has not ended: ask again), or None (Redis unavailable: start
        now). Never fails."""
        link = self._usable(None)
        if link is None:
            return defer.succeed(None)
        d = self._ask(link, link.penalty_pool,
                      sharedstate.start(link.names, address, ukey, token, self.now()))

        def answered(answer: Any) -> float:
            wait = sharedstate.parse_start(answer)
            self._answered(link)
            return wait

        def failed(failure: Failure) -> None:
            self._failed(link, failure)
        return d.addCallback(answered).addErrback(failed)

    # What is sent without waiting for an answer returns a Deferred that fires (never
    # fails) once it is done, or None if nothing was sent: for tests.

    def finish(self, address: str, ukey: bytes, token: str, outcome: str, fingerprint: bytes,
               settings: PenaltySettings) -> defer.Deferred[None] | None:
        """What an attempt's check found (sent, not waited for)."""
        link = self._usable(None)
        if link is None:
            return None
        return self._send(link, link.penalty_pool, sharedstate.finish(
            link.names, address, ukey, token, outcome, fingerprint, settings, self.now()))

    def leave(self, address: str, ukey: bytes, token: str) -> defer.Deferred[None] | None:
        """An attempt's client went away: its turns are given back (sent, not waited for)."""
        link = self._usable(None)
        if link is None:
            return None
        return self._send(link, link.penalty_pool,
                          sharedstate.leave(link.names, address, ukey, token))

    def _send(self, link: Link, pool: ThreadPool, call: Call,
              failed: Callable[[], None] | None = None) -> defer.Deferred[None]:
        def bad(failure: Failure) -> None:
            if failed is not None:
                failed()
            self._failed(link, failure)
        return self._ask(link, pool, call).addCallbacks(lambda _a: self._answered(link), bad)

    # -- the session counts (frontend.py, login.py's ClaimSession) ------------------------

    def claim(self, user: str, client: str, limit: int) -> defer.Deferred[Claim | None]:
        """Count a logged-in session of ``user`` from ``client`` on every instance: the
        Claim to release when it ends, or None when that reaches ``limit``. Never fails:
        Redis unavailable, it is counted here only."""
        tally = self.tally
        claim = tally.begin(user, client)
        link = self._usable("sessions")
        if link is None or self._key is None:  # (the key is known when there is a link)
            tally.counted_locally(claim)
            return defer.succeed(claim)
        call = sharedstate.claim(link.names, self.instance, user_key(self._key, claim.user),
                                 client, limit, self.now())

        def answered(answer: Any) -> Claim | None:
            claimed = sharedstate.parse_claim(answer)
            if claimed.granted:
                tally.granted(claim)
            else:
                tally.refused(claim)
            if not claimed.live:
                tally.needs_resync = True  # taken for dead: our other counts may be gone
            self._answered(link)
            self._maybe_resync()
            return claim if claimed.granted else None

        def failed(failure: Failure) -> Claim:
            tally.counted_locally(claim)
            self._failed(link, failure)
            self.metrics.shared_state_fallback("sessions")
            return claim
        return self._ask(link, link.sessions_pool, call).addCallback(answered).addErrback(failed)

    def release(self, claim: Claim) -> defer.Deferred[None] | None:
        """A counted session ended (sent, not waited for)."""
        if not self.tally.release(claim):
            return None
        link = self._usable(None)
        if link is None or self._key is None:
            self.tally.write_failed()
            return None
        return self._send(link, link.sessions_pool,
                   sharedstate.release(link.names, self.instance,
                                       user_key(self._key, claim.user), claim.client),
                   failed=self.tally.write_failed)

    # -- heartbeat, hashing key, resync ----------------------------------------------------

    def heartbeat(self) -> defer.Deferred[None] | None:
        """Tell Redis this instance lives, learn the hashing key, clear dead instances'
        counts; also how a Redis that was down is found back when no login asks."""
        link = self._link
        if link is None or not self.availability.may_ask(self.reactor.seconds()):
            return None
        offer = None if link.config.key is not None else (self._key or self._candidate)
        d = self._ask(link, link.sessions_pool,
                      sharedstate.heartbeat(link.names, self.instance, offer, self.now()))

        def answered(answer: Any) -> None:
            beat = sharedstate.parse_heartbeat(answer)
            if link is not self._link:
                return
            if not beat.live:
                self.tally.needs_resync = True
            if beat.key is not None and beat.key != self._key:
                if self._key is not None:
                    log.warn("shared state: the hashing key kept in Redis changed (was "
                             "Redis emptied?); using it")
                self._key = beat.key
                self.tally.needs_resync = True  # the counts were written under the old one
            self._answered(link)
            self._maybe_resync()
        # A heartbeat that fails does no harm beyond the state it reports.
        return d.addCallback(answered).addErrback(lambda f: self._failed(link, f))

    def _maybe_resync(self) -> None:
        """Write this instance's session counts whole, if they are due and can be."""
        link = self._link
        if link is None or self._key is None or self._resyncing \
                or not self.tally.needs_resync or not self.availability.up:
            return
        snapshot = self.tally.snapshot()
        if snapshot is None:
            return  # a CLAIM is in flight: its answer calls again
        key = self._key
        calls = sharedstate.resync(link.names, self.instance,
                                   [(user_key(key, user), client, count)
                                    for user, client, count in snapshot], self.now())
        self._resyncing = True

        def done(result: object) -> None:
            self._resyncing = False
            if isinstance(result, Failure):
                self.tally.write_failed()
                self._failed(link, result)
            else:
                self._answered(link)
        self._ask(link, link.sessions_pool, *calls).addBoth(done)

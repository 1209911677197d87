# -*- test-case-name: tests.test_ldapdirectory -*-
"""Per-user routing from an LDAP directory: ``LdapDirectory``, the Twisted side.

Three modules below it, so most of it is testable without a server:

- ldapentry.py: pure mapping (``parse_entry``, ``select_entry``, ``route_for``) from
  search results to a ``Route``;
- routecache.py: ``RouteCache``, positive/negative TTLs, an LRU size bound, and stale
  answers for when LDAP is down;
- ldapsearch.py: ``LdapSearcher``, blocking ldap3 calls, one pooled connection per
  worker thread.

This module runs the searcher only on a dedicated ``ThreadPool`` (never on the
reactor thread; ``LdapPoolService`` starts and stops it) and glues the three
together on the reactor thread.

What Perdition's LDAP map got wrong, and what this module does instead
(see shared/reference/perdition.md): the login is RFC 4515 escaped (ldapfilter.py);
a search matching several entries is a refused login, not a crash (ldapentry.py); an
unreachable directory is ``DirectoryUnavailable`` (a temporary failure for the
client), never a silent fall-back to a default server; LDAPv3 only, connections
pooled and re-established after a server restart, the bind password never logged
(ldapsearch.py). URIs are read by ldapurl.py (every RFC 4516 form, and ldapi), not
by ldap3; the directory is tried once at start and at each reload, and a silent one
is logged, not fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ldap3.core.exceptions import LDAPException
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .breaker import CircuitBreaker, Clock
from .config import CacheConfig, Config, ConfigError, LdapConfig
from .directory import Route
from .errors import DirectoryUnavailable, UserNotFound
from .ldapentry import BadEntry, Entry, parse_entry, route_for, select_entry
from .ldapfilter import build_filter
from .ldapsearch import LdapSearcher, Search, SearchResult
from .logquote import quoted
from .routecache import RouteCache

#: Seconds an LDAP URI that failed is tried last. Short: a directory outage hurts
#: every login, so a recovered server must be noticed soon; long enough that a
#: black-holed first URI does not cost every lookup a full timeout.
URI_COOLDOWN = 10.0


class LdapPoolService(Service):
    """Starts and stops the directory's thread pool with the proxy's service tree.

    Once the pool runs, ``probe`` (the directory's) tries the directory once, in
    the background: start-up never waits for LDAP.
    """

    def __init__(self, pool: ThreadPool, searcher: LdapSearcher | None = None,
                 probe: Callable[[], Deferred[bool]] | None = None) -> None:
        self.pool = pool
        self.searcher = searcher
        self.probe = probe
        #: the start-up probe's outcome (True: the directory answered), once started
        self.probed: Deferred[bool] | None = None
        self.setName("ldap-directory")

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        if self.probe is not None:
            self.probed = self.probe()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        # Joins the workers: waits for searches in flight (bounded by the timeout).
        self.pool.stop()
        if self.searcher is not None:
            self.searcher.close()
        return None


# --------------------------------------------------------------------------------------
# The Directory


class LdapDirectory:
    """The Directory for ``[directory] type = "ldap"``: cached, pooled, failing over."""

    log = Logger()

    def __init__(
        self,
        cfg: LdapConfig,
        cache: CacheConfig,
        *,
        clock: Clock,
        run_in_thread: Callable[[Callable[[], SearchResult]], Deferred[SearchResult]],
        search: Search,
        delimiter: str = "@",
        uri_cooldown: float = URI_COOLDOWN,
        service: Service | None = None,
        probe_search: Callable[[Sequence[str]], SearchResult] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.cache = RouteCache(cache, clock)
        self.uri_health: CircuitBreaker[str] = CircuitBreaker(clock, uri_cooldown)
        self.delimiter = delimiter
        self._run = run_in_thread
        self._search = search
        self._probe_search = probe_search
        # Concurrent lookups of one name share one search (a reconnect storm of
        # one user's devices, or a cold cache under load).
        self._inflight: dict[str, list[Deferred[Entry]]] = {}
        #: an IService to add to the proxy's service tree (runs the thread pool)
        self.service: Service = service if service is not None else Service()

    @classmethod
    def from_config(cls, config: Config, reactor: Any, clock: Clock | None = None) -> LdapDirectory:
        """Build from [directory.ldap], [directory.cache] and [username].

        ``clock`` (for TTLs and URI cooldowns) defaults to the reactor; tests pass a
        ``Clock`` while the thread pool still reports back through the real reactor.
        """
        ldap = config.directory.ldap
        if ldap is None:
            raise ConfigError(config.path, "directory.ldap", 'is required when type = "ldap"')
        try:
            # ldap3 parses the filter before sending it; a template it cannot parse
            # should stop the start-up, not fail every login.
            from ldap3.operation.search import parse_filter

            parse_filter(build_filter(ldap.filter, "u@d", config.username.domain_delimiter),
                         None, True, True, None, False)
        except LDAPException as e:
            raise ConfigError(config.path, "directory.ldap.filter", str(e)) from None
        pool = ThreadPool(minthreads=0, maxthreads=ldap.pool_size, name="imapproxy-ldap")
        searcher = LdapSearcher(ldap, slots=ldap.pool_size)
        service = LdapPoolService(pool, searcher)
        directory = cls(
            ldap,
            config.directory.cache,
            clock=reactor if clock is None else clock,
            run_in_thread=partial(deferToThreadPool, reactor, pool),
            search=searcher.search,
            delimiter=config.username.domain_delimiter,
            service=service,
            probe_search=searcher.probe,
        )
        # The service starts the pool, and only then can the directory be tried.
        service.probe = directory.probe
        return directory

    def clear_cache(self) -> None:
        """Forget cached answers and URI health (reload / SIGHUP)."""
        self.cache.clear()
        self.uri_health = CircuitBreaker(self.clock, self.uri_health.cooldown)
        self.log.info("LDAP directory cache cleared")

    def probe(self, when: str = "start") -> Deferred[bool]:
        """Try the directory once, in the background, and log whether it answers.

        Called when the service starts (``when`` = "start") and after a reload
        that kept this directory ("reload"). Never fails: an unreachable directory
        is logged, and the proxy goes on, since cached routes and a later recovery
        may serve. Leaves the URI health alone: lookups judge the URIs themselves.
        """
        if self._probe_search is None:
            return succeed(True)
        d = self._run(partial(self._probe_search, list(self.cfg.uris)))
        return d.addBoth(self._probed, when)

    def _probed(self, result: SearchResult | Failure, when: str) -> bool:
        if isinstance(result, Failure):
            self.log.failure("LDAP probe raised", result)
            return False
        if result.entries is None:
            failed = "; ".join(f"{uri}: {reason}" for uri, reason in result.failures)
            going_on = "starting anyway" if when == "start" else "reloaded anyway"
            self.log.error(
                "LDAP directory does not answer (every URI failed: {failed}); {going_on}: "
                "cached routes and a later recovery may serve",
                failed=failed, going_on=going_on)
            return False
        for uri, reason in result.failures:
            self.log.warn("LDAP server {uri} failed: {reason}", uri=uri, reason=reason)
        if not result.entries:
            # Searching a base that is not there finds no one: every login would
            # be refused as an unknown user.
            self.log.warn("LDAP directory answers at {uri}, but has no entry {base} "
                          "(noSuchObject): check [directory.ldap] base",
                          uri=result.answered, base=self.cfg.base)
        else:
            self.log.info("LDAP directory answers at {uri}", uri=result.answered)
        return True

    def lookup(
        self, username: str, protocol: str, backend_login: str | None = None
    ) -> Deferred[Route]:
        """Route ``username`` (the rewritten lookup name) for "imap", "pop3" or
        "managesieve".

        The backend login is the entry's login_attribute if it has one, else
        ``backend_login``, else ``username``. Fails with UserNotFound (no entry, or
        an unusable one) or DirectoryUnavailable (LDAP down and nothing to serve).
        """
        if protocol not in ("imap", "pop3", "managesieve"):
            return fail(ValueError(f"unknown protocol {protocol!r}"))
        login = backend_login or username
        return self._entry(username).addCallback(
            lambda entry: route_for(entry, protocol, login))

    def _entry(self, user: str) -> Deferred[Entry]:
        cached = self.cache.fresh(user)
        if cached is not None:
            if cached.entry is None:
                return fail(UserNotFound(cached.reason))
            return succeed(cached.entry)
        if user in self._inflight:
            waiter: Deferred[Entry] = Deferred()
            self._inflight[user].append(waiter)
            return waiter
        if all(self.uri_health.is_down(uri) for uri in self.cfg.uris):
            # Every server failed moments ago: answer from the stale cache at once
            # instead of making this login wait out the timeouts again.
            stale = self._serve_stale(user)
            if stale is not None:
                return succeed(stale)
        try:
            search_filter = build_filter(self.cfg.filter, user, self.delimiter)
        except ValueError:
            self.log.info("LDAP: no route for {user}: not valid Unicode", user=quoted(user))
            return fail(UserNotFound("login name is not valid Unicode"))
        self._inflight[user] = []
        uris = self.uri_health.order(self.cfg.uris)
        d = self._run(partial(self._search, uris, search_filter))
        return d.addBoth(self._searched, user)

    def _searched(self, result: SearchResult | Failure, user: str) -> Entry:
        waiters = self._inflight.pop(user, [])
        outcome: Entry | Failure
        try:
            outcome = self._outcome(result, user)
        except (UserNotFound, DirectoryUnavailable) as e:
            outcome = Failure(e)
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(Failure(outcome.value))
            else:
                waiter.callback(outcome)
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome

    def _outcome(self, result: SearchResult | Failure, user: str) -> Entry:
        if isinstance(result, Failure):
            # A bug, not an outage; still, the client gets a temporary failure and
            # the proxy keeps running.
            self.log.failure("LDAP search for {user} raised", result, user=quoted(user))
            return self._unavailable(user)
        for uri, reason in result.failures:
            self.uri_health.mark_failed(uri)
            self.log.warn("LDAP server {uri} failed: {reason}", uri=uri, reason=reason)
        if result.entries is None:
            return self._unavailable(user)
        if result.answered is not None:
            self.uri_health.mark_ok(result.answered)
        try:
            dn, attributes = select_entry(user, result.entries)
            entry = parse_entry(dn, attributes, self.cfg)
        except BadEntry as e:
            self.log.warn("LDAP: no route for {user}: {reason}", user=quoted(user),
                          reason=str(e))
            self.cache.put(user, None, str(e))
            raise
        except UserNotFound as e:
            self.log.info("LDAP: no route for {user}: {reason}", user=quoted(user),
                          reason=str(e))
            self.cache.put(user, None, str(e))
            raise
        self.cache.put(user, entry)
        return entry

    def _serve_stale(self, user: str) -> Entry | None:
        stale = self.cache.stale(user)
        if stale is None:
            return None
        entry, age = stale
        self.log.warn(
            "LDAP unavailable: serving stale cached route for {user} ({age:.0f}s old)",
            user=quoted(user), age=age,
        )
        return entry

    def _unavailable(self, user: str) -> Entry:
        entry = self._serve_stale(user)
        if entry is None:
            self.log.error("LDAP unavailable and no cached route for {user}", user=quoted(user))
            raise DirectoryUnavailable(f"no LDAP server answered for {user!r}")
        return entry

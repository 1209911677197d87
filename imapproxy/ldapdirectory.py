# -*- test-case-name: tests.test_ldapdirectory -*-
"""Per-user routing from an LDAP directory: which store holds each mailbox.

Three layers, so most of it is testable without a server:

- pure mapping (``parse_entry``, ``select_entry``, ``route_for``) from search results
  to a ``Route``;
- ``RouteCache``: positive/negative TTLs, an LRU size bound, and stale answers for
  when LDAP is down;
- ``LdapSearcher``: blocking ldap3 calls, run only on a dedicated ``ThreadPool``
  (never on the reactor thread), one pooled connection per worker thread;
  ``LdapDirectory`` glues them together on the reactor thread.

What Perdition's LDAP map got wrong, and what this module does instead
(see shared/reference/perdition.md): the login is RFC 4515 escaped (ldapfilter.py);
a search matching several entries is a refused login, not a crash; an unreachable
directory is ``DirectoryUnavailable`` (a temporary failure for the client), never a
silent fall-back to a default server; LDAPv3 only; connections are pooled and
re-established after a server restart; the bind password is never logged. URIs are
read by ldapurl.py (every RFC 4516 form, and ldapi), not by ldap3; the directory is
tried once at start and at each reload, and a silent one is logged, not fatal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import queue
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import ldap3
from ldap3.core.exceptions import LDAPException
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .breaker import CircuitBreaker, Clock
from .config import CacheConfig, Config, ConfigError, LdapConfig
from .directory import Route, Server, parse_server, rendezvous_order
from .errors import DirectoryUnavailable, UserNotFound
from .ldapfilter import build_filter
from .ldapurl import LdapUri, parse_ldap_uri
from .logquote import quoted

T = TypeVar("T")

#: Seconds an LDAP URI that failed is tried last. Short: a directory outage hurts
#: every login, so a recovered server must be noticed soon; long enough that a
#: black-holed first URI does not cost every lookup a full timeout.
URI_COOLDOWN = 10.0

#: Two entries are enough to know a search is ambiguous; asking for no more also
#: bounds what a hostile filter value could pull out of the directory.
SIZE_LIMIT = 2

# RFC 4511 section 4.1.9 result codes that mean "the search ran": success, and
# sizeLimitExceeded, which with SIZE_LIMIT = 2 means "at least two entries".
_SEARCH_OK = {0, 4}
# noSuchObject (RFC 4511 appendix A.1): the base DN does not exist there, so no
# entry can match. An answer, not an outage.
_NO_SUCH_OBJECT = 32

_SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}

Attributes = Mapping[str, Sequence[bytes]]
RawEntry = tuple[str, Attributes]


class BadEntry(UserNotFound):
    """The directory answered, but not with exactly one usable entry for the user.

    The client sees the same answer as for an unknown user; the operator sees the
    reason in the log, because this is a data problem worth fixing.
    """


# --------------------------------------------------------------------------------------
# Pure mapping: search results -> Entry -> Route


@dataclass(frozen=True, slots=True)
class Entry:
    """What the directory says about one user, before the protocol is known."""

    dn: str
    servers: tuple[Server, ...]
    imap_port: int | None = None
    pop3_port: int | None = None
    managesieve_port: int | None = None
    #: the login name the entry gives for the backend (login_attribute), if any
    login: str | None = None


def _values(attributes: Attributes, name: str) -> list[bytes]:
    # Attribute descriptions are case-insensitive (RFC 4512 section 2.5), and the
    # server answers with the schema's spelling, not necessarily the config's.
    wanted = name.lower()
    return [v for key, values in attributes.items() if key.lower() == wanted for v in values]


def _text(dn: str, name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEntry(f"{dn}: {name} is not UTF-8") from None


def _single(dn: str, attributes: Attributes, name: str) -> str | None:
    if not name:
        return None
    values = _values(attributes, name)
    if not values:
        return None
    if len(values) > 1:
        raise BadEntry(f"{dn}: {name} has {len(values)} values, expected one")
    return _text(dn, name, values[0]).strip()


def _port(dn: str, attributes: Attributes, name: str) -> int | None:
    text = _single(dn, attributes, name)
    if text is None:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadEntry(f"{dn}: {name} {text!r} is not a port number")
    return int(text)


def parse_entry(dn: str, attributes: Attributes, cfg: LdapConfig) -> Entry:
    """Map one entry's raw attributes to an Entry; raises BadEntry.

    Strict on purpose: a value we cannot read makes the whole entry unusable, so a
    typo in the directory shows up in the log rather than as a half-working route.
    """
    hosts = _values(attributes, cfg.host_attribute)
    if not hosts:
        raise BadEntry(f"{dn}: no {cfg.host_attribute}")
    servers: list[Server] = []
    for raw in hosts:
        text = _text(dn, cfg.host_attribute, raw)
        try:
            server = parse_server(text)
        except ValueError as e:
            raise BadEntry(f"{dn}: {cfg.host_attribute} {text!r}: {e}") from None
        if server not in servers:
            servers.append(server)
    login = _single(dn, attributes, cfg.login_attribute)
    if login == "":
        raise BadEntry(f"{dn}: {cfg.login_attribute} is empty")
    return Entry(
        dn=dn,
        servers=tuple(servers),
        imap_port=_port(dn, attributes, cfg.imap_port_attribute),
        pop3_port=_port(dn, attributes, cfg.pop3_port_attribute),
        managesieve_port=_port(dn, attributes, cfg.managesieve_port_attribute),
        login=login,
    )


def select_entry(user: str, entries: Sequence[RawEntry]) -> RawEntry:
    """The one entry a search found; raises UserNotFound or BadEntry (ambiguous)."""
    if not entries:
        raise UserNotFound(f"no entry for {user!r}")
    if len(entries) > 1:
        # Never a guess: Perdition meant to take the first and crashed instead.
        dns = ", ".join(dn for dn, _ in entries[:SIZE_LIMIT])
        raise BadEntry(f"search for {user!r} matched several entries ({dns}, ...)")
    return entries[0]


def route_for(entry: Entry, protocol: str, login: str) -> Route:
    """The route for one protocol: port attribute, else host's port, else [backend]'s.

    Equivalent servers are ordered by rendezvous hashing on the entry's DN rather
    than on the login name: a user who logs in as "alice" from one device and as
    "alice@example.org" from another (a filter matching uid or mail) reaches the
    same entry, so all of that mailbox's sessions land on the same server.
    """
    if protocol == "imap":
        port = entry.imap_port
    elif protocol == "pop3":
        port = entry.pop3_port
    elif protocol == "managesieve":
        port = entry.managesieve_port
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    servers = entry.servers
    if port is not None:
        servers = tuple(dict.fromkeys(Server(s.host, port) for s in servers))
    ordered = rendezvous_order(entry.dn.lower(), servers)
    return Route(entry.login or login, tuple(ordered))


# --------------------------------------------------------------------------------------
# Cache


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


# --------------------------------------------------------------------------------------
# Blocking LDAP I/O: runs on the directory's thread pool only


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What one search attempt across the URIs gave."""

    #: the entries found, or None when no URI could answer
    entries: list[RawEntry] | None
    #: the URI that answered
    answered: str | None = None
    #: (uri, reason) for each URI that failed before the answer (or all of them)
    failures: list[tuple[str, str]] = field(default_factory=list)


Search = Callable[[Sequence[str], str], SearchResult]


class SearchFailed(Exception):
    """One URI could not answer (socket, TLS, bind or server-side error)."""


@dataclass(slots=True)
class _Slot:
    conn: Any = None  # ldap3.Connection; the stubs are not typed
    uri: str | None = None

    def drop(self) -> None:
        conn, self.conn, self.uri = self.conn, None, None
        if conn is not None:
            # It is being thrown away, usually because it is broken.
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class LdapSearcher:
    """Blocking ldap3 searches over a fixed set of pooled connections.

    ``search`` may be called from up to ``slots`` threads at once: each call takes a
    slot (one ldap3 connection, which is not thread-safe) for its duration. With one
    slot per pool thread, taking a slot never waits.
    """

    def __init__(self, cfg: LdapConfig, slots: int) -> None:
        self.cfg = cfg
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._all = [_Slot() for _ in range(slots)]
        self._targets = {uri: parse_ldap_uri(uri) for uri in cfg.uris}
        for slot in self._all:
            self._slots.put(slot)

    def _target(self, uri: str) -> LdapUri:
        target = self._targets.get(uri)
        if target is None:
            # Checked at config load, so this does not raise for configured URIs.
            target = self._targets[uri] = parse_ldap_uri(uri)
        return target

    def _starttls(self, target: LdapUri) -> bool:
        # Not over ldapi: a local socket is not on any network to protect, and a
        # certificate could not name it.
        return self.cfg.starttls and target.scheme == "ldap"

    def _server(self, uri: str) -> Any:
        target = self._target(uri)
        if target.socket_path is not None:
            # ldap3 2.9 takes the socket path from an "ldapi://" string: it
            # percent-decodes what follows "ldapi:/", the last "/" of the scheme
            # included, so the path goes in without its leading "/".
            encoded = quote(target.socket_path.removeprefix("/"), safe="")
            return ldap3.Server(f"ldapi://{encoded}", get_info=ldap3.NONE,
                                connect_timeout=self.cfg.timeout)
        tls = None
        if target.implicit_tls or self._starttls(target):
            # ldap3 checks the name itself after the handshake (ssl's check_hostname
            # is off in its context) whenever validate is CERT_REQUIRED.
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(self.cfg.ca_file) if self.cfg.ca_file else None,
                sni=None if _is_ip(target.host) else target.host,
            )
        # Host, port and TLS given apart, never the URI: ldap3 2.9 parses URIs
        # itself and fails on the trailing "/" of the usual form ("port must be an
        # integer"). An IPv6 address goes in without brackets.
        return ldap3.Server(
            target.host, port=target.port, use_ssl=target.implicit_tls,
            get_info=ldap3.NONE, connect_timeout=self.cfg.timeout, tls=tls,
        )

    def search(self, uris: Sequence[str], search_filter: str) -> SearchResult:
        """Try the URIs in order; the first that answers wins."""
        return self._first_answer(uris, partial(self._search, search_filter=search_filter))

    def probe(self, uris: Sequence[str]) -> SearchResult:
        """Read the base entry (no attributes) from the first URI that answers.

        The same connections, TLS and bind as a lookup, at the cost of one entry:
        entries is [] when the base DN is not there (noSuchObject).
        """
        return self._first_answer(uris, self._read_base)

    def _first_answer(self, uris: Sequence[str],
                      operation: Callable[[Any], list[RawEntry]]) -> SearchResult:
        slot = self._slots.get()
        try:
            failures: list[tuple[str, str]] = []
            for uri in uris:
                try:
                    entries = self._search_on(slot, uri, operation)
                except SearchFailed as e:
                    failures.append((uri, str(e)))
                    continue
                return SearchResult(entries, uri, failures)
            return SearchResult(None, None, failures)
        finally:
            self._slots.put(slot)

    def _search_on(self, slot: _Slot, uri: str,
                   operation: Callable[[Any], list[RawEntry]]) -> list[RawEntry]:
        if slot.conn is not None and slot.uri == uri:
            try:
                return operation(slot.conn)
            except (LDAPException, OSError) as e:
                slot.drop()
                if isinstance(e, TimeoutError):
                    raise SearchFailed(f"timed out: {e}") from None
                # A pooled connection dies with a restarted server (or an idle
                # timeout on its side): one retry on a fresh connection, so the
                # proxy recovers without a restart.
            except SearchFailed:
                slot.drop()
                raise
        slot.drop()
        try:
            slot.conn, slot.uri = self._connect(uri), uri
            return operation(slot.conn)
        except (LDAPException, OSError) as e:
            slot.drop()
            raise SearchFailed(str(e) or type(e).__name__) from None
        except SearchFailed:
            slot.drop()
            raise

    def _connect(self, uri: str) -> Any:
        cfg = self.cfg
        conn = ldap3.Connection(
            # A new ldap3.Server each time: a Server remembers addresses that
            # failed and refuses them later ("invalid server address"), which
            # would outlast the LDAP server's restart.
            self._server(uri),
            user=cfg.bind_dn or None,
            password=cfg.bind_password or None,
            authentication=ldap3.SIMPLE if cfg.bind_dn else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            # Not receive_timeout: ldap3 2.9 packs it into SO_RCVTIMEO with
            # struct "LL", which fails for a fractional timeout. Server's
            # connect_timeout is set with settimeout() before connect() and stays
            # on the socket (and its TLS wrapper), so it bounds every read and the
            # TLS handshake too.
            receive_timeout=None,
            read_only=True,
            auto_referrals=False,
            raise_exceptions=False,
        )
        try:
            conn.open()
            if self._starttls(self._target(uri)) and not conn.start_tls():
                raise SearchFailed("StartTLS refused")
            if not conn.bind():
                # The result's description ("invalidCredentials") names the problem;
                # the password is never part of any message we build.
                who = cfg.bind_dn or "anonymous"
                raise SearchFailed(f"bind as {who} failed: {conn.result.get('description')}")
        except BaseException:
            _Slot(conn).drop()
            raise
        return conn

    def _search(self, conn: Any, search_filter: str) -> list[RawEntry]:
        cfg = self.cfg
        attributes = [a for a in (cfg.host_attribute, cfg.imap_port_attribute,
                                  cfg.pop3_port_attribute, cfg.managesieve_port_attribute,
                                  cfg.login_attribute) if a]
        conn.search(
            search_base=cfg.base,
            search_filter=search_filter,
            search_scope=_SCOPES[cfg.scope],
            attributes=attributes,
            size_limit=SIZE_LIMIT,
            time_limit=max(1, math.ceil(cfg.timeout)),
        )
        return self._entries(conn)

    def _entries(self, conn: Any) -> list[RawEntry]:
        code = conn.result.get("result")
        if code == _NO_SUCH_OBJECT:
            return []
        if code not in _SEARCH_OK:
            raise SearchFailed(f"search failed: {conn.result.get('description')}")
        return [
            (item["dn"], item.get("raw_attributes", {}))
            for item in conn.response or []
            if item.get("type") == "searchResEntry"  # continuation references ignored
        ]

    def _read_base(self, conn: Any) -> list[RawEntry]:
        conn.search(
            search_base=self.cfg.base,
            search_filter="(objectClass=*)",
            search_scope=ldap3.BASE,
            # RFC 4511 section 4.5.1.8: "1.1" asks for no attributes at all.
            attributes=["1.1"],
            size_limit=1,
            time_limit=max(1, math.ceil(self.cfg.timeout)),
        )
        return self._entries(conn)

    def close(self) -> None:
        """Unbind every pooled connection; call when no search is running."""
        for slot in self._all:
            slot.drop()


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

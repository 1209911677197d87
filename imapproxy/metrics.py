# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics (prometheus_client), served by twisted.web on ``[metrics] address``.

The relay's hot path counts nothing: sessions by state and bytes relayed are read
from the SessionRegistry when Prometheus scrapes (a session's byte counters exist
anyway, for the session-end log line). Everything else is counted where it
happens, once per login or connection: logins by result and reason, directory
lookups (latency, cache hits), backend connects (latency, failures per backend),
TLS handshake failures, refused PROXY headers, reloads, the wait for a login's turn
(admission pacing; the logins waiting are read at scrape time too).

Each process has its own registry (not prometheus_client's global one): with
``workers = N`` worker ``i`` serves its own numbers on the port plus ``i``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from OpenSSL import SSL
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from . import __version__
from .errors import DirectoryUnavailable, UserNotFound

#: session states, as the sessions gauge labels them
PRE_AUTH, ACTIVE, IDLE = "pre-auth", "active", "idle"
#: seconds: a lookup from cache takes microseconds, LDAP milliseconds, a dead server seconds
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)
#: seconds a login waits for its turn: none in quiet times, up to half the pre-auth
#: timeout (60 s by default) in a storm
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


def session_state(session: Any) -> str:
    """pre-auth (until the relay starts, logging in included), IDLE, or active."""
    relay = session.relay
    if relay is None:
        return PRE_AUTH
    tracker = relay.tracker
    return IDLE if tracker is not None and tracker.idling else ACTIVE


def session_protocol(session: Any) -> str:
    return str(session.factory.listener.protocol)


class NullMetrics:
    """Counts nothing: what the adapters use when metrics are off (and in tests)."""

    def login(self, protocol: str, result: str, reason: str = "") -> None:
        """A login attempt ended: result "ok" or "failed" with the error's name."""

    def backend_failed(self, backend: str, reason: str) -> None:
        """A backend could not be connected to or logged in at."""

    def session_ended(self, session: Any, reason: Failure | None) -> None:
        """A client connection closed (bytes, TLS handshake failures)."""

    def proxy_header_refused(self, reason: str) -> None:
        """A connection on a proxy_protocol listener was refused."""

    def refused(self, limit: str) -> None:
        """A connection or a login was refused by a limit: total, per_client,
        per_user_client, penalty, login_queue."""

    def login_turn(self, waited: float) -> None:
        """A login's turn came (admission pacing on) after ``waited`` seconds (0: at once)."""

    def reloaded(self, ok: bool) -> None:
        """A SIGHUP reload was applied (ok) or refused."""

    def shared_state_fallback(self, what: str) -> None:
        """A login counted locally what Redis should have counted ([shared]): "penalty"
        or "sessions"."""

    def shared_state_up(self, up: bool) -> None:
        """Redis ([shared] redis) answered, or failed or timed out."""

    def timed_directory(self, directory: Any, clock: Any) -> Any:
        return directory

    def timed_endpoints(self, factory: Callable[[str, int], Any],
                        clock: Any) -> Callable[[str, int], Any]:
        return factory


NULL_METRICS = NullMetrics()


class Metrics(NullMetrics):
    """Every metric of one proxy process, in a CollectorRegistry of its own."""

    def __init__(self, sessions: Callable[[], Any] | None = None, *,
                 draining: Callable[[], bool] | None = None,
                 certificates: Callable[[], dict[str, float]] | None = None,
                 login_queue: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        #: returns the live sessions (the SessionRegistry's set) at scrape time
        self._sessions = sessions or (lambda: ())
        #: is a drain under way (SessionRegistry.draining)
        self._draining = draining or (lambda: False)
        #: certificate name -> when it expires (ServerTLS.expiry, backend client's)
        self._certificates = certificates or dict
        #: logins waiting for their turn now (pacinggate.PacingGate.waiting)
        self._login_queue = login_queue or (lambda: 0)
        self._clock = clock
        # The *_created series double the output and tell a scraper nothing it needs.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.logins = Counter("imapproxy_logins", "Login attempts by protocol, result and "
                              "reason (the error for a failure)",
                              ["protocol", "result", "reason"], registry=r)
        self.lookup_seconds = Histogram("imapproxy_lookup_seconds",
                                        "Directory lookup latency by result",
                                        ["result"], buckets=LOOKUP_BUCKETS, registry=r)
        self.lookup_cache = Counter("imapproxy_lookup_cache",
                                    "Directory lookups answered from the cache (hit) or "
                                    "by a search (miss); the static map has no cache",
                                    ["result"], registry=r)
        self.backend_connect_seconds = Histogram(
            "imapproxy_backend_connect_seconds", "TCP connect latency per backend",
            ["backend"], buckets=CONNECT_BUCKETS, registry=r)
        self.backend_failures = Counter("imapproxy_backend_failures",
                                        "Backend connects or logins that failed, per backend "
                                        "and reason", ["backend", "reason"], registry=r)
        self.tls_failures = Counter("imapproxy_tls_handshake_failures",
                                    "Client connections lost to a TLS error before login",
                                    ["protocol"], registry=r)
        self.sessions_ended = Counter("imapproxy_sessions_ended",
                                      "Client connections ended, by protocol and reason "
                                      "(logout, client closed, backend closed, idle timeout, "
                                      "kicked, shutdown, ...)",
                                      ["protocol", "reason"], registry=r)
        self.limit_refusals = Counter("imapproxy_refused",
                                      "Connections and logins refused, by the limit that "
                                      "refused them (total, per_client, per_user_client, "
                                      "penalty, login_queue)", ["limit"], registry=r)
        self.logins_paced = Counter("imapproxy_logins_paced",
                                    "Logins that waited for their turn (max_login_rate)",
                                    registry=r)
        self.login_wait_seconds = Histogram(
            "imapproxy_login_wait_seconds", "Seconds logins waited for their turn "
            "(max_login_rate; 0 for those let through at once)", buckets=WAIT_BUCKETS,
            registry=r)
        self.proxy_refused = Counter("imapproxy_proxy_protocol_refused",
                                     "Connections refused on proxy_protocol listeners",
                                     ["reason"], registry=r)
        self.reloads = Counter("imapproxy_reloads", "SIGHUP reloads applied or refused",
                               ["result"], registry=r)
        self.shared_fallbacks = Counter(
            "imapproxy_shared_state_fallbacks",
            "Logins whose brute-force penalty (penalty) or session count (sessions) this "
            "process counted alone, Redis ([shared] redis) being unavailable or slow",
            ["what"], registry=r)
        self._shared_up: Gauge | None = None
        Info("imapproxy_build", "The version of imapproxy running",
             registry=r).info({"version": __version__})
        # The standard process metrics: open descriptors against their limit (each
        # session holds two), CPU seconds, resident memory, start time.
        ProcessCollector(registry=r)
        #: bytes of ended sessions, (protocol, direction) -> bytes
        self.ended_bytes: dict[tuple[str, str], int] = {}
        r.register(_LiveCollector(self))

    # -- counted where it happens ----------------------------------------------------------

    def login(self, protocol: str, result: str, reason: str = "") -> None:
        self.logins.labels(protocol, result, reason).inc()

    def backend_failed(self, backend: str, reason: str) -> None:
        self.backend_failures.labels(backend, reason).inc()

    def session_ended(self, session: Any, reason: Failure | None) -> None:
        protocol = session_protocol(session)
        # Only the proxy's own words end up here (never client text): few values.
        self.sessions_ended.labels(protocol, session.end_reason or "client closed").inc()
        for direction, count in (("in", session.bytes_from_client),
                                 ("out", session.bytes_to_client)):
            key = (protocol, direction)
            self.ended_bytes[key] = self.ended_bytes.get(key, 0) + count
        if reason is not None and reason.check(SSL.Error) and session.relay is None \
                and not session.user:
            self.tls_failures.labels(protocol).inc()

    def proxy_header_refused(self, reason: str) -> None:
        self.proxy_refused.labels(reason).inc()

    def refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    def login_turn(self, waited: float) -> None:
        self.login_wait_seconds.observe(waited)
        if waited > 0:
            self.logins_paced.inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "refused").inc()

    def shared_state_fallback(self, what: str) -> None:
        self.shared_fallbacks.labels(what).inc()

    def shared_state_up(self, up: bool) -> None:
        if self._shared_up is None:
            # Made at the first news from Redis: a proxy without [shared] shows none.
            self._shared_up = Gauge("imapproxy_shared_state_up",
                                    "1 while Redis ([shared] redis) answers, 0 while this "
                                    "process counts alone", registry=self.registry)
        self._shared_up.set(1 if up else 0)

    def lookup_done(self, seconds: float, result: str) -> None:
        self.lookup_seconds.labels(result).observe(seconds)

    def backend_connected(self, backend: str, seconds: float) -> None:
        self.backend_connect_seconds.labels(backend).observe(seconds)

    # -- wrappers that time things without touching the adapters ---------------------------

    def timed_directory(self, directory: Any, clock: Any) -> Any:
        return TimedDirectory(directory, self, clock)

    def timed_endpoints(self, factory: Callable[[str, int], Any],
                        clock: Any) -> Callable[[str, int], Any]:
        def timed(host: str, port: int) -> Any:
            return TimedEndpoint(factory(host, port), self, clock, _backend_label(host, port))
        return timed

    def render(self) -> bytes:
        """The Prometheus text format of everything, now."""
        return generate_latest(self.registry)


def _backend_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _LiveCollector:
    """What is read from the live sessions at scrape time: sessions by state, bytes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # computed at collect time; no fixed description to check against

    def collect(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], int] = {}
        totals = dict(self.metrics.ended_bytes)
        for session in list(self.metrics._sessions()):
            protocol = session_protocol(session)
            state = session_state(session)
            counts[(protocol, state)] = counts.get((protocol, state), 0) + 1
            for direction, count in (("in", session.bytes_from_client),
                                     ("out", session.bytes_to_client)):
                totals[(protocol, direction)] = totals.get((protocol, direction), 0) + count
        sessions = GaugeMetricFamily("imapproxy_sessions",
                                     "Client sessions now, by protocol and state",
                                     labels=["protocol", "state"])
        protocols = {p for p, _ in counts} | {"imap", "pop3", "managesieve"}
        for protocol in sorted(protocols):
            # POP3 and ManageSieve have no IDLE; their sessions are pre-auth or active.
            for state in (PRE_AUTH, ACTIVE, IDLE) if protocol == "imap" else (PRE_AUTH, ACTIVE):
                sessions.add_metric([protocol, state], counts.get((protocol, state), 0))
        yield sessions
        relayed = CounterMetricFamily("imapproxy_client_bytes",
                                      "Bytes from (in) and to (out) clients, ended and live "
                                      "sessions", labels=["protocol", "direction"])
        for (protocol, direction), count in sorted(totals.items()):
            relayed.add_metric([protocol, direction], count)
        yield relayed
        metrics = self.metrics
        yield GaugeMetricFamily("imapproxy_draining",
                                "1 while a drain is under way (new sessions are refused)",
                                value=1 if metrics._draining() else 0)
        yield GaugeMetricFamily("imapproxy_logins_waiting",
                                "Logins waiting for their turn now (max_login_rate)",
                                value=metrics._login_queue())
        expiry = GaugeMetricFamily("imapproxy_certificate_expiry_seconds",
                                   "Seconds until each configured certificate expires "
                                   "(negative: expired)", labels=["certificate"])
        now = metrics._clock()
        for name, when in sorted(metrics._certificates().items()):
            expiry.add_metric([name], when - now)
        yield expiry


class TimedDirectory:
    """A Directory that reports each lookup's latency and whether the cache answered."""

    def __init__(self, directory: Any, metrics: Metrics, clock: Any) -> None:
        self.directory = directory
        self.metrics = metrics
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.directory, name)  # clear_cache, service, ...

    def lookup(self, username: str, protocol: str, backend_login: str | None = None) -> Any:
        started = self.clock.seconds()
        try:
            result = self.directory.lookup(username, protocol, backend_login)
        except Exception as e:
            self.metrics.lookup_done(self.clock.seconds() - started, _lookup_result(e))
            raise
        if not isinstance(result, defer.Deferred):
            self.metrics.lookup_done(self.clock.seconds() - started, "ok")
            return result
        # A Deferred that has fired already was answered without a search: the cache.
        self.metrics.lookup_cache.labels("hit" if result.called else "miss").inc()

        def done(outcome: Any) -> Any:
            value = outcome.value if isinstance(outcome, Failure) else None
            self.metrics.lookup_done(self.clock.seconds() - started,
                                     _lookup_result(value) if value is not None else "ok")
            return outcome
        return result.addBoth(done)


def _lookup_result(error: BaseException) -> str:
    if isinstance(error, UserNotFound):
        return "not_found"
    if isinstance(error, DirectoryUnavailable):
        return "unavailable"
    return "error"


@implementer(IStreamClientEndpoint)
class TimedEndpoint:
    """A client endpoint that reports how long its TCP connect took."""

    def __init__(self, wrapped: Any, metrics: Metrics, clock: Any, label: str) -> None:
        self.wrapped = wrapped
        self.metrics = metrics
        self.clock = clock
        self.label = label

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        started = self.clock.seconds()

        def connected(protocol: Any) -> Any:
            self.metrics.backend_connected(self.label, self.clock.seconds() - started)
            return protocol
        return self.wrapped.connect(factory).addCallback(connected)


class MetricsResource(Resource):
    """GET /metrics: the Prometheus text format, rendered in the reactor thread; and the
    health checks a load balancer asks: GET /livez (200 while the process runs) and
    GET /readyz (200 while the listeners are up and no drain is under way, else 503, so
    that a draining instance leaves the pool before its sessions are ended).

    (prometheus_client.twisted's resource renders in a thread, where reading the
    live sessions would race with the reactor.)
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, ready: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.ready = ready if ready is not None else (lambda: not metrics._draining())

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        path = request.path.rstrip(b"/")
        if path == b"/livez":
            return self._text(request, 200, b"ok\n")
        if path == b"/readyz":
            if self.ready():
                return self._text(request, 200, b"ready\n")
            return self._text(request, 503, b"draining or not listening\n")
        if path != b"/metrics":
            return self._text(request, 404, b"not found; try /metrics, /livez, /readyz\n")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()

    @staticmethod
    def _text(request: Request, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body


class QuietSite(Site):
    """A Site that writes no access log line per request (Prometheus scrapes often)."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


def metrics_site(metrics: Metrics, ready: Callable[[], bool] | None = None) -> Site:
    return QuietSite(MetricsResource(metrics, ready))

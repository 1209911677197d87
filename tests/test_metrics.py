"""metrics: sessions by state read at scrape time, logins, lookups, backends, bytes, TLS."""

from __future__ import annotations

import contextlib
from typing import Any

from helpers import DOVECOT_GREETING, FakeEndpoint, Harness
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from imapproxy import __version__
from imapproxy.config import Limits
from imapproxy.directory import Route, Server
from imapproxy.errors import DirectoryUnavailable, UserNotFound
from imapproxy.metrics import (
    NULL_METRICS,
    Metrics,
    MetricsResource,
    TimedDirectory,
    session_state,
)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def instrumented() -> tuple[Harness, Metrics]:
    h = Harness(make_metrics=lambda h: Metrics(lambda: h.registry.sessions))
    assert isinstance(h.metrics, Metrics)
    return h, h.metrics


def test_sessions_by_state_are_read_when_scraped() -> None:
    h, metrics = instrumented()
    h.connect_client()
    idler, _, backend = h.logged_in_client()
    h.logged_in_client(b"bob")
    idler.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    assert session_state(idler) == "idle"
    assert value(metrics, "imapproxy_sessions", protocol="imap", state="pre-auth") == 1
    assert value(metrics, "imapproxy_sessions", protocol="imap", state="active") == 1
    assert value(metrics, "imapproxy_sessions", protocol="imap", state="idle") == 1
    assert ("imapproxy_sessions", (("protocol", "pop3"), ("state", "idle"))) not in samples(
        metrics)


def test_logins_and_backend_connects() -> None:
    h, metrics = instrumented()
    h.logged_in_client()
    client, _ = h.connect_client()
    client.dataReceived(b"a1 LOGIN alice wrong\r\n")
    h.backends[-1].dataReceived(DOVECOT_GREETING + b"P3 NO [AUTHENTICATIONFAILED] No.\r\n")
    h.reactor.advance(60)  # the throttle may hold the answer back
    assert value(metrics, "imapproxy_logins_total", protocol="imap", result="ok", reason="") == 1
    assert value(metrics, "imapproxy_logins_total", protocol="imap", result="failed",
                 reason="AuthenticationFailed") == 1
    assert value(metrics, "imapproxy_backend_connect_seconds_count",
                 backend="10.0.0.1:143") == 2
    assert value(metrics, "imapproxy_lookup_seconds_count", result="ok") == 2


def test_backend_failures_per_backend() -> None:
    h, metrics = instrumented()

    class Refusing(FakeEndpoint):
        def connect(self, factory: Any) -> defer.Deferred[Any]:
            from twisted.internet.error import ConnectionRefusedError

            return defer.fail(ConnectionRefusedError())

    h.runtime.connector.endpoint_factory = metrics.timed_endpoints(
        lambda host, port: Refusing(h.reactor, host, port, []), h.reactor)
    client, transport = h.connect_client()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert b"a1 NO [UNAVAILABLE]" in transport.value()
    assert value(metrics, "imapproxy_backend_failures_total", backend="10.0.0.1:143",
                 reason="BackendUnavailable") == 1
    assert value(metrics, "imapproxy_logins_total", protocol="imap", result="failed",
                 reason="BackendUnavailable") == 1


def test_bytes_are_counted_live_and_kept_after_the_end() -> None:
    h, metrics = instrumented()
    client, transport, backend = h.logged_in_client()
    before = value(metrics, "imapproxy_client_bytes_total", protocol="imap", direction="in")
    client.dataReceived(b"a2 NOOP\r\n")
    backend.dataReceived(b"a2 OK done\r\n")
    live_in = value(metrics, "imapproxy_client_bytes_total", protocol="imap", direction="in")
    assert live_in == before + len(b"a2 NOOP\r\n")
    out = value(metrics, "imapproxy_client_bytes_total", protocol="imap", direction="out")
    transport.loseConnection()
    assert client.disconnected
    assert value(metrics, "imapproxy_client_bytes_total", protocol="imap",
                 direction="in") == live_in
    # A counter never goes down when a session moves from live to ended.
    assert value(metrics, "imapproxy_client_bytes_total", protocol="imap",
                 direction="out") >= out
    assert value(metrics, "imapproxy_sessions_ended_total", protocol="imap",
                 reason="client closed") == 1


def test_operators_metrics_process_build_draining_certificates_refusals() -> None:
    """Issue 13: the standard process metrics, the version, a draining gauge, the days a
    certificate has left, and what each limit refused."""
    now = 1_000_000.0
    h = Harness(limits=Limits(max_connections_per_ip=1), make_metrics=lambda h: Metrics(
        lambda: h.registry.sessions, draining=lambda: h.registry.draining,
        certificates=lambda: {"default": now + 86400.0, "mail.example.org": now - 60.0},
        clock=lambda: now))
    metrics = h.metrics
    assert isinstance(metrics, Metrics)
    h.connect_client("192.0.2.1")
    h.connect_client("192.0.2.1")  # over the per-address limit
    assert value(metrics, "imapproxy_refused_total", limit="per_client") == 1
    assert value(metrics, "imapproxy_build_info", version=__version__) == 1
    found = samples(metrics)
    assert ("process_open_fds", ()) in found and ("process_max_fds", ()) in found
    assert ("process_resident_memory_bytes", ()) in found
    assert value(metrics, "imapproxy_draining") == 0
    h.registry.drain(timeout=1)
    assert value(metrics, "imapproxy_draining") == 1
    assert value(metrics, "imapproxy_certificate_expiry_seconds",
                 certificate="default") == 86400.0
    assert value(metrics, "imapproxy_certificate_expiry_seconds",
                 certificate="mail.example.org") == -60.0


def test_admission_pacing_the_queue_the_waits_and_the_refusals() -> None:
    """Issue 17: logins waiting for their turn (read at scrape time), those that waited,
    how long, and those refused because the queue was full."""
    h = Harness(limits=Limits(max_login_rate=1.0, max_login_queue=2,
                              max_parallel_logins_per_ip=100),
                make_metrics=lambda h: Metrics(lambda: h.registry.sessions,
                                               login_queue=lambda: h.shared.pacer.waiting))
    metrics = h.metrics
    assert isinstance(metrics, Metrics)
    for user in (b"u1", b"u2", b"u3", b"u4"):
        client, _ = h.connect_client()
        client.dataReceived(b"a LOGIN " + user + b" secret\r\n")
    assert value(metrics, "imapproxy_logins_waiting") == 2
    assert value(metrics, "imapproxy_refused_total", limit="login_queue") == 1
    assert value(metrics, "imapproxy_login_wait_seconds_count") == 1  # u1, at once
    assert value(metrics, "imapproxy_logins_paced_total") == 0
    h.reactor.pump([1.0, 1.0])  # the timer fires at each turn, as a live reactor's does
    assert value(metrics, "imapproxy_logins_waiting") == 0
    assert value(metrics, "imapproxy_logins_paced_total") == 2
    assert value(metrics, "imapproxy_login_wait_seconds_count") == 3
    assert value(metrics, "imapproxy_login_wait_seconds_sum") == 3.0  # waited 1 s and 2 s
    assert value(metrics, "imapproxy_login_wait_seconds_bucket", le="1.0") == 2
    # Pacing off: nothing observed, the gauge reads 0 (and a Metrics without the gauge
    # source reads 0 too).
    assert value(Metrics(), "imapproxy_logins_waiting") == 0
    NULL_METRICS.login_turn(1.0)


def test_tls_failures_before_login_only() -> None:
    h, metrics = instrumented()
    client, _ = h.connect_client()
    metrics.session_ended(client, Failure(SSL.Error([("SSL routines", "", "bad record")])))
    metrics.session_ended(client, Failure(ConnectionError("reset")))
    logged, _, _ = h.logged_in_client()
    metrics.session_ended(logged, Failure(SSL.Error([])))
    assert value(metrics, "imapproxy_tls_handshake_failures_total", protocol="imap") == 1


def test_timed_directory_cache_hits_and_results() -> None:
    metrics = Metrics()
    clock = Clock()
    route = Route("alice", (Server("store1"),))

    class Cached:
        pending: defer.Deferred[Route] | None = None

        def lookup(self, user: str, protocol: str, backend_login: str | None = None) -> Any:
            if user == "cached":
                return defer.succeed(route)
            if user == "gone":
                return defer.fail(UserNotFound())
            self.pending = defer.Deferred()
            return self.pending

        def clear_cache(self) -> str:
            return "cleared"

    directory = Cached()
    timed = TimedDirectory(directory, metrics, clock)
    timed.lookup("cached", "imap").addCallback(lambda r: None)
    d = timed.lookup("slow", "imap")
    clock.advance(0.2)
    assert directory.pending is not None
    directory.pending.errback(DirectoryUnavailable())
    d.addErrback(lambda f: None)
    timed.lookup("gone", "imap").addErrback(lambda f: None)
    assert timed.clear_cache() == "cleared"  # everything else passes through
    assert value(metrics, "imapproxy_lookup_cache_total", result="hit") == 2
    assert value(metrics, "imapproxy_lookup_cache_total", result="miss") == 1
    assert value(metrics, "imapproxy_lookup_seconds_count", result="unavailable") == 1
    assert value(metrics, "imapproxy_lookup_seconds_sum", result="unavailable") >= 0.2
    assert value(metrics, "imapproxy_lookup_seconds_count", result="not_found") == 1


def test_static_lookup_errors_raised_synchronously_are_timed() -> None:
    metrics = Metrics()

    class Static:
        def lookup(self, user: str, protocol: str, backend_login: str | None = None) -> Route:
            raise UserNotFound()

    timed = TimedDirectory(Static(), metrics, Clock())
    with contextlib.suppress(UserNotFound):
        timed.lookup("x", "imap")
    assert value(metrics, "imapproxy_lookup_seconds_count", result="not_found") == 1
    assert value(metrics, "imapproxy_lookup_cache_total", result="hit") == 0


def test_other_counters_and_null_metrics() -> None:
    metrics = Metrics()
    metrics.proxy_header_refused("no PROXY header")
    metrics.reloaded(True)
    metrics.reloaded(False)
    assert value(metrics, "imapproxy_proxy_protocol_refused_total", reason="no PROXY header") == 1
    assert value(metrics, "imapproxy_reloads_total", result="refused") == 1
    assert NULL_METRICS.timed_directory("d", None) == "d"
    NULL_METRICS.login("imap", "ok")  # does nothing, raises nothing


def test_resource_serves_the_text_format() -> None:
    metrics = Metrics()
    resource = MetricsResource(metrics)
    request = DummyRequest([b"metrics"])
    request.path = b"/metrics"
    body = resource.render_GET(request)
    assert b"# TYPE imapproxy_sessions gauge" in body
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    other = DummyRequest([b""])
    other.path = b"/"
    assert resource.render_GET(other).startswith(b"not found")
    assert other.responseCode == 404


def test_livez_always_and_readyz_while_listening_and_not_draining() -> None:
    state = {"listening": False, "draining": False}
    metrics = Metrics(draining=lambda: state["draining"])
    resource = MetricsResource(metrics, ready=lambda: state["listening"]
                               and not state["draining"])

    def get(path: bytes) -> tuple[int, bytes]:
        request = DummyRequest([path.strip(b"/")])
        request.path = path
        body = resource.render_GET(request)
        return request.responseCode or 200, body

    assert get(b"/livez") == (200, b"ok\n")
    assert get(b"/readyz")[0] == 503  # not yet listening
    state["listening"] = True
    assert get(b"/readyz") == (200, b"ready\n")
    state["draining"] = True  # a drained instance leaves the balancer's pool first
    assert get(b"/readyz")[0] == 503
    assert get(b"/livez")[0] == 200


def test_shared_state_fallbacks_and_whether_redis_answers() -> None:
    metrics = Metrics()
    assert b"imapproxy_shared_state_up" not in metrics.render(), "not without [shared]"
    metrics.shared_state_fallback("penalty")
    metrics.shared_state_fallback("penalty")
    metrics.shared_state_fallback("sessions")
    metrics.shared_state_up(False)
    assert value(metrics, "imapproxy_shared_state_fallbacks_total", what="penalty") == 2
    assert value(metrics, "imapproxy_shared_state_fallbacks_total", what="sessions") == 1
    assert value(metrics, "imapproxy_shared_state_up") == 0
    metrics.shared_state_up(True)
    assert value(metrics, "imapproxy_shared_state_up") == 1
    NULL_METRICS.shared_state_fallback("penalty")
    NULL_METRICS.shared_state_up(True)

# -*- test-case-name: tests.test_service -*-
"""twistd glue: ``twistd imapproxy --config FILE`` builds the service tree from the config.

The tree is built once, in ``build_service``: the shared parts (runtime.Shared), one
``Runtime`` put in ``current``, one listening service per [[listen]] table whose factory
reads ``current``, the one timer of all sessions, the drain on SIGTERM, metrics, the
admin API, reload on SIGHUP, readiness, and with ``workers = N`` the other workers.
Nothing is patched afterwards: a reload replaces ``current.runtime``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import internet, service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from . import __version__, sdnotify
from . import config as configmodule
from .admin import admin_authority, admin_endpoint, admin_site
from .backendtls import cleartext_warning
from .breaker import CircuitBreaker
from .certificates import not_after
from .clienttls import ServerTLS
from .config import Config, ConfigError, Listener
from .frontend import ProxyFactory
from .limits import ConnectionLimiter
from .logs import LoggingRoot
from .logs import configure as configure_logs
from .metrics import NULL_METRICS, Metrics, NullMetrics, metrics_site
from .pacinggate import PacingGate
from .penaltyworkers import process_gate
from .proxyheader import proxy_listener
from .redisstate import RedisState
from .registry import SessionRegistry
from .reload import Reloader, ReloadService
from .runtime import Current, Shared, build
from .sharedgate import SharedGate
from .transports import tcp_server_endpoint
from .workers import BACKLOG, ParentWatch, ReusePortService, WorkerPool

log = Logger(namespace="imapproxy")


class Options(usage.Options):
    """Command-line options of the twistd plugin."""

    synopsis = "--config FILE"
    longdesc = ("IMAP/POP3 proxy: speaks the protocol until login, looks the user up in a "
                "directory, logs in at the user's backend and relays the session.")
    optParameters = [
        ["config", "c", "/etc/imapproxy/imapproxy.toml", "Path to the TOML config file."],
        ["worker-index", None, 0, "Internal: this worker's number (metrics/admin port offset).",
         int],
        ["penalty-socket", None, None, "Internal: the main process's penalty, for workers."],
    ]
    optFlags = [
        ["worker", None, "Internal: run as a worker process spawned by the main one."],
    ]


class ProxyService(LoggingRoot):
    """The root of the tree: what tests and operators may look at once it is built."""

    #: the runtime in force (a reload replaces current.runtime)
    current: Current
    #: one per [[listen]] table, in order
    factories: list[ProxyFactory]
    reloader: Reloader

    def stopService(self) -> Any:  # noqa: N802
        """SIGTERM: with [timeouts] drain_notice, first a notice: /readyz answers 503 while
        every session, and new ones, go on being served, so that a load balancer takes
        this instance out of its pool (its health check) before the drain ends the
        sessions and their clients reconnect through it. Then the tree stops: listeners
        close, and DrainService drains."""
        runtime = self.current.runtime
        registry = runtime.registry
        stop = super().stopService
        if registry.leaving:  # a drain was announced already: the balancer knows
            return stop()
        notice = runtime.config.timeouts.drain_notice
        return registry.announce(notice, stopping=True).addCallback(lambda _: stop())


def listening_endpoint(reactor: Any, listener: Listener, tls_options: Any) -> Any:
    """A server endpoint for one [[listen]] table; implicit TLS wraps it (RFC 8314)."""
    if listener.tls == "implicit":
        return SSL4ServerEndpoint(reactor, listener.port, tls_options, backlog=BACKLOG,
                                  interface=listener.host)
    if isIPv6Address(listener.host):
        return TCP6ServerEndpoint(reactor, listener.port, backlog=BACKLOG,
                                  interface=listener.host)
    return TCP4ServerEndpoint(reactor, listener.port, backlog=BACKLOG, interface=listener.host)


def certificate_expiry(current: Current) -> dict[str, float]:
    """Every certificate of the running config -> when it expires (for the metrics)."""
    runtime = current.runtime
    client_tls = runtime.shared.client_tls
    found = dict(client_tls.expiry) if client_tls is not None else {}
    backend = runtime.config.backend
    if backend.client_certificate is not None:
        found["backend client"] = not_after(backend.client_certificate)
    return found


def build_service(config: Config, reactor: Any, worker: bool = False,
                  worker_index: int = 0, penalty_socket: str | None = None) -> ProxyService:
    """The whole proxy as a MultiService: one listening service per [[listen]] table.

    With ``workers = N`` every process listens with SO_REUSEPORT, and the main one
    (``worker`` False) also supervises the other N-1.
    """
    top = ProxyService()
    configure_logs(top, config.log, config.path)
    log.info("imapproxy {version} starting, pid {pid}{worker}, config {config}; {stack}",
             version=__version__, pid=os.getpid(), config=config.path,
             worker=f", worker {worker_index}" if worker else "", stack=sdnotify.stack())
    registry = SessionRegistry(reactor)
    # With workers, one penalty for all of them (penaltyworkers.py).
    penalty, penalty_service, penalty_socket = process_gate(
        config.limits, reactor, workers=config.workers, worker=worker,
        socket_path=penalty_socket)
    # Admission pacing: each process paces its own logins (pacinggate.py says why).
    pacer = PacingGate.from_limits(config.limits, reactor)
    client_tls = ServerTLS(config.tls, config.path) if config.tls.certificate else None
    metrics: NullMetrics = NULL_METRICS
    if config.metrics is not None:
        metrics = Metrics(lambda: registry.sessions, draining=lambda: registry.draining,
                          certificates=lambda: certificate_expiry(current),
                          login_queue=lambda: pacer.waiting)
    # With [shared] redis, every instance's penalty and session counts meet in Redis
    # (redisstate.py); off, it stays idle, ready for a reload that turns it on.
    state = RedisState(reactor, config.shared, metrics)
    penalty = SharedGate(penalty, state, reactor, config.limits)
    shared = Shared(reactor, registry, ConnectionLimiter.from_limits(config.limits), penalty,
                    CircuitBreaker(reactor, config.backend.down_cooldown), metrics, client_tls,
                    pacer, state=state)
    runtime = build(config, shared)
    top.current = current = Current(runtime)
    # On stop it says goodbye to Redis at once: the sessions the drain is ending stop
    # counting on the other instances, where their clients are coming over.
    state.setServiceParent(top)
    # Started first, so stopped last: by then the listeners no longer accept.
    DrainService(current).setServiceParent(top)
    for child in (penalty_service, *runtime.directory_services):
        if child is not None:
            child.setServiceParent(top)
    _warn(config, runtime.directory)
    top.factories = []
    for listener in config.listeners:
        # The same certificates, with this listener's ALPN protocol (clienttls.py).
        listener_tls = client_tls.for_protocol(listener.protocol) if client_tls else None
        factory = ProxyFactory(current, listener, listener_tls)
        top.factories.append(factory)
        served: Any = factory
        if listener.proxy_protocol:
            # PROXY header first, then TLS (implicit) and the proxy: a plain TCP port.
            listener, served = proxy_listener(reactor, current, listener, factory, listener_tls)
        if config.workers > 1:
            ReusePortService(reactor, listener, served, listener_tls).setServiceParent(top)
        else:
            endpoint = listening_endpoint(reactor, listener, listener_tls)
            internet.StreamServerEndpointService(endpoint, served).setServiceParent(top)
    pool = None
    if worker:
        ParentWatch(reactor).setServiceParent(top)
    if config.workers > 1 and not worker:
        pool = WorkerPool(reactor, str(config.path), config.workers,
                          penalty_socket=penalty_socket)
        pool.setServiceParent(top)
    sweeper = internet.TimerService(config.timeouts.sweep_interval,
                                    lambda: registry.sweep(current.runtime.config.timeouts))
    sweeper.clock = reactor
    sweeper.setServiceParent(top)
    top.reloader = Reloader(current, top, pool)
    ReloadService(top.reloader, reactor).setServiceParent(top)
    # Last in the tree: ready once every listener above has bound, no longer as soon as
    # the process stops; READY=1 / STOPPING=1 to systemd from the main process (for the
    # Type=notify unit; nothing without $NOTIFY_SOCKET); GET /readyz from every one.
    ready = sdnotify.ReadyNotifier(sdnotify.serving(config.listeners), systemd=not worker)
    if isinstance(metrics, Metrics) and config.metrics is not None:
        endpoint = tcp_server_endpoint(reactor, config.metrics.host,
                                       config.metrics.port + worker_index)
        site = metrics_site(metrics, lambda: ready.serving and not registry.draining
                            and not registry.leaving)
        internet.StreamServerEndpointService(endpoint, site).setServiceParent(top)
    if config.admin is not None:
        internet.StreamServerEndpointService(
            admin_endpoint(reactor, config, worker_index),
            admin_site(current, reactor, authority=admin_authority(config, worker_index),
                       token=config.admin.token)).setServiceParent(top)
    ready.setServiceParent(top)
    return top


def _warn(config: Config, directory: Any) -> None:
    """What an operator must hear at every start."""
    if config.backend.insecure_skip_verify and config.backend.tls != "none":
        log.critical("INSECURE: [backend] insecure_skip_verify = true: backend certificates "
                     "and host names are NOT verified; anyone on the path to a backend can "
                     "read every password. Never use this outside a lab.")
    cleartext = cleartext_warning(config.backend, getattr(directory, "directory", directory))
    if cleartext is not None:
        log.warn("{message}", message=cleartext)


class DrainService(service.Service):
    """On stop (SIGTERM), drain every session gracefully before the reactor exits."""

    def __init__(self, current: Current) -> None:
        self.current = current

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        runtime = self.current.runtime
        return runtime.registry.drain(runtime.config.timeouts.drain, stopping=True)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:  # noqa: N802
    """Entry point for twistd. A bad config ends the process with one line on stderr."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = configmodule.load(options["config"])
        return build_service(config, reactor, worker=bool(options["worker"]),
                             worker_index=options["worker-index"],
                             penalty_socket=options["penalty-socket"])
    except ConfigError as e:
        sys.stderr.write(f"imapproxy: config error: {e}\n")
        raise SystemExit(1) from None

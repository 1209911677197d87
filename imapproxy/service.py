"""twistd glue: ``twistd imapproxy --config FILE`` builds the service tree from the config."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import internet, service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from . import __version__, operations, sdnotify
from . import config as configmodule
from .backendtls import backend_client_certificate, backend_trust_root, cleartext_warning
from .breaker import CircuitBreaker
from .clienttls import ServerTLS
from .config import Config, ConfigError, Listener
from .directory import StaticDirectory
from .limits import ConnectionLimiter
from .logs import LoggingRoot
from .logs import configure as configure_logs
from .penaltygate import process_gate
from .protocol import BackendConnector, ProxyFactory
from .proxyheader import proxy_listener
from .registry import SessionRegistry
from .workers import BACKLOG, ReusePortService, WorkerPool

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


def listening_endpoint(reactor: Any, listener: Listener, tls_options: Any) -> Any:
    """A server endpoint for one [[listen]] table; implicit TLS wraps it (RFC 8314)."""
    if listener.tls == "implicit":
        return SSL4ServerEndpoint(reactor, listener.port, tls_options, backlog=BACKLOG,
                                  interface=listener.host)
    if isIPv6Address(listener.host):
        return TCP6ServerEndpoint(reactor, listener.port, backlog=BACKLOG,
                                  interface=listener.host)
    return TCP4ServerEndpoint(reactor, listener.port, backlog=BACKLOG, interface=listener.host)


def build_directory(config: Config, reactor: Any) -> tuple[Any, list[service.IService]]:
    """The configured directory plus any services it needs running (LDAP thread pool)."""
    if config.directory.type == "ldap":
        from .ldapdirectory import LdapDirectory

        directory = LdapDirectory.from_config(config, reactor)
        return directory, [directory.service]
    assert config.directory.map is not None
    return StaticDirectory.from_file(config.directory.map), []


def build_service(config: Config, reactor: Any, worker: bool = False,
                  worker_index: int = 0,
                  penalty_socket: str | None = None) -> service.MultiService:
    """The whole proxy as a MultiService: one listening service per [[listen]] table.

    With ``workers = N`` every process listens with SO_REUSEPORT, and the main one
    (``worker`` False) also supervises the other N-1.
    """
    top = LoggingRoot()
    configure_logs(top, config.log, config.path)
    log.info("imapproxy {version} starting, pid {pid}{worker}, config {config}; {stack}",
             version=__version__, pid=os.getpid(), config=config.path,
             worker=f", worker {worker_index}" if worker else "", stack=sdnotify.stack())
    directory, extra = build_directory(config, reactor)
    for child in extra:
        child.setServiceParent(top)
    health = CircuitBreaker(reactor, config.backend.down_cooldown)
    if config.backend.insecure_skip_verify and config.backend.tls != "none":
        log.critical("INSECURE: [backend] insecure_skip_verify = true: backend certificates "
                     "and host names are NOT verified; anyone on the path to a backend can "
                     "read every password. Never use this outside a lab.")
    cleartext = cleartext_warning(config.backend, directory)
    if cleartext is not None:
        log.warn("{message}", message=cleartext)

    def build_connector(new: Config) -> BackendConnector:
        trust_root = backend_trust_root(new.backend) if new.backend.tls != "none" else None
        return BackendConnector(reactor, new, health=health, trust_root=trust_root,
                                client_certificate=backend_client_certificate(new.backend,
                                                                              new.path))

    connector = build_connector(config)
    # Reload certificates with top.server_tls.reload(new_config.tls) (e.g. on SIGHUP).
    tls = ServerTLS(config.tls, config.path) if config.tls.certificate else None
    # Shared by every listener of this process: limits and failures count per process.
    limiter = ConnectionLimiter.from_limits(config.limits)
    # With workers, one penalty for all of them (penaltygate.py).
    penalty, penalty_socket = process_gate(config.limits, reactor, top,
                                           workers=config.workers, worker=worker,
                                           socket_path=penalty_socket)
    registry = SessionRegistry(reactor, config.timeouts)
    # Started first, so stopped last: by then the listeners no longer accept.
    DrainService(registry).setServiceParent(top)
    factories = []
    header_factories = []
    for listener in config.listeners:
        # The same certificates, with this listener's ALPN protocol (clienttls.py).
        listener_tls = tls.for_protocol(listener.protocol) if tls is not None else None
        factory = ProxyFactory(reactor, config, listener, directory, connector, registry,
                               listener_tls, limiter=limiter, penalty=penalty)
        factories.append(factory)
        served: Any = factory
        if listener.proxy_protocol:
            # PROXY header first, then TLS (implicit) and the proxy: a plain TCP port.
            listener, served = proxy_listener(reactor, config, listener, factory, listener_tls)
            header_factories.append(served)
        if config.workers > 1:
            ReusePortService(reactor, listener, served, listener_tls).setServiceParent(top)
        else:
            endpoint = listening_endpoint(reactor, listener, listener_tls)
            internet.StreamServerEndpointService(endpoint, served).setServiceParent(top)
    pool = None
    if config.workers > 1 and not worker:
        pool = WorkerPool(reactor, str(config.path), config.workers,
                          penalty_socket=penalty_socket)
        pool.setServiceParent(top)
    sweeper = internet.TimerService(config.timeouts.sweep_interval, registry.sweep)
    sweeper.clock = reactor
    sweeper.setServiceParent(top)
    # Last in the tree: ready once every listener above has bound, no longer as soon as
    # the process stops; READY=1 / STOPPING=1 to systemd from the main process (for the
    # Type=notify unit; nothing without $NOTIFY_SOCKET); GET /readyz from every one.
    ready = sdnotify.ReadyNotifier(sdnotify.serving(config.listeners), systemd=not worker)
    top.operations = operations.attach(  # type: ignore[attr-defined]
        top, config, reactor, registry=registry, factories=factories, connector=connector,
        directory=directory, directory_services=extra, server_tls=tls,
        header_factories=header_factories, build_directory=build_directory,
        build_connector=build_connector, worker_index=worker_index, workers=pool,
        ready=lambda: ready.serving and not registry.draining)
    ready.setServiceParent(top)
    top.factories = factories  # type: ignore[attr-defined]
    top.directory = directory  # type: ignore[attr-defined]
    top.registry = registry  # type: ignore[attr-defined]
    top.server_tls = tls  # type: ignore[attr-defined]
    top.limiter = limiter  # type: ignore[attr-defined]
    top.penalty = penalty  # type: ignore[attr-defined]
    return top


class DrainService(service.Service):
    """On stop (SIGTERM), drain every session gracefully before the reactor exits."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        return self.registry.drain(stopping=True)


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



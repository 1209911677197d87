"""In-memory wiring of the proxy for adapter tests: MemoryReactorClock, fake backends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransport,
    StringTransportWithDisconnection,
)

from imapproxy.backendconn import BackendConnector
from imapproxy.breaker import CircuitBreaker
from imapproxy.config import (
    AuthConfig,
    BackendConfig,
    Config,
    DirectoryConfig,
    Limits,
    Listener,
    Timeouts,
    TlsConfig,
)
from imapproxy.directory import StaticDirectory, parse_map
from imapproxy.frontend import FrontendProtocol, ProxyFactory
from imapproxy.limits import ConnectionLimiter
from imapproxy.metrics import NULL_METRICS, NullMetrics
from imapproxy.pacinggate import PacingGate
from imapproxy.penalty import Penalty
from imapproxy.penaltygate import LocalGate
from imapproxy.registry import SessionRegistry
from imapproxy.runtime import Current, Runtime, Shared

DOVECOT_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE] Dovecot ready.\r\n"


@dataclass
class FakeEndpoint:
    """Connects a protocol to an in-memory transport; records every connection."""

    reactor: Any
    host: str
    port: int
    connections: list[Any]

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", self.host, self.port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return defer.succeed(protocol)


@dataclass
class Harness:
    """A proxy factory on a MemoryReactorClock with fake backends, built as service.py
    builds it (a Runtime in a Current, its Shared parts), minus the listening."""

    reactor: MemoryReactorClock = field(default_factory=MemoryReactorClock)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    routes: str = "* 10.0.0.1:143\n"
    protocol: str = "imap"
    backend: BackendConfig = field(default_factory=BackendConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    #: builds the metrics from the harness (its registry is there already)
    make_metrics: Callable[[Harness], NullMetrics] | None = None

    def __post_init__(self) -> None:
        listener = Listener(self.protocol, "127.0.0.1", 1143, "none")
        self.config = Config(
            path=Path("/nonexistent/test.toml"), listeners=(listener,),
            tls=TlsConfig(plaintext_auth=True), directory=DirectoryConfig(),
            backend=self.backend, limits=self.limits, timeouts=self.timeouts, auth=self.auth)
        self.registry = SessionRegistry(self.reactor)
        self.backends: list[Any] = []
        self.metrics = NULL_METRICS if self.make_metrics is None else self.make_metrics(self)
        reactor, metrics = self.reactor, self.metrics
        self.shared = Shared(
            reactor, self.registry, ConnectionLimiter.from_limits(self.limits),
            LocalGate(Penalty.from_limits(self.limits, reactor.seconds), reactor),
            CircuitBreaker(reactor, self.config.backend.down_cooldown), metrics, None,
            PacingGate.from_limits(self.limits, reactor))
        connector = BackendConnector(reactor, self.config, endpoint_factory=metrics.timed_endpoints(
            lambda host, port: FakeEndpoint(reactor, host, port, self.backends), reactor))
        directory = metrics.timed_directory(StaticDirectory(parse_map(self.routes)), reactor)
        self.current = Current(Runtime(self.config, directory, (), connector, self.shared))
        self.factory = ProxyFactory(self.current, listener)

    @property
    def runtime(self) -> Runtime:
        return self.current.runtime

    def connect_client(self, host: str = "192.0.2.7",
                       lost_at_once: bool = True) -> tuple[FrontendProtocol, Any]:
        """A client connection; with ``lost_at_once`` False, closing it only marks it
        disconnecting (as a real transport flushing first): the test calls
        connectionLost itself."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, 40000))
        peer = IPv4Address("TCP", host, 40000)
        transport: Any
        if lost_at_once:
            transport = StringTransportWithDisconnection(peerAddress=peer)
            transport.protocol = protocol
        else:
            transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def logged_in_client(self, user: bytes = b"alice",
                         lost_at_once: bool = True) -> tuple[FrontendProtocol, Any, Any]:
        """A client logged in through a fake backend; returns (client, its transport, backend)."""
        client, transport = self.connect_client(lost_at_once=lost_at_once)
        transport.clear()
        client.dataReceived(b"a1 LOGIN " + user + b" secret\r\n")
        backend = self.backends[-1]
        backend.dataReceived(DOVECOT_GREETING)
        assert backend.transport.value().endswith(b"P3 LOGIN \"" + user + b"\" \"secret\"\r\n")
        backend.transport.clear()
        backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] Logged in\r\n")
        assert transport.value().startswith(b"a1 OK [CAPABILITY IMAP4rev1 IDLE LITERAL+]")
        transport.clear()
        return client, transport, backend

    def advance(self, seconds: float, step: float = 15.0) -> None:
        """Move the clock, running the sweep as the TimerService would."""
        remaining = seconds
        while remaining > 0:
            delta = min(step, remaining)
            self.reactor.advance(delta)
            self.registry.sweep(self.runtime.config.timeouts)
            remaining -= delta

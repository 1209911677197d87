# -*- test-case-name: tests.test_runtime -*-
"""Everything a session reads, built from one config: one object that a reload replaces.

A ``Runtime`` holds the config and what is built from it (the directory, the backend
connector), and the ``Shared`` parts that outlive a reload because they hold live
state (the session registry, the connection limits' counts, the brute-force penalty,
the logins waiting for their turn, the circuit breaker, the metrics, the client TLS
contexts, the state shared through Redis): a reload reconfigures those in place and
builds the rest anew. Every listener's factory reads the one ``Current`` holder; a new
connection takes the runtime current when it arrives, and a reload is one assignment:
``current.runtime = new``. Nothing is patched after it is built (the metrics wrap the
directory and the backend endpoints as they are built).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application import service

from .backendconn import BackendConnector, default_endpoint_factory
from .backendtls import backend_client_certificate, backend_trust_root
from .breaker import CircuitBreaker
from .clienttls import ServerTLS
from .config import Config
from .directory import Server, StaticDirectory
from .limits import ConnectionLimiter
from .managesieve import SieveCapabilities
from .metrics import NullMetrics
from .pacinggate import PacingGate
from .registry import SessionRegistry


@dataclass(frozen=True, slots=True)
class Shared:
    """What outlives a reload: reconfigured in place, never rebuilt."""

    reactor: Any
    registry: SessionRegistry
    limiter: ConnectionLimiter
    #: the brute-force penalty (penaltygate.LocalGate, penaltyworkers.RemoteGate in a
    #: worker, sharedgate.SharedGate in front of either with [shared] redis)
    penalty: Any
    breaker: CircuitBreaker[Server]
    metrics: NullMetrics
    client_tls: ServerTLS | None
    #: admission pacing of this process's logins (pacinggate.PacingGate)
    pacer: PacingGate
    #: the backends' SIEVE capabilities, for the ManageSieve pre-login list (learnt
    #: from backend logins, so it outlives a reload)
    sieve: SieveCapabilities = field(default_factory=SieveCapabilities)
    #: the state shared with other instances through Redis (redisstate.RedisState;
    #: None: never, as in tests that build a Shared of their own)
    state: Any = None

    def reload_certificates(self, config: Config) -> None:
        """The client TLS loads the new certificates, or raises ConfigError and keeps the
        old ones (a reload's one step that can fail after changing something)."""
        if self.client_tls is not None and config.tls.certificate is not None:
            self.client_tls.reload(config.tls)

    def reconfigure(self, config: Config) -> None:
        """A reload: the new limits, penalty settings, login rate and cooldown; what they
        count stays (and who waits for a turn keeps waiting)."""
        self.limiter.reconfigure(config.limits)
        self.penalty.reconfigure(config.limits)
        self.pacer.reconfigure(config.limits)
        self.breaker.cooldown = config.backend.down_cooldown
        if self.state is not None:
            self.state.reconfigure(config.shared)


@dataclass(frozen=True, slots=True)
class Runtime:
    """One config and everything built from it, with the shared parts."""

    config: Config
    directory: Any
    #: services the directory needs running (the LDAP thread pool)
    directory_services: tuple[service.IService, ...]
    connector: BackendConnector
    shared: Shared

    @property
    def registry(self) -> SessionRegistry:
        return self.shared.registry

    @property
    def metrics(self) -> NullMetrics:
        return self.shared.metrics


class Current:
    """The runtime in force; a reload replaces it in one assignment."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


def build_directory(config: Config, reactor: Any) -> tuple[Any, tuple[service.IService, ...]]:
    """The configured directory plus any services it needs running (LDAP thread pool)."""
    if config.directory.type == "ldap":
        from .ldapdirectory import LdapDirectory

        directory = LdapDirectory.from_config(config, reactor)
        return directory, (directory.service,)
    assert config.directory.map is not None
    return StaticDirectory.from_file(config.directory.map), ()


def build_connector(config: Config, shared: Shared) -> BackendConnector:
    """Dials and logs in at backends: TLS trust and client certificate from the config,
    connect times measured by the metrics."""
    reactor = shared.reactor
    trust_root = (backend_trust_root(config.backend, config.path)
                  if config.backend.tls != "none" else None)
    endpoints = shared.metrics.timed_endpoints(
        default_endpoint_factory(reactor, config.backend.connect_timeout), reactor)
    return BackendConnector(reactor, config, endpoint_factory=endpoints, trust_root=trust_root,
                            client_certificate=backend_client_certificate(config.backend,
                                                                          config.path))


def build(config: Config, shared: Shared, *, directory: Any = None,
          directory_services: tuple[service.IService, ...] = ()) -> Runtime:
    """A runtime for ``config`` (raises ConfigError); ``directory``: keep this one."""
    if directory is None:
        built, directory_services = build_directory(config, shared.reactor)
        directory = shared.metrics.timed_directory(built, shared.reactor)
    return Runtime(config, directory, directory_services, build_connector(config, shared),
                   shared)

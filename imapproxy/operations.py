# -*- test-case-name: tests.test_operations -*-
"""Wires the operator's side into a built service tree: metrics, admin API, SIGHUP reload.

service.py builds the proxy; ``attach()`` adds what operators use to watch and steer
it, without the adapters knowing: the metrics object is set on the factories and
connector (they call it once per login or session end), the directory and the
backend endpoints are wrapped to be timed, and the metrics and admin listeners
and the reload service join the tree.

With ``workers = N``, worker ``i`` serves metrics and admin on the configured
port plus ``i`` (a UNIX socket path gets ``.i`` appended), so each can be
scraped and steered; ``imapproxy-admin --config`` asks all of them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import internet, service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint

from .admin import admin_site
from .config import Config, authority
from .metrics import NULL_METRICS, Metrics, NullMetrics, metrics_site
from .reload import Builders, Reloader, ReloadService


def tcp_endpoint(reactor: Any, host: str, port: int) -> Any:
    if isIPv6Address(host):
        return TCP6ServerEndpoint(reactor, port, interface=host)
    return TCP4ServerEndpoint(reactor, port, interface=host)


def admin_endpoint(reactor: Any, config: Config, index: int) -> Any:
    admin = config.admin
    assert admin is not None
    if admin.socket is not None:
        path = Path(f"{admin.socket}.{index}" if index else str(admin.socket))
        _remove_stale_socket(path)
        return UNIXServerEndpoint(reactor, str(path), mode=0o600)
    return tcp_endpoint(reactor, admin.host, admin.port + index)


def admin_authority(config: Config, index: int) -> str | None:
    """The Host header worker ``index``'s admin API accepts: its own address (the
    configured port plus the index); None on a UNIX socket, where any Host is fine."""
    admin = config.admin
    assert admin is not None
    if admin.socket is not None:
        return None
    return authority(admin.host, admin.port + index)


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a process that died would make bind() fail."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class Operations:
    """What attach() set up, for tests and for the reload service."""

    metrics: NullMetrics
    reloader: Reloader
    services: list[service.IService] = field(default_factory=list)


def attach(top: service.MultiService, config: Config, reactor: Any, *, registry: Any,
           factories: list[Any], connector: Any, directory: Any,
           directory_services: list[Any], server_tls: Any, header_factories: list[Any],
           build_directory: Callable[[Config, Any], tuple[Any, list[Any]]],
           build_connector: Callable[[Config], Any], worker_index: int = 0,
           workers: Any = None, install_signal: bool = True,
           ready: Callable[[], bool] | None = None) -> Operations:
    """Add metrics, admin and reload to the tree ``top`` that service.py built."""
    metrics: NullMetrics = NULL_METRICS
    if config.metrics is not None:
        metrics = Metrics(lambda: registry.sessions, draining=lambda: registry.draining,
                          certificates=lambda: dict(server_tls.expiry) if server_tls else {})
    timed = metrics.timed_directory(directory, reactor)
    _instrument(metrics, reactor, factories, connector, header_factories, timed)

    def new_directory(new: Config) -> tuple[Any, list[Any]]:
        built, services = build_directory(new, reactor)
        return metrics.timed_directory(built, reactor), services

    def new_connector(new: Config) -> Any:
        built = build_connector(new)
        _instrument(metrics, reactor, [], built, [], None)
        return built

    reloader = Reloader(config, top, factories, registry,
                        Builders(new_directory, new_connector), timed, directory_services,
                        server_tls, metrics, header_factories, workers)
    ops = Operations(metrics, reloader)
    ops.services.append(ReloadService(reloader, reactor, install_signal))
    if isinstance(metrics, Metrics) and config.metrics is not None:
        endpoint = tcp_endpoint(reactor, config.metrics.host, config.metrics.port + worker_index)
        ops.services.append(internet.StreamServerEndpointService(endpoint,
                                                                 metrics_site(metrics, ready)))
    if config.admin is not None:
        ops.services.append(internet.StreamServerEndpointService(
            admin_endpoint(reactor, config, worker_index),
            admin_site(registry, reactor, authority=admin_authority(config, worker_index),
                       token=config.admin.token)))
    for child in ops.services:
        child.setServiceParent(top)
    return ops


def _instrument(metrics: NullMetrics, reactor: Any, factories: list[Any], connector: Any,
                header_factories: list[Any], directory: Any) -> None:
    connector.metrics = metrics
    connector.endpoint_factory = metrics.timed_endpoints(connector.endpoint_factory, reactor)
    for factory in factories:
        factory.metrics = metrics
        if directory is not None:
            factory.directory = directory
    for header_factory in header_factories:
        header_factory.metrics = metrics

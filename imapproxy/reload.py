# -*- test-case-name: tests.test_reload -*-
"""Reload on SIGHUP: config, static map, certificates, LDAP settings; no session dropped.

The new config is read and everything it needs is built first (map parsed,
certificate and key loaded and matched, LDAP filter checked). Any error there and
nothing changes: one log line says why, and the running config stays. Otherwise
the listeners' factories get the new config, directory, backend connector and
certificate at once. Sessions already relayed don't look at any of it, so they
go on; sessions still logging in use the new directory for their next lookup.

What a running process cannot take over (listen addresses, workers, the metrics
and admin addresses, log destinations) is logged as "needs a restart" and left as
it is. With ``workers = N`` the main process passes SIGHUP on to every worker.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from . import config as configmodule
from .config import Config, ConfigError
from .proxyprotocol import TrustedNetworks

log = Logger(namespace="imapproxy")

#: parts of the config a reload cannot apply (attribute name, what to call it in the log)
RESTART_ONLY = (("listeners", "[[listen]]"), ("workers", "workers"), ("metrics", "[metrics]"),
                ("admin", "[admin]"), ("log", "[log]"))


class Builders:
    """How to build the reloadable parts from a config (service.py provides these)."""

    def __init__(self, directory: Callable[[Config], tuple[Any, list[Any]]],
                 connector: Callable[[Config], Any]) -> None:
        self.directory = directory
        self.connector = connector


class Reloader:
    """Swaps a new config into a running service tree, or refuses it whole."""

    def __init__(self, config: Config, root: Any, factories: list[Any], registry: Any,
                 builders: Builders, directory: Any, directory_services: list[Any],
                 server_tls: Any, metrics: Any,
                 header_factories: list[Any] | None = None, workers: Any = None) -> None:
        self.config = config
        self.root = root
        self.factories = factories
        self.registry = registry
        self.builders = builders
        self.directory = directory
        self.directory_services = directory_services
        self.server_tls = server_tls
        self.metrics = metrics
        self.header_factories = header_factories or []
        self.workers = workers

    def reload(self) -> bool:
        """Read the config file again and apply it; False (and a log line) if refused."""
        path = self.config.path
        log.info("reloading {path}", path=str(path))
        if self.workers is not None:
            for _worker, transport in list(self.workers.workers.values()):
                with contextlib.suppress(OSError):
                    transport.signalProcess("HUP")
        try:
            new = configmodule.load(path)
            keep_directory = (new.directory == self.config.directory
                              and new.directory.type == "ldap")
            if keep_directory:
                directory, services = self.directory, self.directory_services
            else:
                directory, services = self.builders.directory(new)
            connector = self.builders.connector(new)
            # Last, as it is the one step that changes something: servertls.ServerTLS
            # loads the new certificates, or raises ConfigError and keeps the old ones.
            reload_tls = getattr(self.server_tls, "reload", None)
            if reload_tls is not None and new.tls.certificate is not None:
                reload_tls(new.tls)
        except ConfigError as e:
            log.error("reload refused, the running config stays: {error}", error=str(e))
            self.metrics.reloaded(False)
            return False
        except Exception:
            log.failure("reload refused, the running config stays: unexpected error")
            self.metrics.reloaded(False)
            return False
        self._apply(new, directory, services, connector, keep_directory)
        self.metrics.reloaded(True)
        return True

    def _apply(self, new: Config, directory: Any, services: list[Any], connector: Any,
               keep_directory: bool) -> None:
        old = self.config
        for attribute, name in RESTART_ONLY:
            if getattr(new, attribute) != getattr(old, attribute):
                log.warn("reload: {name} changed; that takes a restart", name=name)
        for factory in self.factories:
            factory.config = new
            factory.directory = directory
            factory.connector = connector
        for header_factory in self.header_factories:
            header_factory.trusted = _trusted(new)
            header_factory.timeout = new.proxy_protocol.timeout
        self.registry.timeouts = new.timeouts
        if keep_directory:
            clear = getattr(self.directory, "clear_cache", None)
            if clear is not None:
                clear()
            # A new LDAP directory is tried when its service starts; the kept one here
            # (in the background; the outcome is logged).
            probe = getattr(self.directory, "probe", None)
            if probe is not None:
                probe("reload")
        else:
            for service in services:
                service.setServiceParent(self.root)  # starts it if the tree runs
            for service in self.directory_services:
                # The old LDAP pool finishes the searches in flight, then stops.
                service.disownServiceParent()
        self.directory, self.directory_services = directory, services
        self.config = new
        log.info("reloaded {path}: {listeners} listeners, directory {kind}, "
                 "{sessions} sessions kept", path=str(new.path),
                 listeners=len(new.listeners), kind=new.directory.type,
                 sessions=len(self.registry.sessions))


def _trusted(config: Config) -> TrustedNetworks:
    return TrustedNetworks(config.proxy_protocol.trusted)


class ReloadService(Service):
    """Runs the Reloader on SIGHUP (installed while the service runs)."""

    def __init__(self, reloader: Reloader, reactor: Any, install_signal: bool = True) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self.install_signal = install_signal
        self._previous: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.install_signal:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self.install_signal and self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: do the work in the reactor.
        self.reactor.callFromThread(self.reloader.reload)

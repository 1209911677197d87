# -*- test-case-name: tests.test_reload -*-
"""Reload on SIGHUP: config, static map, certificates, LDAP settings; no session dropped.

The new config is read and everything it needs is built first (map parsed,
certificate and key loaded and matched, LDAP filter checked). Any error there and
nothing changes: one log line says why, and the running config stays. Otherwise
the listeners' factories get the new config, directory, backend connector and
certificate at once. Sessions already relayed don't look at any of it, so they
go on; sessions still logging in use the new directory for their next lookup.

Everything else applies at once: [limits] (connection limits and the brute-force
penalty, which keeps what it has learnt), [timeouts], [username], [backend] (down_cooldown
included), [proxy_protocol], [tls] certificates, the directory. What a running process
cannot take over (listen addresses, workers, the metrics and admin addresses, log
destinations) is named key by key in the "reloaded" line ("reloaded ...; listen[1].address
needs a restart") and left as it is. With ``workers = N`` the main process passes SIGHUP
on to every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from . import config as configmodule
from .config import Config, ConfigError
from .proxyprotocol import TrustedNetworks

log = Logger(namespace="imapproxy")

#: parts of the config a reload cannot apply (attribute name, its key in the file)
RESTART_ONLY = (("listeners", "listen"), ("workers", "workers"), ("metrics", "metrics"),
                ("admin", "admin"), ("log", "log"))


def changed_keys(old: Any, new: Any, key: str) -> Iterator[str]:
    """The dotted keys (as the config file spells them) whose values differ."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) \
            and type(old) is type(new):
        for field in dataclasses.fields(old):
            yield from changed_keys(getattr(old, field.name), getattr(new, field.name),
                                    f"{key}.{field.name}")
    elif isinstance(old, tuple) and isinstance(new, tuple) and old and new \
            and dataclasses.is_dataclass(old[0]):
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            yield from changed_keys(a, b, f"{key}[{i}]")
        if len(old) != len(new):
            yield f"{key} (count {len(old)} -> {len(new)})"
    elif old != new:
        yield key


#: Listener fields as the config file names them ([[listen]] address is host and port).
_LISTEN_FIELDS = {"host": "address", "port": "address"}


def restart_keys(old: Config, new: Config) -> list[str]:
    """The keys changed in ``new`` that only a restart can apply."""
    found: list[str] = []
    for attribute, key in RESTART_ONLY:
        for changed in changed_keys(getattr(old, attribute), getattr(new, attribute), key):
            head, dot, leaf = changed.rpartition(".")
            name = f"{head}.{_LISTEN_FIELDS.get(leaf, leaf)}" if dot and key == "listen" \
                else changed
            if name not in found:
                found.append(name)
    return found


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
            # Last, as it is the one step that changes something: clienttls.ServerTLS
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
        restart = restart_keys(old, new)
        for factory in self.factories:
            factory.config = new
            factory.directory = directory
            factory.connector = connector
        # Shared by every listener: the connection limits, the brute-force penalty (what
        # it has learnt stays) and the backends' circuit breaker take the new settings.
        limiters = {id(f.limiter): f.limiter for f in self.factories}
        gates = {id(f.penalty): f.penalty for f in self.factories}
        for limiter in limiters.values():
            limiter.reconfigure(new.limits)
        for gate in gates.values():
            gate.reconfigure(new.limits)
        health = getattr(connector, "health", None)
        if health is not None:
            health.cooldown = new.backend.down_cooldown
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
        needs = "".join(f"; {key} needs a restart" for key in restart)
        log.info("reloaded {path}: {listeners} listeners, directory {kind}, "
                 "{sessions} sessions kept{needs}", path=str(new.path),
                 listeners=len(new.listeners), kind=new.directory.type,
                 sessions=len(self.registry.sessions), needs=needs, restart=restart)


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

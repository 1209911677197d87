# -*- test-case-name: tests.test_reload -*-
"""Reload on SIGHUP: config, static map, certificates, LDAP settings; no session dropped.

The new config is read and a new ``Runtime`` (runtime.py) built from it first (map
parsed, certificate and key loaded and matched, LDAP filter checked). Any error there
and nothing changes: one log line says why, and the running config stays. Otherwise
the shared parts that hold live state are reconfigured in place, and the new runtime
is put in force in one assignment: new sessions use it; sessions already there keep
the one they came with. So [limits] (connection limits and the brute-force penalty,
which keeps what it has learnt), [timeouts], [username], [backend] (down_cooldown
included), [proxy_protocol], [tls] certificates, the directory and [shared] (the Redis
connection: redisstate.py) all apply at once.
What a running process cannot take over (listen addresses, workers, the metrics and
admin addresses, log destinations, the sweep's period) is named key by key in the
"reloaded" line ("reloaded ...; listen[1].address needs a restart") and left as it is.
With ``workers = N`` the main process passes SIGHUP on to every worker.
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
from .runtime import Current, Runtime, build

log = Logger(namespace="imapproxy")

#: parts of the config a reload cannot apply (attribute name, its key in the file)
RESTART_ONLY = (("listeners", "listen"), ("workers", "workers"), ("metrics", "metrics"),
                ("admin", "admin"), ("log", "log"))
#: single keys a reload cannot apply either (the one timer's period is fixed at start)
RESTART_ONLY_KEYS = (("timeouts", "sweep_interval"),)


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
    found: list[str] = [f"{section}.{key}" for section, key in RESTART_ONLY_KEYS
                        if getattr(getattr(old, section), key)
                        != getattr(getattr(new, section), key)]
    for attribute, key in RESTART_ONLY:
        for changed in changed_keys(getattr(old, attribute), getattr(new, attribute), key):
            head, dot, leaf = changed.rpartition(".")
            name = f"{head}.{_LISTEN_FIELDS.get(leaf, leaf)}" if dot and key == "listen" \
                else changed
            if name not in found:
                found.append(name)
    return found


class Reloader:
    """Builds a new runtime from the config file and puts it in force, or refuses it whole."""

    def __init__(self, current: Current, root: Any, workers: Any = None,
                 builder: Callable[..., Runtime] = build) -> None:
        self.current = current
        #: the service tree, where a new directory's services (LDAP pool) are started
        self.root = root
        #: the worker processes, told to reload too (workers.WorkerPool)
        self.workers = workers
        #: how a runtime is built from a config (runtime.build)
        self.builder = builder

    def reload(self) -> bool:
        """Read the config file again and apply it; False (and a log line) if refused."""
        old = self.current.runtime
        shared = old.shared
        path = old.config.path
        log.info("reloading {path}", path=str(path))
        if self.workers is not None:
            for _worker, transport in list(self.workers.workers.values()):
                with contextlib.suppress(OSError):
                    transport.signalProcess("HUP")
        try:
            new = configmodule.load(path)
            keep = new.directory == old.config.directory and new.directory.type == "ldap"
            runtime = self.builder(new, shared, directory=old.directory if keep else None,
                                   directory_services=old.directory_services if keep else ())
            # Last, as it is the one step that changes something: the client TLS loads
            # the new certificates, or raises ConfigError and keeps the old ones.
            shared.reload_certificates(new)
        except ConfigError as e:
            log.error("reload refused, the running config stays: {error}", error=str(e))
            shared.metrics.reloaded(False)
            return False
        except Exception:
            log.failure("reload refused, the running config stays: unexpected error")
            shared.metrics.reloaded(False)
            return False
        shared.reconfigure(new)
        if keep:
            self._refresh(runtime.directory)
        else:
            for service in runtime.directory_services:
                service.setServiceParent(self.root)  # starts it if the tree runs
            for service in old.directory_services:
                # The old LDAP pool finishes the searches in flight, then stops.
                service.disownServiceParent()
        self.current.runtime = runtime  # the one assignment: new sessions use it
        restart = restart_keys(old.config, new)
        needs = "".join(f"; {key} needs a restart" for key in restart)
        log.info("reloaded {path}: {listeners} listeners, directory {kind}, "
                 "{sessions} sessions kept{needs}", path=str(new.path),
                 listeners=len(new.listeners), kind=new.directory.type,
                 sessions=len(shared.registry.sessions), needs=needs, restart=restart)
        shared.metrics.reloaded(True)
        return True

    @staticmethod
    def _refresh(directory: Any) -> None:
        """A directory kept across the reload (LDAP, same settings): fresh answers, and
        one probe (a new one is probed when its service starts)."""
        clear = getattr(directory, "clear_cache", None)
        if clear is not None:
            clear()
        probe = getattr(directory, "probe", None)
        if probe is not None:
            probe("reload")


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

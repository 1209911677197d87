"""reload: a new map routes new logins elsewhere while old sessions stay; a bad config is
refused whole; LDAP settings and restart-only keys; SIGHUP runs it in the reactor."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

from helpers import FakeEndpoint, Harness
from twisted.application.service import MultiService, Service
from twisted.logger import capturedLogs, formatEvent

from imapproxy.backendconn import BackendConnector
from imapproxy.config import Config, ConfigError, load
from imapproxy.directory import StaticDirectory
from imapproxy.metrics import Metrics
from imapproxy.penalty import Outcome
from imapproxy.reload import Reloader, ReloadService
from imapproxy.runtime import Runtime, Shared

CONFIG = """
[[listen]]
protocol = "imap"
address = "127.0.0.1:1143"
tls = "none"
{listen_extra}
[tls]
plaintext_auth = true

[directory]
{directory}

[timeouts]
idle = {idle}
"""
STATIC = 'type = "static"\nmap = "users.map"'
LDAP = 'type = "ldap"\n[directory.ldap]\nbase = "dc=example,dc=org"\ntimeout = {timeout}'


def write(folder: Path, directory: str = STATIC, idle: int = 1860, listen_extra: str = "",
          routes: str = "* 10.0.0.1:143\n") -> Path:
    (folder / "users.map").write_text(routes)
    path = folder / "imapproxy.toml"
    path.write_text(CONFIG.format(directory=directory, idle=idle, listen_extra=listen_extra))
    return path


class Rig:
    """A Harness whose runtime comes from a config file, with a Reloader over it; the
    directories and connectors it builds are the harness's kind (fakes for LDAP)."""

    def __init__(self, folder: Path, current: Any = None, services: list[Any] | None = None,
                 client_tls: Any = None, **config: Any) -> None:
        self.path = write(folder, **config)
        self.config = load(self.path)
        self.metrics = Metrics()
        self.h = Harness(make_metrics=lambda _: self.metrics)
        self.root = MultiService()
        self.built: list[Config] = []
        h = self.h
        shared = dataclasses.replace(h.shared, client_tls=client_tls)
        directory = current if current is not None else h.runtime.directory
        h.current.runtime = self.build(self.config, shared, directory=directory,
                                       directory_services=tuple(services or ()))
        self.reloader = Reloader(h.current, self.root, builder=self.build)

    def build(self, config: Config, shared: Shared, *, directory: Any = None,
              directory_services: tuple[Any, ...] = ()) -> Runtime:
        if directory is None:
            self.built.append(config)
            if config.directory.type == "ldap":
                directory, directory_services = Ldap(), (Service(),)
            else:
                assert config.directory.map is not None
                directory = StaticDirectory.from_file(config.directory.map)
        connector = BackendConnector(self.h.reactor, config, endpoint_factory=lambda host, port:
                                     FakeEndpoint(self.h.reactor, host, port, self.h.backends))
        return Runtime(config, directory, directory_services, connector, shared)


class Ldap:
    cleared = 0

    def __init__(self) -> None:
        self.probes: list[str] = []

    def clear_cache(self) -> None:
        self.cleared += 1

    def probe(self, when: str = "start") -> None:
        self.probes.append(when)


def test_new_map_routes_new_logins_while_an_idle_session_stays(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    h = rig.h
    idler, idler_transport, idle_backend = h.logged_in_client()
    idler.dataReceived(b"i1 IDLE\r\n")
    idle_backend.dataReceived(b"+ idling\r\n")
    assert idle_backend.transport.getPeer().host == "10.0.0.1"
    write(tmp_path, routes="* 10.0.0.2:143\n", idle=3600)
    assert rig.reloader.reload()
    assert h.runtime.config.timeouts.idle == 3600  # the sweep reads it there
    _, _, new_backend = h.logged_in_client()
    assert new_backend.transport.getPeer().host == "10.0.0.2"
    assert idler_transport.connected and not idler_transport.disconnecting
    idle_backend.dataReceived(b"* 3 EXISTS\r\n")
    assert idler_transport.value().endswith(b"* 3 EXISTS\r\n")  # still relaying


def test_bad_config_is_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (tmp_path / "users.map").write_text("this line is wrong\n")
    with capturedLogs() as events:
        assert not rig.reloader.reload()
    assert any("reload refused" in e.get("log_format", "") and "line 1" in e["error"]
               for e in events)
    _, _, backend = rig.h.logged_in_client()
    assert backend.transport.getPeer().host == "10.0.0.1"
    (tmp_path / "imapproxy.toml").write_text("[[listen]]\nnot toml at all")
    assert not rig.reloader.reload()
    assert rig.h.runtime.config is rig.config
    families = rig.metrics.render().decode()
    assert 'imapproxy_reloads_total{result="refused"} 2.0' in families


def test_unexpected_errors_refuse_too(tmp_path: Path) -> None:
    rig = Rig(tmp_path)

    def broken(config: Config, shared: Shared, **kept: Any) -> Any:
        raise RuntimeError("bug")

    rig.reloader.builder = broken
    with capturedLogs() as events:
        assert not rig.reloader.reload()
    assert any(e.get("log_failure") is not None for e in events)


def test_unchanged_ldap_settings_only_clear_the_cache(tmp_path: Path) -> None:
    ldap, service = Ldap(), Service()
    rig = Rig(tmp_path, current=ldap, services=[service],
              directory=LDAP.format(timeout=5))
    service.setServiceParent(rig.root)
    assert rig.reloader.reload()
    assert ldap.cleared == 1 and rig.built == []
    assert ldap.probes == ["reload"]  # the kept directory is tried again
    write(tmp_path, directory=LDAP.format(timeout=7))
    rig.root.startService()
    assert rig.reloader.reload()
    assert rig.built[-1].directory.ldap is not None
    assert rig.built[-1].directory.ldap.timeout == 7
    assert service.parent is None  # the old pool is stopped
    assert ldap.probes == ["reload"]  # a new directory is tried by its own service
    (new_service,) = rig.h.runtime.directory_services
    assert new_service.parent is rig.root and new_service.running


def test_restart_only_changes_are_named_key_by_key_in_the_reloaded_line(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    write(tmp_path, listen_extra="proxy_protocol = true")
    path = tmp_path / "imapproxy.toml"
    path.write_text(path.read_text().replace("127.0.0.1:1143", "127.0.0.1:1144"))
    with capturedLogs() as events:
        assert rig.reloader.reload()
    [line] = [formatEvent(e) for e in events if formatEvent(e).startswith("reloaded ")]
    assert line.endswith("; listen[0].address needs a restart; "
                         "listen[0].proxy_protocol needs a restart"), line


def test_limits_the_penalty_and_the_cooldown_apply_at_once(tmp_path: Path) -> None:
    """SIGHUP used to leave [limits], the penalty and down_cooldown as they were."""
    rig = Rig(tmp_path)
    shared = rig.h.runtime.shared
    gate = shared.penalty
    gate.enter("192.0.2.7", gate.user_key("alice")).result.finish(
        Outcome.FAILURE, gate.fingerprint("alice", b"typo"))
    path = tmp_path / "imapproxy.toml"
    path.write_text(path.read_text() + """
[limits]
max_connections_per_ip = 1
login_delay = 5
login_delay_max = 5
penalty_exempt = ["198.51.100.0/24"]

[backend]
down_cooldown = 3
""")
    with capturedLogs() as events:
        assert rig.reloader.reload()
    assert not any("needs a restart" in formatEvent(e) for e in events)
    assert shared.limiter.max_per_client == 1
    rig.h.connect_client("192.0.2.9")
    _second, transport = rig.h.connect_client("192.0.2.9")
    assert b"Too many connections from this address" in transport.value()
    assert gate.penalty.base == 5 and gate.penalty.is_exempt("198.51.100.7")
    assert gate.penalty.failures("192.0.2.7", "alice") == (1, 1), "what was learnt stays"
    assert shared.breaker.cooldown == 3


def test_the_shared_section_applies_on_reload(tmp_path: Path) -> None:
    class State:
        configs: list[Any] = []

        def reconfigure(self, config: Any) -> None:
            self.configs.append(config)

    rig = Rig(tmp_path)
    state = State()
    rig.h.current.runtime = dataclasses.replace(
        rig.h.runtime, shared=dataclasses.replace(rig.h.runtime.shared, state=state))
    path = tmp_path / "imapproxy.toml"
    path.write_text(path.read_text() + '\n[shared]\nredis = "redis://127.0.0.1:6390/1"\n'
                    "timeout = 0.5\n")
    with capturedLogs() as events:
        assert rig.reloader.reload()
    assert not any("needs a restart" in formatEvent(e) for e in events)
    [shared] = state.configs
    assert str(shared.url) == "redis://127.0.0.1:6390/1" and shared.timeout == 0.5


def test_a_new_login_rate_applies_to_the_logins_already_waiting(tmp_path: Path) -> None:
    """Issue 17: the pacer is shared (it holds the line); a reload reconfigures it."""
    rig = Rig(tmp_path)
    shared = rig.h.runtime.shared
    path = tmp_path / "imapproxy.toml"
    base = path.read_text()
    path.write_text(base + "\n[limits]\nmax_login_rate = 1\nmax_login_queue = 10\n"
                    "max_parallel_logins_per_ip = 100\n")
    assert rig.reloader.reload()
    assert (shared.pacer.pacer.rate, shared.pacer.pacer.max_waiting) == (1.0, 10)
    for i in range(6):
        client, _ = rig.h.connect_client()
        client.dataReceived(b"a LOGIN user%d secret\r\n" % i)
    assert len(rig.h.backends) == 1 and shared.pacer.waiting == 5
    path.write_text(base + "\n[limits]\nmax_login_rate = 3\n"
                    "max_parallel_logins_per_ip = 100\n")
    assert rig.reloader.reload()
    # A bucket of 3, less the one login still taken: two go at once, the rest at 3/s.
    assert len(rig.h.backends) == 3 and shared.pacer.waiting == 3
    assert shared.pacer.pacer.max_waiting == 90  # automatic: 3/s for half of 60 s
    rig.h.reactor.advance(1.0)
    assert len(rig.h.backends) == 6 and shared.pacer.waiting == 0
    path.write_text(base)
    assert rig.reloader.reload()
    assert shared.pacer.pacer.rate == 0.0


def test_tls_reload_failure_refuses_everything(tmp_path: Path) -> None:
    class ServerTLS:
        def reload(self, tls: Any) -> None:
            raise ConfigError(tmp_path, "tls.certificate", "cannot load")

    rig = Rig(tmp_path, client_tls=ServerTLS())
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    text = (tmp_path / "imapproxy.toml").read_text().replace(
        "[tls]\n", f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    (tmp_path / "imapproxy.toml").write_text(text)
    (tmp_path / "users.map").write_text("* 10.0.0.9\n")
    assert not rig.reloader.reload()
    assert rig.h.runtime.config is rig.config


class _Reactor:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        self.calls.append(f)


def test_sighup_runs_the_reload_in_the_reactor(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    reactor = _Reactor()
    service = ReloadService(rig.reloader, reactor)
    before = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [rig.reloader.reload]
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_certificates_are_reloaded_with_the_new_tls_table(tmp_path: Path) -> None:
    loaded: list[Any] = []

    class ServerTLS:
        def reload(self, tls: Any) -> None:
            loaded.append(tls)

    rig = Rig(tmp_path, client_tls=ServerTLS())
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    text = (tmp_path / "imapproxy.toml").read_text().replace(
        "[tls]\n", f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    (tmp_path / "imapproxy.toml").write_text(text)
    assert rig.reloader.reload()
    assert [tls.certificate for tls in loaded] == [cert]

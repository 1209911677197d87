"""Runtime, Shared and Current (runtime.py): what is built from one config, and swapped whole.

On a MemoryReactorClock: the backend connector's dials land in ``reactor.tcpClients``;
LDAP is built (a thread pool service, not started), never asked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from rig.certs import TestCA
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from imapproxy.backendconn import BackendProtocol
from imapproxy.breaker import CircuitBreaker
from imapproxy.clienttls import ServerTLS
from imapproxy.config import (
    BackendConfig,
    Config,
    ConfigError,
    DirectoryConfig,
    LdapConfig,
    Limits,
    Listener,
    SharedConfig,
    TlsConfig,
)
from imapproxy.directory import Route, Server, StaticDirectory
from imapproxy.errors import BackendUnavailable, UserNotFound
from imapproxy.frontend import ProxyFactory
from imapproxy.ldapdirectory import LdapDirectory
from imapproxy.limits import ConnectionLimiter, Ticket
from imapproxy.metrics import NULL_METRICS, Metrics, NullMetrics
from imapproxy.pacinggate import PacingGate
from imapproxy.penalty import Penalty
from imapproxy.penaltygate import LocalGate
from imapproxy.redisurl import parse_redis_url
from imapproxy.registry import SessionRegistry
from imapproxy.runtime import Current, Shared, build, build_directory

LISTENER = Listener("imap", "127.0.0.1", 1143, "none")


def write_map(tmp_path: Path, text: str = "*@example.org 10.0.0.5:1143\n",
              name: str = "map.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def make_config(tmp_path: Path, *, map_path: Path | None = None, **sections: Any) -> Config:
    directory = sections.pop("directory", None) or DirectoryConfig(
        map=map_path if map_path is not None else write_map(tmp_path))
    return Config(path=tmp_path / "imapproxy.toml", listeners=(LISTENER,),
                  tls=sections.pop("tls", TlsConfig(plaintext_auth=True)), directory=directory,
                  backend=sections.pop("backend", BackendConfig(imap_port=10143)),
                  limits=sections.pop("limits", Limits()))


def make_shared(config: Config, reactor: MemoryReactorClock | None = None, *,
                metrics: NullMetrics = NULL_METRICS, client_tls: ServerTLS | None = None,
                ) -> Shared:
    """As service.build_service makes them."""
    reactor = reactor if reactor is not None else MemoryReactorClock()
    return Shared(reactor, SessionRegistry(reactor), ConnectionLimiter.from_limits(config.limits),
                  LocalGate(Penalty.from_limits(config.limits, reactor.seconds), reactor),
                  CircuitBreaker(reactor, config.backend.down_cooldown), metrics, client_tls,
                  PacingGate.from_limits(config.limits, reactor))


# -- build ----------------------------------------------------------------------------------


def test_build_reads_the_static_map_and_holds_the_shared_parts(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    shared = make_shared(config)
    runtime = build(config, shared)
    assert runtime.config is config and runtime.shared is shared
    assert runtime.registry is shared.registry and runtime.metrics is shared.metrics
    assert runtime.directory_services == ()
    assert runtime.directory.lookup("bob@example.org", "imap") == Route(
        "bob@example.org", (Server("10.0.0.5", 1143),))
    with pytest.raises(UserNotFound):
        runtime.directory.lookup("bob@example.com", "imap")
    assert runtime.connector.config is config and runtime.connector.reactor is shared.reactor


def test_build_again_from_a_new_config_sees_the_new_map(tmp_path: Path) -> None:
    # What a reload does: a new runtime with the same shared parts.
    first = make_config(tmp_path)
    shared = make_shared(first)
    old = build(first, shared)
    new_map = write_map(tmp_path, "*@example.org 10.0.0.6\n", "new-map.txt")
    new = build(make_config(tmp_path, map_path=new_map), shared)
    assert new.shared is old.shared
    assert new.directory.lookup("bob@example.org", "imap").servers == (Server("10.0.0.6"),)
    assert old.directory.lookup("bob@example.org", "imap").servers == (Server("10.0.0.5", 1143),)


def test_a_missing_map_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    config = make_config(tmp_path, map_path=tmp_path / "gone.txt")
    with pytest.raises(ConfigError, match="gone.txt.*cannot read map"):
        build(config, make_shared(config))


def test_a_kept_directory_is_neither_read_again_nor_wrapped_again(tmp_path: Path) -> None:
    # A reload with an unchanged LDAP directory keeps it (and its cache, its pool).
    config = make_config(tmp_path, map_path=tmp_path / "never-read.txt")
    shared = make_shared(config, metrics=Metrics())
    kept = StaticDirectory([("*", (Server("10.0.0.9"),))])
    pool = object()
    runtime = build(config, shared, directory=kept, directory_services=(pool,))  # type: ignore[arg-type]
    assert runtime.directory is kept and runtime.directory_services == (pool,)


def test_with_metrics_the_lookups_and_the_connects_are_timed(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    config = make_config(tmp_path)
    metrics = Metrics()
    runtime = build(config, make_shared(config, reactor, metrics=metrics))
    runtime.directory.lookup("bob@example.org", "imap")
    with pytest.raises(UserNotFound):
        runtime.directory.lookup("eve@example.com", "imap")
    dialled = defer.ensureDeferred(runtime.connector.dial(Server("10.0.0.5"), 10143))
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    reactor.advance(0.25)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())
    assert isinstance(dialled.result, BackendProtocol)
    text = metrics.render().decode()
    assert 'imapproxy_lookup_seconds_count{result="ok"} 1.0' in text
    assert 'imapproxy_lookup_seconds_count{result="not_found"} 1.0' in text
    assert 'imapproxy_backend_connect_seconds_sum{backend="10.0.0.5:10143"} 0.25' in text


def test_the_connector_dials_with_the_configured_connect_timeout(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    config = make_config(tmp_path, backend=BackendConfig(connect_timeout=4.5))
    runtime = build(config, make_shared(config, reactor))
    dialled = defer.ensureDeferred(runtime.connector.dial(Server("192.0.2.40"), 1430))
    host, port, factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.40", 1430, 4.5)
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    failure = []
    dialled.addErrback(failure.append)
    assert failure and failure[0].check(BackendUnavailable)
    # Names and IPv6 literals get their own endpoints (no resolver round trip for IPs).
    endpoints = runtime.connector.endpoint_factory
    assert isinstance(endpoints("mail.example.org", 143), HostnameEndpoint)
    assert isinstance(endpoints("2001:db8::5", 143), TCP6ClientEndpoint)


def test_backend_trust_is_only_loaded_when_backend_tls_is_on(tmp_path: Path,
                                                             test_ca: TestCA) -> None:
    # tls = "none": ca_file is not read at all (a file that is no PEM does no harm).
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = make_config(tmp_path, backend=BackendConfig(ca_file=junk))
    assert build(config, make_shared(config)).connector.trust_root is None
    config = make_config(tmp_path, backend=BackendConfig(tls="starttls", ca_file=test_ca.ca_path))
    assert build(config, make_shared(config)).connector.trust_root is not None


def test_the_backend_client_certificate_is_loaded_or_refused_by_name(
        tmp_path: Path, test_ca: TestCA) -> None:
    pair = test_ca.issue("proxy.example.org")
    config = make_config(tmp_path, backend=BackendConfig(
        tls="implicit", ca_file=test_ca.ca_path, client_certificate=pair.chain_path,
        client_key=pair.key_path))
    certificate = build(config, make_shared(config)).connector.client_certificate
    assert certificate is not None
    assert certificate.getSubject().commonName == b"proxy.example.org"
    other = test_ca.issue("other.example.org")
    wrong = dataclasses.replace(config, backend=dataclasses.replace(
        config.backend, client_key=other.key_path))
    with pytest.raises(ConfigError, match="backend.client_key"):
        build(wrong, make_shared(wrong))


def test_an_unreadable_backend_ca_file_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken-ca.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    config = make_config(tmp_path, backend=BackendConfig(tls="starttls", ca_file=broken))
    with pytest.raises(ConfigError, match="backend.ca_file"):
        build(config, make_shared(config))


def test_a_backend_ca_file_without_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-ca.pem"
    empty.write_text("# nothing here\n")
    config = make_config(tmp_path, backend=BackendConfig(tls="implicit", ca_file=empty))
    with pytest.raises(ConfigError, match="backend.ca_file"):
        build(config, make_shared(config))


# -- the LDAP directory: built, not started ----------------------------------------------------


def ldap_config(tmp_path: Path, **ldap: Any) -> Config:
    settings: dict[str, Any] = {"uris": ("ldap://127.0.0.1:9",), "base": "dc=example,dc=org"}
    settings.update(ldap)
    return make_config(tmp_path, directory=DirectoryConfig(type="ldap",
                                                           ldap=LdapConfig(**settings)))


def test_an_ldap_directory_comes_with_its_pool_service_not_started(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    config = ldap_config(tmp_path, pool_size=3)
    directory, services = build_directory(config, reactor)
    assert isinstance(directory, LdapDirectory)
    assert services == (directory.service,)
    (pool,) = services
    assert not pool.running and pool.pool.max == 3  # type: ignore[attr-defined]
    runtime = build(config, make_shared(config, reactor, metrics=Metrics()))
    # Wrapped by the metrics, still reaching the directory's own attributes.
    assert runtime.directory_services == (runtime.directory.service,)
    assert not runtime.directory_services[0].running


def test_an_ldap_filter_ldap3_cannot_parse_stops_the_build(tmp_path: Path) -> None:
    config = ldap_config(tmp_path, filter="(uid={user}")
    with pytest.raises(ConfigError, match="directory.ldap.filter"):
        build(config, make_shared(config))


def test_ldap_without_its_table_is_a_config_error(tmp_path: Path) -> None:
    config = make_config(tmp_path, directory=DirectoryConfig(type="ldap"))
    with pytest.raises(ConfigError, match="directory.ldap"):
        build(config, make_shared(config))


# -- Current: one runtime, replaced in one assignment ----------------------------------------


def test_current_holds_one_runtime_and_a_reload_is_one_assignment(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    shared = make_shared(config)
    old = build(config, shared)
    current = Current(old)
    factory = ProxyFactory(current, LISTENER)
    before = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    new = build(make_config(tmp_path, limits=Limits(max_connections_per_ip=3)), shared)
    current.runtime = new
    after = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40001))
    # A connection keeps the runtime current when it came; the next one takes the new.
    assert before.runtime is old and after.runtime is new
    assert after.runtime.config.limits.max_connections_per_ip == 3
    with pytest.raises(AttributeError):
        current.config = config  # type: ignore[attr-defined]  # __slots__: nothing else


def test_a_runtime_and_its_shared_parts_are_never_patched(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    runtime = build(config, make_shared(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.directory = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.shared.breaker = None  # type: ignore[misc]


# -- Shared: reconfigured in place, what it counts kept --------------------------------------


def test_reconfigure_applies_the_new_limits_and_keeps_the_counts(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits=Limits(max_connections_per_ip=2, login_delay=2.0),
                         backend=BackendConfig(down_cooldown=30.0))
    shared = make_shared(config)
    first = shared.limiter.admit("192.0.2.7")
    assert isinstance(first, Ticket)
    shared.breaker.mark_failed(Server("10.0.0.1"))
    assert shared.pacer.enter() is None  # no pacing
    new = make_config(tmp_path, limits=Limits(max_connections_per_ip=1, login_delay=4.0,
                                              login_delay_max=8.0, max_login_rate=50.0),
                      backend=BackendConfig(down_cooldown=5.0))
    shared.reconfigure(new)
    assert shared.pacer.pacer.rate == 50.0 and shared.pacer.enter() == 0.0
    # The connection already in still counts, against the new, lower limit.
    assert shared.limiter.connections_from("192.0.2.7") == 1
    assert not isinstance(shared.limiter.admit("192.0.2.7"), Ticket)
    assert shared.penalty.penalty.delay(1) == 4.0 and shared.penalty.penalty.delay(5) == 8.0
    assert shared.breaker.cooldown == 5.0
    assert shared.breaker.down() == [Server("10.0.0.1")]  # what it learnt stays


def test_reconfigure_passes_the_shared_section_on(tmp_path: Path) -> None:
    class State:
        def __init__(self) -> None:
            self.configs: list[SharedConfig] = []

        def reconfigure(self, config: SharedConfig) -> None:
            self.configs.append(config)

    config = make_config(tmp_path)
    state = State()
    shared = dataclasses.replace(make_shared(config), state=state)
    url = "redis://127.0.0.1:6390/1"
    new = dataclasses.replace(config, shared=SharedConfig(redis=url, url=parse_redis_url(url)))
    shared.reconfigure(new)
    assert state.configs == [new.shared]
    make_shared(config).reconfigure(new)  # no state (as in tests): nothing to tell


def test_reload_certificates_loads_new_files_or_keeps_the_old(tmp_path: Path,
                                                              test_ca: TestCA) -> None:
    first, second = test_ca.issue("imap.example.org"), test_ca.issue("mail.example.org")
    tls = TlsConfig(certificate=first.chain_path, key=first.key_path)
    config = make_config(tmp_path, tls=tls)
    client_tls = ServerTLS(tls, config.path)
    shared = make_shared(config, client_tls=client_tls)
    renewed = dataclasses.replace(config, tls=TlsConfig(certificate=second.chain_path,
                                                        key=second.key_path))
    shared.reload_certificates(renewed)
    assert client_tls.config is renewed.tls
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tls.certificate"):
        shared.reload_certificates(dataclasses.replace(
            config, tls=TlsConfig(certificate=broken, key=second.key_path)))
    assert client_tls.config is renewed.tls  # the last good one serves on
    # A config without a certificate leaves the client TLS as it is (no ConfigError).
    shared.reload_certificates(dataclasses.replace(config, tls=TlsConfig()))
    assert client_tls.config is renewed.tls


def test_reload_certificates_without_client_tls_does_nothing(tmp_path: Path,
                                                             test_ca: TestCA) -> None:
    pair = test_ca.issue("imap.example.org")
    config = make_config(tmp_path)
    shared = make_shared(config)
    shared.reload_certificates(dataclasses.replace(
        config, tls=TlsConfig(certificate=pair.chain_path, key=pair.key_path)))
    assert shared.client_tls is None


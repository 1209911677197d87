"""service: the tree build_service makes, on a MemoryReactorClock: listeners, metrics,
admin, PROXY headers, all reading the one runtime in ``current``."""

from __future__ import annotations

from pathlib import Path

from rig.proxy import ADMIN_TOKEN, admin_token_file
from twisted.internet.testing import MemoryReactorClock

from imapproxy.admin import AdminResource, admin_endpoint
from imapproxy.config import load
from imapproxy.frontend import ProxyFactory
from imapproxy.metrics import Metrics, TimedDirectory
from imapproxy.penaltygate import LocalGate
from imapproxy.proxyheader import ProxyHeaderFactory
from imapproxy.redisstate import RedisState
from imapproxy.service import build_service
from imapproxy.sharedgate import SharedGate

CONFIG = """
[[listen]]
protocol = "imap"
address = "127.0.0.1:1143"
tls = "none"

[[listen]]
protocol = "pop3"
address = "127.0.0.1:1110"
tls = "none"
proxy_protocol = true

[tls]
plaintext_auth = true

[directory]
map = "users.map"

[metrics]
address = "127.0.0.1:9143"

[admin]
address = "{admin}"
{token}
[proxy_protocol]
trusted = ["10.0.0.0/8"]
timeout = 3
"""


def config_file(tmp_path: Path, admin: str = "127.0.0.1:9144") -> Path:
    (tmp_path / "users.map").write_text("* 10.0.0.1\n")
    path = tmp_path / "imapproxy.toml"
    token = ""
    if not admin.startswith("/"):
        token = f'token_file = "{admin_token_file(tmp_path).name}"\n'
    path.write_text(CONFIG.format(admin=admin, token=token))
    return path


def test_the_tree_wires_metrics_admin_and_proxy_listeners(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    top = build_service(load(config_file(tmp_path)), reactor, worker_index=2)
    runtime = top.current.runtime
    metrics = runtime.metrics
    assert isinstance(metrics, Metrics)
    top.privilegedStartService()
    top.startService()
    try:
        ports = {port: (factory, interface) for port, factory, _, interface in reactor.tcpServers}
        assert set(ports) == {1143, 1110, 9145, 9146}  # metrics and admin: port + worker index
        admin = ports[9146][0].resource
        # Worker 2 takes its own address as Host, and the token from the config.
        assert isinstance(admin, AdminResource) and admin.authority == "127.0.0.1:9146"
        assert admin.token is not None and admin.token.reveal() == ADMIN_TOKEN.encode()
        header = ports[1110][0]
        assert isinstance(header, ProxyHeaderFactory) and header.timeout == 3
        assert header.metrics is metrics
        assert isinstance(header.wrappedFactory, ProxyFactory)
        assert header.trusted.allows("10.9.9.9") and not header.trusted.allows("127.0.0.1")
        # Every factory reads the one runtime; the metrics time what it was built with.
        assert all(factory.current is top.current for factory in top.factories)
        assert isinstance(runtime.directory, TimedDirectory)
        assert top.reloader.current is top.current
    finally:
        top.stopService()


def test_admin_on_a_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "admin.sock"
    socket_path.write_text("")  # a plain file is not removed: only stale sockets are
    config = load(config_file(tmp_path, admin=str(socket_path)))
    endpoint = admin_endpoint(MemoryReactorClock(), config, 0)
    assert endpoint._address == str(socket_path)
    assert admin_endpoint(MemoryReactorClock(), config, 3)._address == f"{socket_path}.3"
    assert socket_path.exists()
    top = build_service(config, MemoryReactorClock())
    [site] = [s.factory for s in top if getattr(s, "endpoint", None) is not None
              and getattr(s.endpoint, "_address", None) == str(socket_path)]
    assert site.resource.authority is None and site.resource.token is None  # any Host


def test_the_shared_state_is_in_the_tree(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    path.write_text(path.read_text() + '\n[shared]\nredis = "redis://127.0.0.1:6390/2"\n')
    top = build_service(load(path), MemoryReactorClock())
    shared = top.current.runtime.shared
    assert isinstance(shared.state, RedisState) and shared.state.enabled
    assert isinstance(shared.penalty, SharedGate) and shared.penalty.state is shared.state
    assert isinstance(shared.penalty.inner, LocalGate)
    assert shared.state in list(top)
    # Without [shared] it is there, off, for a reload to turn on.
    plain = build_service(load(config_file(tmp_path)), MemoryReactorClock())
    assert not plain.current.runtime.shared.state.enabled


def _readyz(reactor: MemoryReactorClock) -> int:
    """GET /readyz on the metrics site the tree listens with (port 9143 + worker 0)."""
    from twisted.web.test.requesthelper import DummyRequest

    site = next(factory for port, factory, _, _ in reactor.tcpServers if port == 9143)
    request = DummyRequest([b"readyz"])
    request.path = b"/readyz"
    site.resource.render(request)
    return request.responseCode or 200


def test_sigterm_with_a_drain_notice_says_503_first_and_drains_after(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    path.write_text(path.read_text() + "\n[timeouts]\ndrain_notice = 2.5\n")
    reactor = MemoryReactorClock()
    top = build_service(load(path), reactor)
    registry = top.current.runtime.registry
    top.privilegedStartService()
    top.startService()
    assert _readyz(reactor) == 200
    stopped = top.stopService()
    # The notice: not ready, but nothing is drained or stopped yet; new sessions are served.
    assert registry.leaving and not registry.draining and not stopped.called
    assert _readyz(reactor) == 503
    assert all(listener.running for listener in top if hasattr(listener, "endpoint"))
    reactor.advance(2.4)
    assert not registry.draining and not stopped.called
    reactor.advance(0.2)
    # Then the tree stops as without a notice: the drain (nothing to drain here) is done.
    assert registry.draining and registry.stopping
    assert stopped.called


def test_sigterm_without_a_drain_notice_drains_at_once(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    top = build_service(load(config_file(tmp_path)), reactor)
    top.privilegedStartService()
    top.startService()
    stopped = top.stopService()
    assert top.current.runtime.registry.draining and not top.current.runtime.registry.leaving
    assert stopped.called


def test_undrain_cannot_call_off_the_notice_of_a_sigterm(tmp_path: Path) -> None:
    """During SIGTERM's drain_notice the process is stopping: an undrain is refused and
    /readyz stays 503 (the balancer must not send clients to a process about to go)."""
    path = config_file(tmp_path)
    path.write_text(path.read_text() + "\n[timeouts]\ndrain_notice = 2.5\n")
    reactor = MemoryReactorClock()
    top = build_service(load(path), reactor)
    registry = top.current.runtime.registry
    top.privilegedStartService()
    top.startService()
    stopped = top.stopService()
    assert registry.undrain() is False
    assert registry.leaving and _readyz(reactor) == 503
    reactor.advance(2.5)
    assert registry.draining and stopped.called

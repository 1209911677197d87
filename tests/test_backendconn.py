"""BackendConnector and BackendProtocol on a MemoryReactorClock: dialling (endpoints, TLS,
a PROXY header), the login dialogue carried out on the connection, its timeout, and why
a backend connection failed. No sleeps: the clock is advanced."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import DOVECOT_GREETING, FakeEndpoint
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from imapproxy.actions import BackendLoggedIn
from imapproxy.backendconn import (
    BackendConnector,
    BackendProtocol,
    default_endpoint_factory,
    why_lost,
)
from imapproxy.config import BackendConfig, Config, DirectoryConfig, Listener, Timeouts, TlsConfig
from imapproxy.credentials import Credentials, Secret
from imapproxy.directory import Server
from imapproxy.errors import AuthenticationFailed, BackendUnavailable, LoginDropped
from imapproxy.imapbackend import ImapBackendLogin

LOGIN_LINE = b'P3 LOGIN "alice" "secret"\r\n'


def make_config(**backend: Any) -> Config:
    return Config(path=Path("/nonexistent/test.toml"),
                  listeners=(Listener("imap", "127.0.0.1", 1143, "none"),),
                  tls=TlsConfig(plaintext_auth=True), directory=DirectoryConfig(),
                  backend=BackendConfig(**backend), timeouts=Timeouts())


def dialogue(starttls: bool = False) -> ImapBackendLogin:
    return ImapBackendLogin(Credentials("alice", Secret(b"secret")), "alice", starttls=starttls)


def run(coroutine: Coroutine[Any, Any, Any]) -> list[Any]:
    """Start a coroutine on the (memory) reactor's terms: a one-element list once it is
    done, holding its result or its Failure; empty while it waits."""
    outcome: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    return outcome


def failed_with(outcome: list[Any], kind: type[Exception]) -> Exception:
    assert len(outcome) == 1 and isinstance(outcome[0], Failure), outcome
    assert outcome[0].check(kind), outcome[0]
    return outcome[0].value


class StartTLSTransport(StringTransportWithDisconnection):
    """An in-memory transport that records startTLS (StringTransport has none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started: list[Any] = []
        self.written_before_tls = b""

    def startTLS(self, options: Any) -> None:  # noqa: N802
        self.written_before_tls = self.value()
        self.tls_started.append(options)


@dataclass
class StartTLSEndpoint(FakeEndpoint):
    transports: list[StartTLSTransport] = field(default_factory=list)

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        transport = StartTLSTransport(peerAddress=IPv4Address("TCP", self.host, self.port),
                                      hostAddress=IPv4Address("TCP", "10.9.9.9", 50000))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        self.transports.append(transport)
        return defer.succeed(protocol)


@dataclass
class Rig:
    """A connector on a MemoryReactorClock whose endpoints are in-memory."""

    backend: dict[str, Any] = field(default_factory=dict)
    reactor: MemoryReactorClock = field(default_factory=MemoryReactorClock)
    connections: list[Any] = field(default_factory=list)
    dialled: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = make_config(**self.backend)
        self.endpoints: list[StartTLSEndpoint] = []

        def endpoint(host: str, port: int) -> StartTLSEndpoint:
            self.dialled.append((host, port))
            e = StartTLSEndpoint(self.reactor, host, port, self.connections)
            self.endpoints.append(e)
            return e
        self.connector = BackendConnector(self.reactor, self.config, endpoint_factory=endpoint)

    def dial(self, host: str = "10.0.0.1", port: int = 143,
             header: bytes = b"") -> BackendProtocol:
        outcome = run(self.connector.dial(Server(host), port, header))
        assert len(outcome) == 1 and isinstance(outcome[0], BackendProtocol), outcome
        return outcome[0]


# -- dialling -----------------------------------------------------------------------------------


def test_default_endpoints_dial_ip_literals_directly_with_the_connect_timeout() -> None:
    reactor = MemoryReactorClock()
    factory = default_endpoint_factory(reactor, 3.5)
    assert isinstance(factory("10.0.0.1", 143), TCP4ClientEndpoint)
    assert isinstance(factory("2001:db8::1", 143), TCP6ClientEndpoint)
    # A name goes through the resolver (and HostnameEndpoint tries each address).
    assert isinstance(factory("imap.example.org", 143), HostnameEndpoint)
    factory("10.0.0.1", 143).connect(Factory())
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("10.0.0.1", 143, 3.5)


def test_connect_timeout_is_backend_unavailable_connect_timed_out() -> None:
    """[backend] connect_timeout reaches the reactor's connectTCP; the failure the
    reactor reports when it expires becomes BackendUnavailable("connect timed out").
    MemoryReactor does not run that timer itself: the test delivers its failure."""
    reactor = MemoryReactorClock()
    config = make_config(connect_timeout=2.0)
    connector = BackendConnector(reactor, config,
                                 endpoint_factory=default_endpoint_factory(reactor, 2.0))
    outcome = run(connector.dial(Server("10.0.0.1"), 143))
    host, port, wrapping, timeout, _ = reactor.tcpClients[-1]
    assert (host, port, timeout) == ("10.0.0.1", 143, 2.0)
    assert outcome == []
    wrapping.clientConnectionFailed(reactor.connectors[-1], Failure(error.TimeoutError()))
    assert str(failed_with(outcome, BackendUnavailable)) == "connect timed out"


def test_connection_refused_is_backend_unavailable_with_why() -> None:
    reactor = MemoryReactorClock()
    connector = BackendConnector(reactor, make_config(),
                                 endpoint_factory=default_endpoint_factory(reactor, 10.0))
    outcome = run(connector.dial(Server("10.0.0.1"), 143))
    _, _, wrapping, _, _ = reactor.tcpClients[-1]
    wrapping.clientConnectionFailed(reactor.connectors[-1],
                                    Failure(error.ConnectionRefusedError()))
    assert str(failed_with(outcome, BackendUnavailable)) == "connection refused"


def test_dial_without_tls_says_nothing_first() -> None:
    rig = Rig()
    backend = rig.dial("10.0.0.1", 1143)
    assert rig.dialled == [("10.0.0.1", 1143)]
    assert backend.transport.value() == b""
    assert backend.leg is not None
    assert (backend.peer_host, backend.peer_port, backend.local_host) == (
        "10.0.0.1", 1143, "10.9.9.9")


def test_implicit_tls_starts_a_handshake_at_once() -> None:
    rig = Rig(backend={"tls": "implicit", "insecure_skip_verify": True})
    backend = rig.dial("10.0.0.1", 993)
    # The endpoint's connection is the TLS layer; the backend protocol sits inside it.
    tls = rig.connections[-1]
    assert isinstance(tls, TLSMemoryBIOProtocol)
    assert tls.wrappedProtocol is backend
    hello = tls.transport.value()
    assert hello[:1] == b"\x16"  # a TLS handshake record: the ClientHello (RFC 8446 5.1)


def test_implicit_tls_verifies_the_servers_own_name() -> None:
    rig = Rig(backend={"tls": "implicit"})
    rig.dial("imap.example.org", 993)
    # The name the certificate is checked against is the route's host, sent as SNI
    # (RFC 6066 section 3) in the ClientHello.
    assert b"imap.example.org" in rig.connections[-1].transport.value()


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_no_tls_layer_at_dial_time_unless_implicit(tls: str) -> None:
    rig = Rig(backend={"tls": tls})
    backend = rig.dial()
    assert rig.connections[-1] is backend
    assert rig.endpoints[-1].transports[-1].value() == b""


def test_proxy_v2_header_goes_first_before_anything_else() -> None:
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12)  # PROXY v2, TCP4, zero addresses
    rig = Rig()
    backend = rig.dial(header=header)
    assert rig.endpoints[-1].transports[-1].value() == header
    assert backend.transport is not None


def test_proxy_v2_header_goes_before_the_tls_handshake() -> None:
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12)
    rig = Rig(backend={"tls": "implicit", "insecure_skip_verify": True})
    rig.dial(header=header)
    written = rig.endpoints[-1].transports[-1].value()
    # The header is for the backend's TCP listener (HAProxy-style), outside TLS.
    assert written.startswith(header)
    assert written[len(header):len(header) + 1] == b"\x16"


# -- the login dialogue ---------------------------------------------------------------------


def test_the_dialogue_runs_on_the_connection_and_ends_logged_in_and_paused() -> None:
    rig = Rig()
    backend = rig.dial()
    transport = backend.transport
    # The greeting can come before the dialogue starts: it waits for it.
    backend.dataReceived(DOVECOT_GREETING)
    assert transport.value() == b""
    outcome = run(rig.connector.log_in(backend, dialogue()))
    assert transport.value() == LOGIN_LINE
    assert outcome == []
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert outcome == [backend]
    assert backend.result == BackendLoggedIn(b"IMAP4rev1 IDLE")
    # Paused until the client side is wired up (relay.py resumes it).
    assert transport.producerState == "paused"
    # The login timer is gone with the login.
    assert rig.reactor.getDelayedCalls() == []


def test_after_login_bytes_go_to_the_relay_and_a_loss_is_told_to_it() -> None:
    rig = Rig()
    backend = rig.dial()
    run(rig.connector.log_in(backend, dialogue()))
    backend.dataReceived(DOVECOT_GREETING + b"P3 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert backend.logged_in.called

    class Relay:
        def __init__(self) -> None:
            self.data: list[bytes] = []
            self.lost = 0

        def from_backend(self, data: bytes) -> None:
            self.data.append(data)

        def backend_lost(self) -> None:
            self.lost += 1

    # Before the splice: nothing is lost to the dialogue, nothing goes anywhere.
    backend.dataReceived(b"* 1 EXISTS\r\n")
    relay = Relay()
    backend.relay = relay
    backend.dataReceived(b"* 2 EXISTS\r\n")
    assert relay.data == [b"* 2 EXISTS\r\n"]
    backend.connectionLost(Failure(error.ConnectionDone()))
    assert relay.lost == 1


def test_starttls_to_the_backend_upgrades_then_asks_capabilities_again() -> None:
    rig = Rig(backend={"tls": "starttls", "insecure_skip_verify": True})
    backend = rig.dial()
    transport = rig.endpoints[-1].transports[-1]
    run(rig.connector.log_in(backend, dialogue(starttls=True)))
    backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
    assert transport.value() == b"P1 STARTTLS\r\n"
    backend.dataReceived(b"P1 OK Begin TLS negotiation now.\r\n")
    assert len(transport.tls_started) == 1
    assert transport.written_before_tls == b"P1 STARTTLS\r\n"
    # RFC 3501 section 6.2.1: capabilities seen before TLS no longer count.
    assert transport.value() == b"P1 STARTTLS\r\nP5 CAPABILITY\r\n"


def test_a_refused_login_is_its_error_and_the_connection_is_closed() -> None:
    rig = Rig()
    backend = rig.dial()
    outcome = run(rig.connector.log_in(backend, dialogue()))
    backend.dataReceived(DOVECOT_GREETING
                         + b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    failed_with(outcome, AuthenticationFailed)
    assert not backend.transport.connected
    assert not backend.transport.disconnected  # closed after flushing, not aborted


def test_backend_closing_before_the_credentials_is_unavailable() -> None:
    rig = Rig()
    backend = rig.dial()
    outcome = run(rig.connector.log_in(backend, dialogue(starttls=True)))
    backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
    backend.connectionLost(Failure(error.ConnectionDone()))
    e = failed_with(outcome, BackendUnavailable)
    assert str(e) == "closed the connection during the login"


def test_backend_closing_on_the_credentials_is_a_dropped_login() -> None:
    rig = Rig()
    backend = rig.dial()
    outcome = run(rig.connector.log_in(backend, dialogue()))
    backend.dataReceived(DOVECOT_GREETING)
    assert backend.transport.value() == LOGIN_LINE
    backend.connectionLost(Failure(error.ConnectionLost()))
    # Dovecot drops a connection on a 4 KB name: a refused login, not a backend down.
    failed_with(outcome, LoginDropped)


def test_backend_reset_on_the_credentials_is_not_a_dropped_login() -> None:
    rig = Rig()
    backend = rig.dial()
    outcome = run(rig.connector.log_in(backend, dialogue()))
    backend.dataReceived(DOVECOT_GREETING)
    backend.connectionLost(Failure(SSL.Error([("SSL routines", "", "bad record mac")])))
    assert str(failed_with(outcome, BackendUnavailable)) == "TLS: bad record mac"


def test_no_answer_to_the_login_in_time_aborts_the_connection() -> None:
    rig = Rig(backend={"login_timeout": 7.0})
    backend = rig.dial()
    outcome = run(rig.connector.log_in(backend, dialogue()))
    backend.dataReceived(DOVECOT_GREETING)
    rig.reactor.advance(6.9)
    assert outcome == []
    rig.reactor.advance(0.1)
    assert str(failed_with(outcome, BackendUnavailable)) == "no answer to the login within 7s"
    assert not backend.transport.connected
    assert backend.transport.disconnected  # aborted: StringTransport.abortConnection marks it


def test_connection_lost_tells_the_registry() -> None:
    rig = Rig()
    backend = rig.dial()
    closed: list[BackendProtocol] = []

    class Registry:
        def backend_closed(self, b: BackendProtocol) -> None:
            closed.append(b)

    backend.registry = Registry()
    run(rig.connector.log_in(backend, dialogue()))
    backend.connectionLost(Failure(error.ConnectionDone()))
    assert closed == [backend]


def test_what_comes_before_the_dialogue_is_bounded_and_handed_to_it_once() -> None:
    rig = Rig()
    backend = rig.dial()
    for _ in range(100):
        backend.dataReceived(b"x" * 1024)

    class Recorder:
        credentials_sent = False

        def __init__(self) -> None:
            self.received: list[bytes] = []

        def receive_data(self, data: bytes) -> list[Any]:
            self.received.append(data)
            return []

    recorder = Recorder()
    backend.start(recorder)
    # A backend that talks before hearing a word from us is kept to 64 KiB, no more.
    assert [len(d) for d in recorder.received] == [65536]
    backend.dataReceived(b"y")
    assert recorder.received[-1] == b"y"


# -- why a connection failed, in an operator's words ----------------------------------------


@pytest.mark.parametrize(("failure", "text"), [
    (VerificationError([]), "TLS: certificate name mismatch"),
    (SSL.Error([("SSL routines", "", "certificate verify failed")]),
     "TLS: certificate not trusted"),
    (SSL.Error([("SSL routines", "", "wrong version number")]), "TLS: wrong version number"),
    (error.ConnectionRefusedError(), "connection refused"),
    (ConnectionRefusedError(), "connection refused"),
    (error.TimeoutError(), "connect timed out"),
    (TimeoutError(), "connect timed out"),
    (defer.CancelledError(), "connect timed out"),
    (error.DNSLookupError("imap.example.org"), "host name not found"),
    (error.ConnectionDone(), "closed the connection during the login"),
    (error.ConnectionLost(), "closed the connection during the login"),
    (OSError("No route to host"), "No route to host"),
])
def test_why_lost(failure: Exception, text: str) -> None:
    assert why_lost(Failure(failure)) == text

"""Leg: closing a connection with a producer registered, over TLS, with a deadline."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from rig.certs import TestCA
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from imapproxy import transports
from imapproxy.clienttls import ServerTLS
from imapproxy.config import TlsConfig
from imapproxy.transports import CLOSE_TIMEOUT, Backpressure, Leg, tls_layer


class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.calls.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.calls.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.calls.append("stop")


def test_backpressure_passes_pause_and_resume_but_never_a_stop() -> None:
    transport = Producer()
    pressure = Backpressure(transport)
    pressure.pauseProducing()
    pressure.resumeProducing()
    pressure.stopProducing()
    assert transport.calls == ["pause", "resume"]


def test_close_unregisters_the_producer_first_then_aborts_after_the_deadline() -> None:
    clock = MemoryReactorClock()
    transport = StringTransport()
    leg = Leg(transport, clock)
    leg.register(Producer())
    leg.close()
    assert transport.producer is None
    assert transport.disconnecting
    # A peer that never reads what is left cannot keep the connection open.
    clock.advance(CLOSE_TIMEOUT - 0.1)
    assert not getattr(transport, "aborted", False)
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    clock.advance(0.2)
    assert aborted == [True]


def test_a_lost_connection_cancels_the_deadline() -> None:
    clock = MemoryReactorClock()
    leg = Leg(StringTransport(), clock)
    leg.close()
    leg.lost()
    assert not clock.getDelayedCalls()


def test_close_after_lets_the_peer_close_first() -> None:
    clock = MemoryReactorClock()
    transport = StringTransport()
    leg = Leg(transport, clock)
    leg.register(Producer())
    leg.close_after(5.0)
    assert transport.producer is None and not transport.disconnecting
    clock.advance(5.0)
    assert transport.disconnecting


class Served(Protocol):
    """What the proxy's frontend is to its transport: a protocol that writes a reply."""


def tls_server(tmp_path: Path) -> tuple[Served, StringTransport, ssl.SSLObject,
                                        ssl.MemoryBIO, ssl.MemoryBIO]:
    """An implicit-TLS server protocol over an in-memory transport, handshake done."""
    ca = TestCA(tmp_path / "ca")
    pair = ca.issue("localhost")
    factory = TLSMemoryBIOFactory(ServerTLS(TlsConfig(pair.chain_path, pair.key_path),
                                            tmp_path / "x.toml"), False,
                                  Factory.forProtocol(Served))
    tls = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 993))
    below = StringTransport()
    tls.makeConnection(below)
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        tls.dataReceived(outgoing.read())
        incoming.write(below.value())
        below.clear()
    else:
        raise AssertionError("no handshake")
    tls.dataReceived(outgoing.read())  # the client's Finished (TLS 1.3)
    incoming.write(below.value())
    below.clear()
    return tls.wrappedProtocol, below, client, incoming, outgoing


def test_tls_close_with_a_producer_registered_reaches_tcp_without_the_peers_reply(
        tmp_path: Path) -> None:
    """The mbsync hang: the backend registered as producer kept TLS from closing, and
    TLS then waited for a close_notify from a client that waits for EOF."""
    served, below, client, incoming, _outgoing = tls_server(tmp_path)
    clock = MemoryReactorClock()
    assert tls_layer(served.transport) is served.transport
    leg = Leg(served.transport, clock)
    leg.register(Backpressure(Producer()))
    served.transport.write(b"* BYE Logging out\r\na1 OK LOGOUT completed\r\n")
    leg.close()
    assert below.disconnecting, "TCP must close without waiting for the client's reply"
    incoming.write(below.value())
    assert client.read(1024) == b"* BYE Logging out\r\na1 OK LOGOUT completed\r\n"
    try:
        eof = client.read(1024)
    except ssl.SSLZeroReturnError:
        eof = b""
    assert eof == b""  # our close_notify: a clean TLS end, not a truncation


def test_no_tls_layer_on_plain_transports() -> None:
    assert tls_layer(StringTransport()) is None


def test_closing_a_tls_connection_that_is_already_gone_is_harmless(tmp_path: Path) -> None:
    """The backend's end can close the client after the client's connection was lost
    (the relay still holds it): Twisted's TLS layer has dropped its OpenSSL connection
    by then, and no close_notify is due."""
    served, below, _client, _incoming, _outgoing = tls_server(tmp_path)
    tls = served.transport
    tls.connectionLost(Failure(ConnectionDone()))
    assert tls.getHandle() is None
    leg = Leg(tls, MemoryReactorClock())
    leg.close()
    assert tls_layer(tls) is tls


class _FakeTcp:
    """Just enough of twisted.internet.tcp.Server for write_now."""

    def __init__(self, tls: bool = False, queued: bytes = b"", takes: int = 1 << 20) -> None:
        self.TLS = tls
        self.dataBuffer = queued
        self.offset = 0
        self._tempDataLen = 0
        self.disconnecting = False
        self.connected = True
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        self.takes = takes

    def writeSomeData(self, data: bytes) -> int:  # noqa: N802
        self.sent.append(data[: self.takes])
        return min(len(data), self.takes)

    def write(self, data: bytes) -> None:
        self.queued.append(data)


def test_write_now_sends_at_once_when_nothing_is_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transports, "PLAIN_TCP", (_FakeTcp,))
    t = _FakeTcp()
    transports.write_now(t, b"a OK\r\n")
    assert t.sent == [b"a OK\r\n"] and t.queued == []
    partial = _FakeTcp(takes=3)
    transports.write_now(partial, b"abcdef")
    assert partial.sent == [b"abc"] and partial.queued == [b"def"]
    busy = _FakeTcp(queued=b"earlier")
    transports.write_now(busy, b"later")
    assert busy.sent == [] and busy.queued == [b"later"]  # order kept
    tls = _FakeTcp(tls=True)
    transports.write_now(tls, b"secret")
    assert tls.sent == [] and tls.queued == [b"secret"]  # never around the TLS layer


@pytest_twisted.ensureDeferred
async def test_write_now_sends_before_the_reactor_turns_on_this_twisted() -> None:
    """write_now reads tcp.Connection's queue: on the Twisted this runs on (each supported
    stack runs this test), bytes written with nothing queued leave at once."""
    from twisted.internet import defer, reactor
    from twisted.internet.protocol import Factory, Protocol

    queued: defer.Deferred[tuple[int, int]] = defer.Deferred()

    class Greeter(Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            transports.write_now(self.transport, b"* OK hello\r\n")
            t = self.transport
            queued.callback((len(t.dataBuffer) - t.offset, t._tempDataLen))

    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as sock:
            assert await queued == (0, 0), "nothing left for the reactor's next turn"
            assert sock.recv(100) == b"* OK hello\r\n"
    finally:
        await port.stopListening()

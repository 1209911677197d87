"""haproxy: the PROXY header wrapper on listeners (trust, split feeds, timeout) and the
header-first endpoint towards backends. MemoryReactorClock, no sockets."""

from __future__ import annotations

from typing import Any

from helpers import DOVECOT_GREETING, Harness
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure

from imapproxy.haproxy import MAX_V2_HEADER, HeaderFirstEndpoint, ProxyHeaderFactory
from imapproxy.proxyprotocol import V2_SIGNATURE, TrustedNetworks, encode_v2

V1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 143\r\n"


class Recorder(Protocol):
    """The wrapped protocol: what it saw, and when."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, Any]] = []
        self.data = b""
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:  # noqa: N802
        self.made.append((self.transport.getPeer(), self.transport.getHost()))
        self.transport.write(b"* OK hello\r\n")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.lost.append(reason)


class Refusals:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def proxy_header_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def connect(peer: str = "127.0.0.1", timeout: float = 10.0) -> tuple[Any, Any, Recorder,
                                                                        MemoryReactorClock,
                                                                        Refusals]:
    clock = MemoryReactorClock()
    recorder = Recorder()
    refusals = Refusals()
    factory = ProxyHeaderFactory(Factory.forProtocol(lambda: recorder),
                                 TrustedNetworks(["127.0.0.1/32", "::1/128"]), clock, timeout,
                                 refusals)
    address = (IPv6Address("TCP", peer, 1234) if ":" in peer
               else IPv4Address("TCP", peer, 1234))
    protocol = factory.buildProtocol(address)
    transport = StringTransportWithDisconnection(peerAddress=address,
                                                 hostAddress=IPv4Address("TCP", "127.0.0.1", 143))
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport, recorder, clock, refusals


def aborted(transport: Any) -> bool:
    return not transport.connected or transport.disconnecting


def test_v1_header_then_pipelined_bytes() -> None:
    protocol, transport, recorder, _, _ = connect()
    assert recorder.made == [] and transport.value() == b""  # nothing before the header
    protocol.dataReceived(V1 + b"a1 CAPABILITY\r\n")
    peer, host = recorder.made[0]
    assert (peer.host, peer.port, host.host, host.port) == ("203.0.113.9", 5555, "10.0.0.1", 143)
    assert recorder.data == b"a1 CAPABILITY\r\n"
    assert transport.value() == b"* OK hello\r\n"
    assert protocol.proxy_peer().host == "127.0.0.1"
    protocol.dataReceived(b"a2 NOOP\r\n")
    assert recorder.data.endswith(b"a2 NOOP\r\n")


def test_v2_ipv6_header_one_byte_at_a_time() -> None:
    protocol, _, recorder, _, _ = connect("::1")
    header = encode_v2(("2001:db8::7", 40000), ("2001:db8::1", 993))
    for i in range(len(header)):
        assert recorder.made == []
        protocol.dataReceived(header[i:i + 1])
    peer, host = recorder.made[0]
    assert isinstance(peer, IPv6Address)
    assert (peer.host, peer.port, host.host) == ("2001:db8::7", 40000, "2001:db8::1")


def test_v1_split_across_reads() -> None:
    protocol, _, recorder, _, _ = connect()
    protocol.dataReceived(V1[:3])
    protocol.dataReceived(V1[3:20])
    protocol.dataReceived(V1[20:] + b"x")
    assert recorder.made[0][0].host == "203.0.113.9" and recorder.data == b"x"


def test_ipv4_mapped_source_is_logged_as_ipv4() -> None:
    protocol, _, recorder, _, _ = connect()
    protocol.dataReceived(encode_v2(("2001:db8::7", 1), ("127.0.0.1", 143)))
    assert recorder.made[0][1] == IPv4Address("TCP", "127.0.0.1", 143)


def test_local_header_keeps_the_real_peer() -> None:
    protocol, _, recorder, _, _ = connect()
    protocol.dataReceived(encode_v2(None, None))  # a load balancer's health check
    assert recorder.made[0][0].host == "127.0.0.1"


def test_untrusted_peer_is_closed_before_a_byte() -> None:
    protocol, transport, recorder, clock, refusals = connect("127.0.0.2")
    assert aborted(transport) and transport.value() == b""
    protocol.dataReceived(V1)
    assert recorder.made == []
    assert refusals.reasons == ["peer not in [proxy_protocol] trusted"]
    protocol.connectionLost(Failure(Exception("gone")))
    assert recorder.lost == []  # it never had a connection
    assert clock.getDelayedCalls() == []


def test_no_header_is_refused() -> None:
    protocol, transport, recorder, _, refusals = connect()
    protocol.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert aborted(transport) and recorder.made == []
    assert refusals.reasons == ["no PROXY header"]


def test_bad_and_oversized_headers_are_refused() -> None:
    for data, reason in ((b"PROXY TCP4 nonsense\r\n", "invalid PROXY header"),
                         (b"PROXY " + b"1" * 200, "PROXY header too long"),
                         (V2_SIGNATURE + b"\x21\x11" + (MAX_V2_HEADER).to_bytes(2, "big"),
                          "PROXY header too long"),
                         (V2_SIGNATURE + b"\x51\x11\x00\x00", "invalid PROXY header")):
        protocol, transport, recorder, _, refusals = connect()
        protocol.dataReceived(data)
        assert aborted(transport) and recorder.made == [], data
        assert refusals.reasons[0].startswith(reason), (data, refusals.reasons)


def test_header_timeout() -> None:
    protocol, transport, recorder, clock, refusals = connect(timeout=10)
    protocol.dataReceived(V1[:10])
    clock.advance(9.9)
    assert not aborted(transport)
    clock.advance(0.2)
    assert aborted(transport) and refusals.reasons == ["no PROXY header in time"]


def test_connection_lost_reaches_the_wrapped_protocol_once_connected() -> None:
    protocol, _, recorder, clock, _ = connect()
    protocol.dataReceived(V1)
    assert clock.getDelayedCalls() == []  # the header timer is gone
    protocol.connectionLost(Failure(Exception("bye")))
    assert len(recorder.lost) == 1


def test_frontend_behind_the_wrapper_logs_and_forwards_the_header_address() -> None:
    h = Harness()
    factory = ProxyHeaderFactory(h.factory, TrustedNetworks(["127.0.0.1/32"]), h.reactor)
    peer = IPv4Address("TCP", "127.0.0.1", 1234)
    protocol = factory.buildProtocol(peer)
    transport = StringTransportWithDisconnection(peerAddress=peer)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    assert h.registry.sessions == set()  # the front end starts with the header
    protocol.dataReceived(V1 + b"a1 LOGIN alice secret\r\n")
    (session,) = h.registry.sessions
    assert session.transport.getPeer().host == "203.0.113.9"
    assert transport.value().startswith(b"* OK [CAPABILITY")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    assert b'"x-originating-ip" "203.0.113.9" "x-originating-port" "5555"' in \
        backend.transport.value()


class _Endpoint:
    def __init__(self) -> None:
        self.transport = StringTransportWithDisconnection()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        return defer.succeed(protocol)


def test_header_first_endpoint() -> None:
    endpoint = _Endpoint()
    recorder = Recorder()
    header = encode_v2(("192.0.2.7", 1), ("10.0.0.1", 143))
    connected = HeaderFirstEndpoint(endpoint, header).connect(
        Factory.forProtocol(lambda: recorder))
    assert connected.result is recorder
    assert endpoint.transport.value() == header + b"* OK hello\r\n"

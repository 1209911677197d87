"""proxyheader: the PROXY header wrapper on listeners (trust, split feeds, timeout), the
listener stack proxy_listener builds, and the header-first endpoint towards backends.
MemoryReactorClock, no sockets."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import DOVECOT_GREETING, Harness
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

import imapproxy
from imapproxy.config import Listener, ProxyProtocolConfig
from imapproxy.proxyheader import HeaderFirstEndpoint, ProxyHeaderFactory, proxy_listener
from imapproxy.proxyprotocol import MAX_V2_HEADER, V2_SIGNATURE, TrustedNetworks, encode_v2

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


@pytest.mark.parametrize("data, reason", [
    (b"PROXY TCP4 203.0.113.9 10.0.0.1 0143 143\r\n",
     "invalid PROXY header (v1 port not a number from 0 to 65535)"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 5555 143\r\n",
     "invalid PROXY header (v1 address not an address of its family)"),
    (V2_SIGNATURE + b"\x21\x11\x00\x13" + bytes(12) + b"\x03\x00\x04\x00\x00\x00\x00",
     "invalid PROXY header (v2 CRC32C mismatch)"),
])
def test_refusals_say_what_was_wrong(data: bytes, reason: str) -> None:
    protocol, transport, recorder, _, refusals = connect()
    protocol.dataReceived(data)
    assert aborted(transport) and recorder.made == []
    assert refusals.reasons == [reason]


def test_v1_ipv6_in_any_form_is_given_compressed_and_mapped_ones_as_ipv4() -> None:
    protocol, _, recorder, _, _ = connect()
    protocol.dataReceived(b"PROXY TCP6 2001:0DB8:0:0:0:0:0:0007 ::ffff:10.0.0.1 40000 993\r\n")
    assert recorder.made == [(IPv6Address("TCP", "2001:db8::7", 40000),
                              IPv4Address("TCP", "10.0.0.1", 993))]


def test_no_module_uses_twisteds_private_proxy_parsers() -> None:
    """Twisted's public PROXY API is proxyEndpoint only; proxyprotocol.py parses."""
    package = Path(imapproxy.__file__).parent
    for path in package.glob("*.py"):
        assert "twisted.protocols.haproxy" not in path.read_text(), path


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


def _trusting_harness(trusted: tuple[str, ...], timeout: float) -> Harness:
    h = Harness()
    config = replace(h.config, proxy_protocol=ProxyProtocolConfig(trusted, timeout))
    h.current.runtime = replace(h.runtime, config=config)
    return h


def test_implicit_tls_behind_a_proxy_header() -> None:
    from twisted.internet.ssl import CertificateOptions

    h = _trusting_harness(("10.0.0.0/8",), 3)
    listener = Listener("imap", "127.0.0.1", 993, "implicit", True)
    bound, stack = proxy_listener(MemoryReactorClock(), h.current, listener, object(),
                                  CertificateOptions())
    assert bound.tls == "none" and bound.port == 993  # TLS comes after the header
    assert isinstance(stack.wrappedFactory, TLSMemoryBIOFactory)
    assert stack.timeout == 3 and stack.trusted.allows("10.9.9.9")
    assert not stack.trusted.allows("127.0.0.1")
    assert stack.metrics is h.runtime.shared.metrics
    plain = object()
    bound, stack = proxy_listener(MemoryReactorClock(), h.current,
                                  Listener("imap", "127.0.0.1", 143, "none", True), plain, None)
    assert bound.port == 143 and stack.wrappedFactory is plain


def test_a_reload_changes_trusted_networks_and_timeout_for_the_next_connection() -> None:
    h = _trusting_harness(("10.0.0.0/8",), 3)
    _, stack = proxy_listener(h.reactor, h.current,
                              Listener("imap", "127.0.0.1", 143, "none", True), h.factory, None)
    assert stack.trusted.allows("10.1.2.3") and not stack.trusted.allows("127.0.0.1")
    # What Reloader does: one assignment of a runtime built from the new config.
    new = replace(h.runtime.config, proxy_protocol=ProxyProtocolConfig(("127.0.0.0/8",), 7))
    h.current.runtime = replace(h.runtime, config=new)
    assert stack.trusted.allows("127.0.0.1") and not stack.trusted.allows("10.1.2.3")
    assert stack.timeout == 7
    # A new connection from the newly trusted peer is read for a header, not refused.
    protocol = stack.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 143\r\n")
    assert protocol.getPeer().host == "203.0.113.9"
    assert transport.connected
    h.reactor.advance(8)  # the header came in time: no refusal at the new timeout
    assert transport.connected


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


# -- every address family the spec allows (section 2.2), and headers that are not ----------

def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


#: Section 2.2: AF_UNIX addresses are two 108-byte paths, NUL padded.
UNIX_BODY = b"/run/haproxy/client.sock".ljust(108, b"\0") + b"/run/imap.sock".ljust(108, b"\0")
IPV4_BODY = bytes([203, 0, 113, 9, 10, 0, 0, 1]) + struct.pack("!HH", 5555, 143)

#: Headers a trusted load balancer may send without IP addresses: the session must go
#: on with the connection's own addresses (section 2.2: "the receiver must ... use the
#: real connection endpoints").
NO_IP_HEADERS = {
    "v2 UNIX stream": v2(0x21, 0x31, UNIX_BODY),
    "v2 UNIX datagram": v2(0x21, 0x32, UNIX_BODY),
    "v2 UNIX unspecified transport": v2(0x21, 0x30, UNIX_BODY),
    "v2 UNIX path not UTF-8": v2(0x21, 0x31, b"\xff\xfe".ljust(216, b"\x80")),
    "v2 UNIX with a TLV": v2(0x21, 0x31, UNIX_BODY + b"\x01\x00\x04imap"),
    "v2 UNSPEC": v2(0x21, 0x00, b""),
    "v2 UNSPEC with bytes to skip": v2(0x21, 0x00, b"\x00" * 12),
    "v2 LOCAL": v2(0x20, 0x00, b""),
    "v2 LOCAL with IPv4 addresses": v2(0x20, 0x11, IPV4_BODY),
    "v2 LOCAL with UNIX addresses": v2(0x20, 0x31, UNIX_BODY),
    "v2 INET, unspecified transport": v2(0x21, 0x10, IPV4_BODY),
    "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
    "v1 UNKNOWN with addresses": b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
}


@pytest.mark.parametrize("header", NO_IP_HEADERS.values(), ids=NO_IP_HEADERS.keys())
def test_headers_without_ip_addresses_keep_the_connections_own(header: bytes) -> None:
    protocol, transport, recorder, _, refusals = connect()
    protocol.dataReceived(header + b"a1 NOOP\r\n")
    assert refusals.reasons == [] and not aborted(transport)
    (peer, host), = recorder.made
    assert (peer.host, peer.port) == ("127.0.0.1", 1234)
    assert (host.host, host.port) == ("127.0.0.1", 143)
    assert recorder.data == b"a1 NOOP\r\n"


def test_udp_addresses_are_ip_addresses_too() -> None:
    protocol, _, recorder, _, refusals = connect()
    protocol.dataReceived(v2(0x21, 0x12, IPV4_BODY))
    (peer, host), = recorder.made
    assert (peer.host, peer.port, host.host, host.port) == ("203.0.113.9", 5555, "10.0.0.1", 143)


def test_an_ipv4_header_on_an_ipv6_connection_and_the_other_way() -> None:
    protocol, _, recorder, _, _ = connect("::1")
    protocol.dataReceived(encode_v2(("203.0.113.9", 5555), ("10.0.0.1", 143)))
    assert recorder.made[0][0] == IPv4Address("TCP", "203.0.113.9", 5555)
    protocol, _, recorder, _, _ = connect("127.0.0.1")
    protocol.dataReceived(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n")
    assert recorder.made[0][0] == IPv6Address("TCP", "2001:db8::7", 40000)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 203.0.113.9 10.0.0.1 x 143\r\n",           # not a port
    b"PROXY TCP4 203.0.113.9 10.0.0.1 70000 143\r\n",       # out of range
    b"PROXY TCP4 203.0.113.9 10.0.0.1 -1 143\r\n",
    b"PROXY TCP4 mail.example.org 10.0.0.1 5555 143\r\n",   # not an address
    b"PROXY TCP4 203.0.113.9 10.0.0.\xff 5555 143\r\n",     # not even ASCII
    b"PROXY TCP6 2001:db8::zz 2001:db8::1 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
])
def test_invalid_v1_addresses_are_refused_without_a_traceback(line: bytes) -> None:
    protocol, transport, recorder, _, refusals = connect()
    protocol.dataReceived(line)
    assert aborted(transport) and recorder.made == []
    assert refusals.reasons[0].startswith("invalid PROXY header"), refusals.reasons


def test_frontend_behind_the_wrapper_works_with_a_unix_header() -> None:
    """The session goes on with the load balancer's address: it is logged, limited and
    forwarded to the backend (it read getPeer().host and failed on a UNIXAddress)."""
    h = Harness()
    factory = ProxyHeaderFactory(h.factory, TrustedNetworks(["127.0.0.1/32"]), h.reactor)
    peer = IPv4Address("TCP", "127.0.0.1", 1234)
    protocol = factory.buildProtocol(peer)
    transport = StringTransportWithDisconnection(peerAddress=peer,
                                                 hostAddress=IPv4Address("TCP", "127.0.0.1", 143))
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(NO_IP_HEADERS["v2 UNIX stream"] + b"a1 LOGIN alice secret\r\n")
    (session,) = h.registry.sessions
    assert session.transport.getPeer().host == "127.0.0.1"
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    assert b'"x-originating-ip" "127.0.0.1" "x-originating-port" "1234"' in \
        backend.transport.value()
    backend.transport.clear()
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert b"a1 OK" in transport.value()


@settings(max_examples=500, deadline=None)
@given(command=st.integers(0, 255), family=st.integers(0, 255),
       body=st.binary(max_size=300), split=st.integers(1, 40))
def test_any_v2_header_is_served_or_refused(command: int, family: int, body: bytes,
                                            split: int) -> None:
    """Whatever a trusted peer sends after the signature, the outcome is a session with IP
    addresses (the header's or the connection's) or a refusal; never an exception."""
    protocol, transport, recorder, _, refusals = connect()
    data = v2(command, family, body) + b"a1 NOOP\r\n"
    for i in range(0, len(data), split):
        protocol.dataReceived(data[i:i + split])
    if recorder.made:
        (peer, host), = recorder.made
        assert isinstance(peer, IPv4Address | IPv6Address)
        assert isinstance(host, IPv4Address | IPv6Address)
        assert refusals.reasons == [] and recorder.data == b"a1 NOOP\r\n"
    else:
        assert aborted(transport) and len(refusals.reasons) == 1


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"203.0.113.9", b"::1",
                                       b"2001:db8::7", b"0", b"65535", b"65536", b"x", b"",
                                       b"\xff", b"1.2.3", b"-1"]), max_size=6))
def test_any_v1_header_is_served_or_refused(words: list[bytes]) -> None:
    protocol, transport, recorder, _, refusals = connect()
    protocol.dataReceived(b"PROXY " + b" ".join(words) + b"\r\n")
    if recorder.made:
        (peer, host), = recorder.made
        assert isinstance(peer, IPv4Address | IPv6Address)
        assert isinstance(host, IPv4Address | IPv6Address)
    else:
        assert aborted(transport) and len(refusals.reasons) == 1

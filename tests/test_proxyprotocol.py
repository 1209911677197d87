"""proxyprotocol: sniffing the first bytes, trusted networks, the v2 header we send."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from imapproxy.proxyprotocol import (
    V2_SIGNATURE,
    Kind,
    TrustedNetworks,
    encode_v2,
    parse_ip,
    sniff,
)

V1_HEADER = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 143\r\n"


@pytest.mark.parametrize("data, kind", [
    (b"", Kind.NEED_DATA),
    (b"PRO", Kind.NEED_DATA),
    (b"PROXY ", Kind.V1),
    (V1_HEADER, Kind.V1),
    (V2_SIGNATURE[:5], Kind.NEED_DATA),
    (V2_SIGNATURE, Kind.V2),
    (b"\r\n\r\nX", Kind.NOT_A_HEADER),
    (b"a1 LOGIN alice secret\r\n", Kind.NOT_A_HEADER),
    (b"\x16\x03\x01", Kind.NOT_A_HEADER),  # a TLS ClientHello
    (b"PROXY\r\n", Kind.NOT_A_HEADER),
])
def test_sniff(data: bytes, kind: Kind) -> None:
    assert sniff(data) is kind


def test_sniff_byte_by_byte_never_gives_up_on_a_real_header() -> None:
    for header, kind in ((V1_HEADER, Kind.V1), (encode_v2(("192.0.2.1", 1), None), Kind.V2)):
        for end in range(len(header)):
            assert sniff(header[:end]) in (Kind.NEED_DATA, kind)


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1", True),
    ("127.0.0.2", False),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # a dual-stack listener reports IPv4 peers like this
    ("10.1.2.3", True),
    ("10.2.0.1", False),
    ("fe80::1%eth0", False),
    ("/run/haproxy.sock", False),
    ("", False),
])
def test_trusted_networks(host: str, allowed: bool) -> None:
    trusted = TrustedNetworks(["127.0.0.1/32", "::1/128", "10.1.0.0/16"])
    assert trusted.allows(host) is allowed


def test_parse_ip_unwraps_mapped_and_zones() -> None:
    assert str(parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(parse_ip("fe80::1%eth0")) == "fe80::1"
    assert parse_ip("mail.example.org") is None


def test_encode_v2_ipv4_round_trips_through_twisted() -> None:
    header = encode_v2(("203.0.113.9", 5555), ("127.0.0.1", 143))
    info = V2Parser.parse(header)
    assert info.source == IPv4Address("TCP", "203.0.113.9", 5555)
    assert info.destination == IPv4Address("TCP", "127.0.0.1", 143)
    assert len(header) == 16 + 12


def test_encode_v2_ipv6() -> None:
    info = V2Parser.parse(encode_v2(("2001:db8::7", 40000), ("2001:db8::1", 993)))
    assert isinstance(info.source, IPv6Address)
    assert parse_ip(info.source.host) == parse_ip("2001:db8::7") and info.source.port == 40000
    assert parse_ip(info.destination.host) == parse_ip("2001:db8::1")


def test_encode_v2_mixed_families_go_ipv6() -> None:
    info = V2Parser.parse(encode_v2(("2001:db8::7", 1), ("127.0.0.1", 143)))
    assert parse_ip(info.source.host) == parse_ip("2001:db8::7")
    assert str(parse_ip(info.destination.host)) == "127.0.0.1"  # sent IPv4-mapped


def test_encode_v2_without_destination_and_local() -> None:
    info = V2Parser.parse(encode_v2(("192.0.2.1", 7), None))
    assert info.source.host == "192.0.2.1" and info.destination.host == "0.0.0.0"
    local = encode_v2(None, ("127.0.0.1", 143))
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert V2Parser.parse(local).source is None
    assert V2Parser.parse(encode_v2(("not-an-ip", 1), None)).source is None


def test_v1_header_is_what_twisted_parses() -> None:
    info = V1Parser.parse(V1_HEADER[:-2])
    assert info.source.host == "203.0.113.9"

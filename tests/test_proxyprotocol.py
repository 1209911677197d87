"""proxyprotocol: sniffing the first bytes, trusted networks, the v2 header we send, and
reading inbound v1/v2 headers (HeaderReader).

Every header transcript is fed whole, cut in two at every byte, and one byte at a time:
the outcome (the header and the bytes after it, or the same refusal) never depends on
how TCP splits the stream. Hypothesis checks the same on any bytes, and that what
encode_v2 sends reads back as the addresses it was given. Section numbers are those of
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.proxyprotocol import (
    MAX_V2_HEADER,
    NEED_DATA,
    TLV_CRC32C,
    V1_MAX,
    V2_SIGNATURE,
    Command,
    Family,
    HeaderReader,
    HeaderTooLong,
    InvalidHeader,
    Kind,
    NotAHeader,
    ProxyHeader,
    Transport,
    TrustedNetworks,
    crc32c,
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


# -- reading headers -------------------------------------------------------------------------

def read(data: bytes, max_v2: int = MAX_V2_HEADER) -> tuple[ProxyHeader, bytes]:
    """One header from ``data`` fed whole: the header and the bytes after it."""
    result = HeaderReader(max_v2).feed(data)
    assert result is not NEED_DATA, data
    return result


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def with_crc32c(header: bytes) -> bytes:
    """``header`` (a v2 one) with a CRC32C TLV at its end, as a sender computes it
    (section 2.2.3: over the whole header, the checksum field zeroed)."""
    body = header[16:] + tlv(TLV_CRC32C, bytes(4))
    zeroed = header[:14] + struct.pack("!H", len(body)) + body
    return zeroed[:-4] + struct.pack("!I", crc32c(zeroed))


def ep(host: str, port: int) -> tuple[IPv4Address | IPv6Address, int]:
    return ip_address(host), port


IPV4_BODY = bytes([203, 0, 113, 9, 10, 0, 0, 1]) + struct.pack("!HH", 5555, 143)
IPV6_BODY = (ip_address("2001:db8::7").packed + ip_address("2001:db8::1").packed
             + struct.pack("!HH", 40000, 993))
#: Section 2.2: AF_UNIX addresses are two 108-byte paths, NUL padded (or not text at all).
UNIX_SOURCE = b"/run/haproxy/client.sock".ljust(108, b"\0")
UNIX_DESTINATION = b"\0abstract\xff".ljust(108, b"\x80")
UNIX_BODY = UNIX_SOURCE + UNIX_DESTINATION
V4 = (ep("203.0.113.9", 5555), ep("10.0.0.1", 143))
V6 = (ep("2001:db8::7", 40000), ep("2001:db8::1", 993))
PROXY, LOCAL = Command.PROXY, Command.LOCAL
INET, INET6, UNIX, UNSPEC = Family.INET, Family.INET6, Family.UNIX, Family.UNSPEC
STREAM, DGRAM, ANY = Transport.STREAM, Transport.DGRAM, Transport.UNSPEC
UNKNOWN = ProxyHeader(1, PROXY, UNSPEC, ANY)
CHECKED = with_crc32c(v2(0x21, 0x21, IPV6_BODY + tlv(0x02, b"imap.example.org")))

#: Headers and what they read as; ``addresses`` follows: the IP addresses to use or None.
VALID = {
    "v1 TCP4": (V1_HEADER, ProxyHeader(1, PROXY, INET, STREAM, ep("203.0.113.9", 5555),
                                       ep("127.0.0.1", 143))),
    "v1 TCP6": (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n",
                ProxyHeader(1, PROXY, INET6, STREAM, *V6)),
    "v1 TCP6 uncompressed, upper case": (
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0007 2001:db8::1 40000 993\r\n",
        ProxyHeader(1, PROXY, INET6, STREAM, *V6)),
    "v1 TCP6 IPv4-mapped": (b"PROXY TCP6 ::ffff:203.0.113.9 ::1 1 2\r\n",
                            ProxyHeader(1, PROXY, INET6, STREAM, ep("::ffff:203.0.113.9", 1),
                                        ep("::1", 2))),
    "v1 ports 0 and 65535": (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
                             ProxyHeader(1, PROXY, INET, STREAM, ep("0.0.0.0", 0),
                                         ep("255.255.255.255", 65535))),
    "v1 longest TCP6 (104 bytes)": (
        b"PROXY TCP6 " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
        ProxyHeader(1, PROXY, INET6, STREAM, ep("ffff:" * 7 + "ffff", 65535),
                    ep("ffff:" * 7 + "ffff", 65535))),
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", UNKNOWN),
    "v1 UNKNOWN with addresses": (
        b"PROXY UNKNOWN 2001:db8::7 2001:db8::1 40000 993\r\n", UNKNOWN),
    "v1 UNKNOWN, worst case (107 bytes)": (
        b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n", UNKNOWN),
    "v1 UNKNOWN, anything up to the CRLF": (b"PROXY UNKNOWN  \xff\x00 x\r\r\n", UNKNOWN),
    "v2 TCP over IPv4": (v2(0x21, 0x11, IPV4_BODY), ProxyHeader(2, PROXY, INET, STREAM, *V4)),
    "v2 UDP over IPv4": (v2(0x21, 0x12, IPV4_BODY), ProxyHeader(2, PROXY, INET, DGRAM, *V4)),
    "v2 TCP over IPv6": (v2(0x21, 0x21, IPV6_BODY), ProxyHeader(2, PROXY, INET6, STREAM, *V6)),
    "v2 UDP over IPv6": (v2(0x21, 0x22, IPV6_BODY), ProxyHeader(2, PROXY, INET6, DGRAM, *V6)),
    "v2 IPv4 with TLVs": (
        v2(0x21, 0x11, IPV4_BODY + tlv(0x01, b"imap") + tlv(0x04, b"") + tlv(0xE0, b"\xff")),
        ProxyHeader(2, PROXY, INET, STREAM, *V4,
                    tlvs=((0x01, b"imap"), (0x04, b""), (0xE0, b"\xff")))),
    "v2 IPv6 with a CRC32C": (
        CHECKED, ProxyHeader(2, PROXY, INET6, STREAM, *V6,
                             tlvs=((0x02, b"imap.example.org"), (TLV_CRC32C, CHECKED[-4:])))),
    "v2 from HAProxy 2.6, send-proxy-v2 proxy-v2-options crc32c": (
        bytes.fromhex("0d0a0d0a000d0a515549540a211100137f0000027f0000019e4fe943030004d8395bdc"),
        ProxyHeader(2, PROXY, INET, STREAM, ep("127.0.0.2", 40527), ep("127.0.0.1", 59715),
                    ((TLV_CRC32C, bytes.fromhex("d8395bdc")),))),
    "v2 UNIX stream": (v2(0x21, 0x31, UNIX_BODY),
                       ProxyHeader(2, PROXY, UNIX, STREAM, UNIX_SOURCE, UNIX_DESTINATION)),
    "v2 UNIX datagram with a TLV": (
        v2(0x21, 0x32, UNIX_BODY + tlv(0x01, b"imap")),
        ProxyHeader(2, PROXY, UNIX, DGRAM, UNIX_SOURCE, UNIX_DESTINATION,
                    ((0x01, b"imap"),))),
    "v2 UNIX, unspecified transport": (v2(0x21, 0x30, UNIX_BODY),
                                       ProxyHeader(2, PROXY, UNIX, ANY)),
    "v2 INET, unspecified transport": (v2(0x21, 0x10, IPV4_BODY),
                                       ProxyHeader(2, PROXY, INET, ANY)),
    "v2 INET6, unspecified transport, short": (v2(0x21, 0x20, b""),
                                               ProxyHeader(2, PROXY, INET6, ANY)),
    "v2 UNSPEC": (v2(0x21, 0x00, b""), ProxyHeader(2, PROXY, UNSPEC, ANY)),
    "v2 UNSPEC with bytes to skip": (v2(0x21, 0x00, b"\xff" * 13),
                                     ProxyHeader(2, PROXY, UNSPEC, ANY)),
    "v2 UNSPEC family, stream": (v2(0x21, 0x01, b"\x00"), ProxyHeader(2, PROXY, UNSPEC, STREAM)),
    "v2 LOCAL": (v2(0x20, 0x00, b""), ProxyHeader(2, LOCAL, UNSPEC, ANY)),
    "v2 LOCAL with IPv4 addresses": (v2(0x20, 0x11, IPV4_BODY), ProxyHeader(2, LOCAL, UNSPEC,
                                                                            ANY)),
    "v2 LOCAL, family ignored": (v2(0x20, 0xFF, b"\x01"), ProxyHeader(2, LOCAL, UNSPEC, ANY)),
    "v2 longest": (v2(0x21, 0x11, IPV4_BODY + tlv(0x04, bytes(MAX_V2_HEADER - 16 - 12 - 3))),
                   ProxyHeader(2, PROXY, INET, STREAM, *V4,
                               tlvs=((0x04, bytes(MAX_V2_HEADER - 31)),))),
}

#: What ``addresses`` gives for each: the header's IP addresses, or None (the connection's).
ADDRESSES = {
    "v1 TCP4": (ep("203.0.113.9", 5555), ep("127.0.0.1", 143)),
    "v1 TCP6": V6, "v1 TCP6 uncompressed, upper case": V6,
    "v1 TCP6 IPv4-mapped": (ep("203.0.113.9", 1), ep("::1", 2)),
    "v1 ports 0 and 65535": (ep("0.0.0.0", 0), ep("255.255.255.255", 65535)),
    "v1 longest TCP6 (104 bytes)": (ep("ffff:" * 7 + "ffff", 65535),) * 2,
    "v2 TCP over IPv4": V4, "v2 UDP over IPv4": V4, "v2 IPv4 with TLVs": V4,
    "v2 longest": V4,
    "v2 TCP over IPv6": V6, "v2 UDP over IPv6": V6, "v2 IPv6 with a CRC32C": V6,
    "v2 from HAProxy 2.6, send-proxy-v2 proxy-v2-options crc32c": (ep("127.0.0.2", 40527),
                                                                  ep("127.0.0.1", 59715)),
}


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` whole, cut in two at every byte, and one byte at a time."""
    return ([[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]
            + [[data[i:i + 1] for i in range(len(data))]])


def feed_all(pieces: list[bytes], max_v2: int = MAX_V2_HEADER) -> object:
    """What a reader makes of ``pieces``: (header, remaining), NEED_DATA, or the refusal
    (its class and reason); after a result, later pieces count as remaining bytes."""
    reader = HeaderReader(max_v2)
    for i, piece in enumerate(pieces):
        try:
            result = reader.feed(piece)
        except InvalidHeader as e:
            return type(e), e.reason
        if result is not NEED_DATA:
            header, remaining = result
            return header, remaining + b"".join(pieces[i + 1:])
        assert reader.buffered < max(V1_MAX, max_v2)
    return NEED_DATA


@pytest.mark.parametrize("name", VALID)
def test_valid_headers_in_any_pieces(name: str) -> None:
    data, expected = VALID[name]
    assert read(data + b"a1 NOOP\r\n") == (expected, b"a1 NOOP\r\n")
    assert expected.addresses == ADDRESSES.get(name)
    for pieces in splits(data + b"a1"):
        assert feed_all(pieces) == (expected, b"a1"), pieces
    # Anything shorter is not a header yet.
    for end in range(len(data)):
        assert feed_all([data[:end]]) is NEED_DATA


def test_header_lengths_the_spec_names() -> None:
    assert len(VALID["v1 longest TCP6 (104 bytes)"][0]) == 104
    assert len(VALID["v1 UNKNOWN, worst case (107 bytes)"][0]) == V1_MAX == 107
    assert len(VALID["v2 longest"][0]) == MAX_V2_HEADER


#: Bytes that are no header, and the refusal they get (class, reason).
NOT_A_HEADER = (NotAHeader, "no PROXY header")
TOO_LONG = (HeaderTooLong, "PROXY header too long")
V1_ADDRESS = (InvalidHeader, "v1 address not an address of its family")
V1_PORT = (InvalidHeader, "v1 port not a number from 0 to 65535")
V1_FIELDS = (InvalidHeader, "v1 line not five fields")
V1_PROTOCOL = (InvalidHeader, "v1 protocol not TCP4, TCP6 or UNKNOWN")
V1_CRLF = (InvalidHeader, "v1 line not ended by CRLF")
V2_UNASSIGNED = (InvalidHeader, "v2 family or transport unassigned")
V2_SHORT = (InvalidHeader, "v2 address block too short")
V2_TLV = (InvalidHeader, "v2 TLV truncated")
INVALID = {
    "IMAP": (b"a1 LOGIN alice secret\r\n", NOT_A_HEADER),
    "TLS ClientHello": (b"\x16\x03\x01\x02\x00", NOT_A_HEADER),
    "PROXY without a space": (b"PROXY\r\n", NOT_A_HEADER),
    "v2 signature, one byte off": (V2_SIGNATURE[:-1] + b"\x0b\x21\x11\x00\x00", NOT_A_HEADER),
    "v1 without CRLF in 107 bytes": (b"PROXY " + b"1" * 200, TOO_LONG),
    "v1 worst case plus one": (b"PROXY UNKNOWN  " + b"f" * 91 + b"\r\n", TOO_LONG),
    "v1 LF alone": (b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 143\n", V1_CRLF),
    "v1 UNKNOWN, LF alone": (b"PROXY UNKNOWN\n\r\n", V1_CRLF),
    "v1 empty": (b"PROXY \r\n", V1_PROTOCOL),
    "v1 lower case": (b"PROXY tcp4 203.0.113.9 10.0.0.1 5555 143\r\n", V1_PROTOCOL),
    "v1 TCP5": (b"PROXY TCP5 203.0.113.9 10.0.0.1 5555 143\r\n", V1_PROTOCOL),
    "v1 UNKNOWNX": (b"PROXY UNKNOWNX\r\n", V1_PROTOCOL),
    "v1 two spaces": (b"PROXY  TCP4 203.0.113.9 10.0.0.1 5555 143\r\n", V1_PROTOCOL),
    "v1 nonsense": (b"PROXY TCP4 nonsense\r\n", V1_FIELDS),
    "v1 no ports": (b"PROXY TCP4 203.0.113.9 10.0.0.1\r\n", V1_FIELDS),
    "v1 trailing space": (b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 143 \r\n", V1_FIELDS),
    "v1 two spaces inside": (b"PROXY TCP4 203.0.113.9  10.0.0.1 5555 143\r\n", V1_FIELDS),
    "v1 tab": (b"PROXY TCP4 203.0.113.9\t10.0.0.1 5555 143\r\n", V1_FIELDS),
    "v1 port not a number": (b"PROXY TCP4 203.0.113.9 10.0.0.1 x 143\r\n", V1_PORT),
    "v1 port out of range": (b"PROXY TCP4 203.0.113.9 10.0.0.1 70000 143\r\n", V1_PORT),
    "v1 port 65536": (b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 65536\r\n", V1_PORT),
    "v1 port negative": (b"PROXY TCP4 203.0.113.9 10.0.0.1 -1 143\r\n", V1_PORT),
    "v1 port with a sign": (b"PROXY TCP4 203.0.113.9 10.0.0.1 +1 143\r\n", V1_PORT),
    "v1 port with a leading zero": (b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 0143\r\n", V1_PORT),
    "v1 port with an underscore": (b"PROXY TCP4 203.0.113.9 10.0.0.1 5_555 143\r\n", V1_PORT),
    "v1 port, Unicode digits": ("PROXY TCP4 203.0.113.9 10.0.0.1 ٥ 143\r\n".encode(), V1_PORT),
    "v1 port empty": (b"PROXY TCP4 203.0.113.9 10.0.0.1  143\r\n", V1_PORT),
    "v1 host name": (b"PROXY TCP4 mail.example.org 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 not ASCII": (b"PROXY TCP4 203.0.113.9 10.0.0.\xff 5555 143\r\n", V1_ADDRESS),
    "v1 IPv4 leading zero": (b"PROXY TCP4 203.0.113.09 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 IPv4 octet over 255": (b"PROXY TCP4 203.0.113.256 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 IPv4 three octets": (b"PROXY TCP4 203.0.113 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 IPv6 in TCP4": (b"PROXY TCP4 2001:db8::7 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 IPv4 in TCP6": (b"PROXY TCP6 2001:db8::7 10.0.0.1 5555 143\r\n", V1_ADDRESS),
    "v1 IPv6 not hex": (b"PROXY TCP6 2001:db8::zz 2001:db8::1 1 2\r\n", V1_ADDRESS),
    "v1 IPv6 two ::": (b"PROXY TCP6 2001::db8::7 2001:db8::1 1 2\r\n", V1_ADDRESS),
    "v1 IPv6 nine groups": (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", V1_ADDRESS),
    "v1 IPv6 zone": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1_ADDRESS),
    "v1 IPv6 brackets": (b"PROXY TCP6 [::1] ::1 1 2\r\n", V1_ADDRESS),
    "v2 version 1": (v2(0x11, 0x11, IPV4_BODY), (InvalidHeader, "v2 version not 2")),
    "v2 version 3": (v2(0x31, 0x11, IPV4_BODY), (InvalidHeader, "v2 version not 2")),
    "v2 command 2": (v2(0x22, 0x11, IPV4_BODY),
                     (InvalidHeader, "v2 command not LOCAL or PROXY")),
    "v2 command 5": (v2(0x25, 0x11, IPV4_BODY),
                     (InvalidHeader, "v2 command not LOCAL or PROXY")),
    "v2 family 4": (v2(0x21, 0x41, IPV4_BODY), V2_UNASSIGNED),
    "v2 transport 3": (v2(0x21, 0x13, IPV4_BODY), V2_UNASSIGNED),
    "v2 UNSPEC family, transport 15": (v2(0x21, 0x0F, b""), V2_UNASSIGNED),
    "v2 too long": (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_HEADER - 15),
                    TOO_LONG),
    "v2 longest length": (V2_SIGNATURE + b"\x20\x00\xff\xff", TOO_LONG),
    "v2 IPv4 block short": (v2(0x21, 0x11, IPV4_BODY[:-1]), V2_SHORT),
    "v2 IPv4 block empty": (v2(0x21, 0x12, b""), V2_SHORT),
    "v2 IPv6 block short": (v2(0x21, 0x21, IPV6_BODY[:-1]), V2_SHORT),
    "v2 IPv6 block IPv4 sized": (v2(0x21, 0x21, IPV4_BODY), V2_SHORT),
    "v2 UNIX block short": (v2(0x21, 0x31, UNIX_BODY[:-1]), V2_SHORT),
    "v2 TLV of one byte": (v2(0x21, 0x11, IPV4_BODY + b"\x01"), V2_TLV),
    "v2 TLV of two bytes": (v2(0x21, 0x11, IPV4_BODY + b"\x01\x00"), V2_TLV),
    "v2 TLV longer than the header": (v2(0x21, 0x11, IPV4_BODY + b"\x01\x00\x05imap"),
                                      V2_TLV),
    "v2 TLV after a good one": (v2(0x21, 0x31, UNIX_BODY + tlv(1, b"imap") + b"\x04\x01"),
                                V2_TLV),
    "v2 CRC32C wrong": (v2(0x21, 0x11, IPV4_BODY + tlv(TLV_CRC32C, b"\0\0\0\1")),
                        (InvalidHeader, "v2 CRC32C mismatch")),
    "v2 CRC32C, an address changed": (  # 203.0.113.9 -> 204.0.113.9
        with_crc32c(v2(0x21, 0x11, IPV4_BODY))[:16] + b"\xcc"
        + with_crc32c(v2(0x21, 0x11, IPV4_BODY))[17:], (InvalidHeader, "v2 CRC32C mismatch")),
    "v2 CRC32C, byte order swapped": (
        with_crc32c(v2(0x21, 0x11, IPV4_BODY))[:-4]
        + with_crc32c(v2(0x21, 0x11, IPV4_BODY))[:-5:-1],
        (InvalidHeader, "v2 CRC32C mismatch")),
    "v2 CRC32C TLV of 3 bytes": (v2(0x21, 0x11, IPV4_BODY + tlv(TLV_CRC32C, b"\0\0\0")),
                                 (InvalidHeader, "v2 CRC32C TLV not 4 bytes")),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_headers_in_any_pieces(name: str) -> None:
    data, refusal = INVALID[name]
    for pieces in splits(data + b"a1 NOOP\r\n"):
        assert feed_all(pieces) == refusal, pieces


def test_reason_carries_no_input_byte() -> None:
    for data, _ in INVALID.values():
        try:
            read(data)
        except InvalidHeader as e:
            assert str(e) == e.reason and e.reason.isascii()
            assert b"203" not in e.reason.encode() and "\\x" not in e.reason


@pytest.mark.parametrize("data, needed", [
    # Refused as soon as the bytes allow (section 2.1: "as soon as possible"): a v2
    # length or command once the 16 fixed bytes are in, a v1 line at its LF or byte 107.
    (V2_SIGNATURE + b"\x21\x11\xff\xff", 16),
    (V2_SIGNATURE + b"\x51\x11\x00\x0c", 16),
    (V2_SIGNATURE + b"\x21\x51\x00\x0c", 16),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 1\n", 31),
    (b"PROXY " + b"x" * 200, V1_MAX),
    (b"a1 LOGIN", 1),
    (V2_SIGNATURE[:4] + b"X", 5),
])
def test_refused_as_soon_as_the_bytes_allow(data: bytes, needed: int) -> None:
    assert feed_all([data[:needed - 1]]) is NEED_DATA
    assert isinstance(feed_all([data[:needed]]), tuple)


def test_reader_holds_at_most_one_header() -> None:
    reader = HeaderReader()
    assert reader.feed(b"PROXY ") is NEED_DATA
    for _ in range(V1_MAX - 7):
        assert reader.feed(b"x") is NEED_DATA
    assert reader.buffered == V1_MAX - 1
    with pytest.raises(HeaderTooLong):
        reader.feed(b"x")
    small = HeaderReader(max_v2=16 + 12)
    assert small.feed(v2(0x21, 0x11, IPV4_BODY)[:-1]) is NEED_DATA
    assert small.buffered == 27
    with pytest.raises(HeaderTooLong):
        HeaderReader(max_v2=16 + 12).feed(v2(0x21, 0x11, IPV4_BODY + b"\x04\x00\x00"))


def test_reader_reads_one_header_only() -> None:
    reader = HeaderReader()
    header, remaining = reader.feed(V1_HEADER + V1_HEADER)
    assert remaining == V1_HEADER  # the client's bytes now, not another header
    with pytest.raises(RuntimeError):
        reader.feed(b"x")
    refused = HeaderReader()
    with pytest.raises(NotAHeader):
        refused.feed(b"x")
    with pytest.raises(RuntimeError):
        refused.feed(V1_HEADER)
    with pytest.raises(ValueError):
        HeaderReader(max_v2=15)


@pytest.mark.parametrize("data, value", [
    # RFC 3720 appendix B.4, and the usual check value.
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
])
def test_crc32c(data: bytes, value: int) -> None:
    assert crc32c(data) == value


# -- the v2 header we send, read back --------------------------------------------------------

def test_encode_v2_ipv4_round_trips() -> None:
    header = encode_v2(("203.0.113.9", 5555), ("127.0.0.1", 143))
    parsed, _ = read(header)
    assert parsed == ProxyHeader(2, PROXY, INET, STREAM, ep("203.0.113.9", 5555),
                                 ep("127.0.0.1", 143))
    assert len(header) == 16 + 12


def test_encode_v2_ipv6() -> None:
    parsed, _ = read(encode_v2(("2001:db8::7", 40000), ("2001:db8::1", 993)))
    assert parsed.family is INET6 and parsed.addresses == V6


def test_encode_v2_mixed_families_go_ipv6() -> None:
    parsed, _ = read(encode_v2(("2001:db8::7", 1), ("127.0.0.1", 143)))
    assert parsed.destination == ep("::ffff:127.0.0.1", 143)  # sent IPv4-mapped
    assert parsed.addresses == (ep("2001:db8::7", 1), ep("127.0.0.1", 143))


def test_encode_v2_without_destination_and_local() -> None:
    parsed, _ = read(encode_v2(("192.0.2.1", 7), None))
    assert parsed.addresses == (ep("192.0.2.1", 7), ep("0.0.0.0", 0))
    local = encode_v2(None, ("127.0.0.1", 143))
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert read(local) == (ProxyHeader(2, LOCAL, UNSPEC, ANY), b"")
    assert read(encode_v2(("not-an-ip", 1), None))[0].addresses is None


def test_v1_header_reads() -> None:
    parsed, remaining = read(V1_HEADER)
    assert parsed.addresses == (ep("203.0.113.9", 5555), ep("127.0.0.1", 143))
    assert remaining == b""


_ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(source=st.tuples(_ips, _ports), destination=st.tuples(_ips, _ports))
def test_encode_v2_reads_back_as_what_was_sent(source: tuple[str, int],
                                               destination: tuple[str, int]) -> None:
    parsed, remaining = read(encode_v2(source, destination) + b"x")
    assert remaining == b"x"
    assert parsed.addresses == ((parse_ip(source[0]), source[1]),
                                (parse_ip(destination[0]), destination[1]))


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), data=st.data())
def test_v1_lines_read_back(family: int, data: st.DataObject) -> None:
    source = data.draw(st.ip_addresses(v=family))
    destination = data.draw(st.ip_addresses(v=family))
    ports = data.draw(_ports), data.draw(_ports)
    # Any textual form ipaddress gives: compressed or exploded.
    text = [data.draw(st.sampled_from([a.compressed, a.exploded])) for a in (source,
                                                                              destination)]
    line = f"PROXY TCP{family} {text[0]} {text[1]} {ports[0]} {ports[1]}\r\n".encode()
    parsed, _ = read(line)
    assert parsed.source == (source, ports[0]) and parsed.destination == (destination, ports[1])


#: Bytes near headers: signatures, fields and their neighbours, and random ones.
_header_bytes = st.lists(
    st.sampled_from([V2_SIGNATURE, b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\n",
                     b"\r", b" ", b"203.0.113.9 ", b"::1 ", b"65535", b"0", b"\x21", b"\x20",
                     b"\x11", b"\x21\x11\x00\x0c", b"\x20\x00\x00\x00", b"\x21\x31\x00\xd8",
                     b"\x03\x00\x04", b"\x01\x00\x04imap", bytes(12)])
    | st.binary(max_size=24), max_size=30).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(data=_header_bytes | st.binary(max_size=300), cuts=st.lists(st.integers(0, 300)))
def test_any_bytes_give_a_header_or_a_refusal_however_cut(data: bytes,
                                                          cuts: list[int]) -> None:
    whole = feed_all([data])
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed_all(pieces) == whole
    if isinstance(whole, tuple) and isinstance(whole[0], ProxyHeader):
        header, remaining = whole
        assert data.endswith(remaining)
        consumed = len(data) - len(remaining)
        assert consumed <= (V1_MAX if header.version == 1 else MAX_V2_HEADER)
        addresses = header.addresses
        if addresses is not None:
            assert header.command is PROXY and header.family in (INET, INET6)
            assert all(0 <= port <= 65535 for _, port in addresses)
    elif whole is not NEED_DATA:
        assert whole[0] in (NotAHeader, HeaderTooLong, InvalidHeader)

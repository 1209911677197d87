# -*- test-case-name: tests.test_proxyprotocol -*-
"""The PROXY protocol (HAProxy, v1 text and v2 binary): everything but the sockets.

Who may send a header (``TrustedNetworks``), what the first bytes of a connection
are (``sniff``), reading an inbound header in pieces of any size (``HeaderReader``,
giving a ``ProxyHeader`` or raising ``InvalidHeader``), and the v2 header the proxy
itself sends to a backend with ``forward_client = "proxy-v2"`` (``encode_v2``).
The Twisted side (listeners, the header-first endpoint) lives in ``proxyheader.py``.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (sections cited below).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final, Literal

#: Section 2.2: the 12-byte v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Section 2.1: a v1 header starts with these six bytes.
V1_PREFIX = b"PROXY "
#: Section 2.1: the longest v1 line (TCP6 with both addresses at full length) is 107 bytes.
V1_MAX = 107
#: Section 2.2: version 2 (high nibble) with command LOCAL (0) or PROXY (1).
V2_LOCAL = 0x20
V2_PROXY = 0x21
#: Section 2.2: address family and transport (high and low nibble); STREAM = 1.
AF_UNSPEC = 0x00
#: Section 2.2: the address families (high nibble of the family byte) that carry no IP
#: address.
FAMILY_UNSPEC = 0x0
FAMILY_UNIX = 0x3
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21
#: Section 2.2: signature, version and command, family and transport, length.
V2_FIXED = 16
#: Section 2.2: a v2 header carries at most 16 + 65535 bytes; ours need far less: the
#: addresses take at most 216 bytes, and TLVs (ALPN, SSL info, ...) stay well under a
#: few hundred in practice.
MAX_V2_HEADER = V2_FIXED + 4096
#: Section 2.2.3: PP2_TYPE_CRC32C, a checksum of the whole header.
TLV_CRC32C = 0x03

Address = tuple[str, int]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: An IP address and a port, as a header carries them.
IPEndpoint = tuple[IPAddress, int]


class Kind(Enum):
    """What the first bytes of a connection are."""

    V1 = "v1"
    V2 = "v2"
    #: not a PROXY header at all: the peer is speaking something else
    NOT_A_HEADER = "not a header"
    #: too few bytes yet to tell
    NEED_DATA = "need data"


def sniff(data: bytes) -> Kind:
    """Tell a v1 or v2 header from anything else, as soon as the bytes allow."""
    for prefix, kind in ((V2_SIGNATURE, Kind.V2), (V1_PREFIX, Kind.V1)):
        common = min(len(data), len(prefix))
        if data[:common] == prefix[:common]:
            if common == len(prefix):
                return kind
            return Kind.NEED_DATA
    return Kind.NOT_A_HEADER


#: What ``HeaderReader.feed`` returns until the header is complete.
NEED_DATA: Final = Kind.NEED_DATA


def parse_ip(host: str) -> IPAddress | None:
    """An address from a transport's host: IPv4-mapped IPv6 unwrapped, zone dropped."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return unmapped(address)


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedNetworks:
    """The [proxy_protocol] trusted list: only these peers may speak for a client."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def allows(self, host: str) -> bool:
        """True if a connection from ``host`` may start with a PROXY header."""
        address = parse_ip(host)
        if address is None:
            return False  # a UNIX socket peer or garbage: nobody vouches for it
        return any(address in network for network in self.networks)


def encode_v2(source: Address | None, destination: Address | None) -> bytes:
    """A v2 header saying "this connection is really from ``source`` to ``destination``".

    Without a source (or when the addresses cannot be told), a LOCAL header with
    no addresses: the receiver then uses the real connection's (section 2.2).
    """
    src = parse_ip(source[0]) if source is not None else None
    dst = parse_ip(destination[0]) if destination is not None else None
    if source is None or src is None:
        return V2_SIGNATURE + struct.pack("!BBH", V2_LOCAL, AF_UNSPEC, 0)
    if destination is None or dst is None:
        # The destination is not known: an unspecified one of the source's family.
        dst = ipaddress.ip_address("0.0.0.0" if src.version == 4 else "::")
        destination = (str(dst), 0)
    if src.version != dst.version:
        # Section 2.2: both addresses share one family; IPv4 goes into IPv6 mapped.
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    family = TCP_OVER_IPV4 if src.version == 4 else TCP_OVER_IPV6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", V2_PROXY, family, len(body)) + body


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


# -- reading a header ------------------------------------------------------------------------


class Command(IntEnum):
    """Section 2.2: the low nibble of the 13th byte. Every v1 header is a PROXY one."""

    #: made by the proxy itself (a health check): the connection's own addresses apply
    LOCAL = 0x0
    #: on behalf of a client, whose addresses the header carries
    PROXY = 0x1


class Family(IntEnum):
    """Section 2.2: the high nibble of the 14th byte (v1: TCP4, TCP6 or UNKNOWN)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(IntEnum):
    """Section 2.2: the low nibble of the 14th byte (v1: STREAM, or UNSPEC for UNKNOWN)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


#: Section 2.2: the address block of each family: two addresses and, for INET and INET6
#: over STREAM or DGRAM, two ports; AF_UNIX addresses are two 108-byte paths.
_ADDRESS_BLOCK = {Family.INET: 4 + 4 + 2 + 2, Family.INET6: 16 + 16 + 2 + 2,
                  Family.UNIX: 108 + 108}
_IP_SIZE = {Family.INET: 4, Family.INET6: 16}


class InvalidHeader(Exception):
    """The connection does not start with a header this reader accepts.

    ``reason`` says why in a few fixed words, never with a byte of the input: it goes
    to the log and to a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotAHeader(InvalidHeader):
    """The first bytes are neither a v1 nor a v2 signature: the peer speaks something else."""


class HeaderTooLong(InvalidHeader):
    """No CRLF within a v1 line's 107 bytes, or a v2 length over the reader's limit."""


@dataclass(frozen=True)
class ProxyHeader:
    """One header, as it was sent (``addresses`` says what to make of it)."""

    version: int
    command: Command
    family: Family
    transport: Transport
    #: INET and INET6 over STREAM or DGRAM: the address and the port; UNIX: the raw
    #: 108-byte path field (NUL padded, never decoded: it need not be text); else None.
    source: IPEndpoint | bytes | None = None
    destination: IPEndpoint | bytes | None = None
    #: v2 only: the TLVs after the address block (section 2.2), as (type, value), in order.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def addresses(self) -> tuple[IPEndpoint, IPEndpoint] | None:
        """The client's address and the one it connected to, when the header carries IP
        addresses to use (a PROXY header over INET or INET6), IPv4-mapped IPv6 addresses
        unwrapped. None when the connection's own addresses apply: section 2.1 (UNKNOWN)
        and section 2.2 (LOCAL, and UNSPEC and UNIX, which name no IP address)."""
        source, destination = self.source, self.destination
        if (self.command is not Command.PROXY or not isinstance(source, tuple)
                or not isinstance(destination, tuple)):
            return None
        return (unmapped(source[0]), source[1]), (unmapped(destination[0]), destination[1])


class HeaderReader:
    """Reads the PROXY header (v1 or v2) that starts a connection, in pieces of any size.

    ``feed`` returns NEED_DATA until the header is complete, then the header and the
    bytes that followed it (the client's first bytes, which the sender may have sent
    along); or it raises InvalidHeader as soon as the bytes can no longer be a valid
    header (section 2.1: "abort the connection as soon as possible"). Between calls
    the reader holds fewer than ``max(V1_MAX, max_v2)`` bytes. It reads one header:
    feeding it again afterwards is a bug (RuntimeError).
    """

    def __init__(self, max_v2: int = MAX_V2_HEADER) -> None:
        if max_v2 < V2_FIXED:
            raise ValueError(f"max_v2 must be at least {V2_FIXED}")
        self.max_v2 = max_v2
        self._buffer = b""
        self._spent = False

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of the header."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | Literal[Kind.NEED_DATA]:
        if self._spent:
            raise RuntimeError("the PROXY header was already read or refused")
        buffer, self._buffer = self._buffer + data, b""
        self._spent = True  # unless more bytes are needed: then it goes on below
        kind = sniff(buffer)
        if kind is Kind.NOT_A_HEADER:
            raise NotAHeader("no PROXY header")
        if kind is Kind.V1:
            result = _read_v1(buffer)
        elif kind is Kind.V2:
            result = _read_v2(buffer, self.max_v2)
        else:
            result = NEED_DATA
        if result is NEED_DATA:
            self._buffer, self._spent = buffer, False
        return result


# Section 2.1: the fields of a v1 line. Addresses in their canonical form: dotted quads
# (ipaddress refuses leading zeros), or hex groups and colons, maybe with an IPv4 tail;
# never a zone. Ports in decimal without leading zeros; their range is checked apart.
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_FAMILIES = {b"TCP4": Family.INET, b"TCP6": Family.INET6}


def _read_v1(buffer: bytes) -> tuple[ProxyHeader, bytes] | Literal[Kind.NEED_DATA]:
    # Section 2.1: the line ends with CRLF within 107 bytes, and "the receiver must not
    # tolerate a single CR or LF character to end the line".
    end = buffer.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise HeaderTooLong("PROXY header too long")
        return NEED_DATA
    if buffer[end - 1] != 0x0D:  # end >= len(V1_PREFIX): "PROXY " has no LF
        raise InvalidHeader("v1 line not ended by CRLF")
    return _parse_v1(buffer[len(V1_PREFIX):end - 1]), buffer[end + 1:]


def _parse_v1(line: bytes) -> ProxyHeader:
    # Section 2.1: after UNKNOWN, the receiver ignores everything up to the CRLF (the
    # sender may leave it out).
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
    fields = line.split(b" ")
    family = _V1_FAMILIES.get(fields[0])
    if family is None:
        raise InvalidHeader("v1 protocol not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise InvalidHeader("v1 line not five fields")
    source_port, destination_port = _v1_port(fields[3]), _v1_port(fields[4])
    return ProxyHeader(1, Command.PROXY, family, Transport.STREAM,
                       (_v1_address(family, fields[1]), source_port),
                       (_v1_address(family, fields[2]), destination_port))


def _v1_address(family: Family, text: bytes) -> IPAddress:
    # Section 2.1: "The advertised protocol family dictates what format to use."
    pattern, parse = ((_V1_IPV4, ipaddress.IPv4Address) if family is Family.INET
                      else (_V1_IPV6, ipaddress.IPv6Address))
    if pattern.fullmatch(text) is None:
        raise InvalidHeader("v1 address not an address of its family")
    try:
        return parse(text.decode("ascii"))
    except ValueError:
        raise InvalidHeader("v1 address not an address of its family") from None


def _v1_port(text: bytes) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise InvalidHeader("v1 port not a number from 0 to 65535")
    return int(text)


def _read_v2(buffer: bytes, max_v2: int) -> tuple[ProxyHeader, bytes] | Literal[Kind.NEED_DATA]:
    if len(buffer) < V2_FIXED:
        return NEED_DATA
    version_command, family_transport, length = struct.unpack_from("!BBH", buffer, 12)
    # Section 2.2: "the receiver must only accept" version 2, and must drop connections
    # with a command other than LOCAL or PROXY, or (PROXY) an unassigned family or
    # transport. A LOCAL header's family "is ignored".
    if version_command >> 4 != 2:
        raise InvalidHeader("v2 version not 2")
    if version_command & 0x0F not in (Command.LOCAL, Command.PROXY):
        raise InvalidHeader("v2 command not LOCAL or PROXY")
    if version_command & 0x0F == Command.PROXY and (
            family_transport >> 4 > Family.UNIX or family_transport & 0x0F > Transport.DGRAM):
        raise InvalidHeader("v2 family or transport unassigned")
    size = V2_FIXED + length
    if size > max_v2:
        raise HeaderTooLong("PROXY header too long")
    if len(buffer) < size:
        return NEED_DATA
    return _parse_v2(buffer[:size]), buffer[size:]


def _parse_v2(header: bytes) -> ProxyHeader:
    if header[12] & 0x0F == Command.LOCAL:
        # Section 2.2: the receiver "must use the real connection endpoints and discard
        # the protocol block including the family".
        return ProxyHeader(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC)
    family, transport = Family(header[13] >> 4), Transport(header[13] & 0x0F)
    if family is Family.UNSPEC or transport is Transport.UNSPEC:
        # Section 2.2: "The receiver should ignore address information"; with no known
        # layout, where TLVs would start is unknown too.
        return ProxyHeader(2, Command.PROXY, family, transport)
    block = _ADDRESS_BLOCK[family]
    body = header[V2_FIXED:]
    if len(body) < block:
        raise InvalidHeader("v2 address block too short")
    source: IPEndpoint | bytes
    destination: IPEndpoint | bytes
    if family is Family.UNIX:
        source, destination = body[:108], body[108:216]
    else:
        size = _IP_SIZE[family]
        parse = ipaddress.IPv4Address if family is Family.INET else ipaddress.IPv6Address
        source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
        source = parse(body[:size]), source_port
        destination = parse(body[size:2 * size]), destination_port
    tlvs = _tlvs(header, V2_FIXED + block)
    return ProxyHeader(2, Command.PROXY, family, transport, source, destination, tlvs)


def _tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from ``start`` to the end of the header (section 2.2), checksum checked."""
    tlvs = []
    at = start
    while at < len(header):
        if len(header) - at < 3:
            raise InvalidHeader("v2 TLV truncated")
        kind, length = header[at], int.from_bytes(header[at + 1:at + 3], "big")
        value = header[at + 3:at + 3 + length]
        if len(value) != length:
            raise InvalidHeader("v2 TLV truncated")
        if kind == TLV_CRC32C:
            _check_crc32c(header, at + 3, value)
        tlvs.append((kind, value))
        at += 3 + length
    return tuple(tlvs)


def _check_crc32c(header: bytes, at: int, value: bytes) -> None:
    # Section 2.2.3: a receiver that supports the checksum "MUST treat the TCP connection
    # providing the header as invalid" unless the CRC32c of the whole header, with the
    # checksum field zeroed, is the one sent (in network byte order).
    if len(value) != 4:
        raise InvalidHeader("v2 CRC32C TLV not 4 bytes")
    if crc32c(header[:at] + bytes(4) + header[at + 4:]) != int.from_bytes(value, "big"):
        raise InvalidHeader("v2 CRC32C mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of RFC 4960 appendix B (section 2.2.3)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

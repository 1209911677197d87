# -*- test-case-name: tests.test_proxyprotocol -*-
"""The PROXY protocol (HAProxy, v1 text and v2 binary): the pure parts.

Who may send a header (``TrustedNetworks``), what the first bytes of a connection
are (``sniff``), and the v2 header the proxy itself sends to a backend with
``forward_client = "proxy-v2"`` (``encode_v2``). Parsing inbound headers is left to
``twisted.protocols.haproxy``; the Twisted side lives in ``haproxy.py``.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from enum import Enum

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

Address = tuple[str, int]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def parse_ip(host: str) -> IPAddress | None:
    """An address from a transport's host: IPv4-mapped IPv6 unwrapped, zone dropped."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
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

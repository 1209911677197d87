# -*- test-case-name: tests.test_haproxy -*-
"""The PROXY protocol on the wire: inbound headers on listeners, outbound to backends.

Inbound (``[[listen]] proxy_protocol = true``): ``ProxyHeaderFactory`` wraps the
listener's factory. A connection from outside ``[proxy_protocol] trusted`` is
closed at once, before a byte is read or written. From a trusted peer, the
header is parsed with ``twisted.protocols.haproxy``'s v1/v2 parsers, and only then
does the wrapped protocol (the IMAP/POP3 front end, or the TLS layer of an
implicit-TLS listener) see the connection: its ``getPeer()`` and ``getHost()``
are the header's, so whatever logs, limits or forwards the client's address
uses the real one. A header that names no IP addresses (LOCAL, AF_UNSPEC, AF_UNIX,
v1 UNKNOWN) leaves the connection's own, as the spec says (section 2.2). Unlike
``HAProxyProtocolWrapper``, the header may arrive in any number of pieces, and a peer
that never finishes it is closed after ``[proxy_protocol] timeout``.

Outbound (``[backend] forward_client = "proxy-v2"``): ``HeaderFirstEndpoint``
writes a v2 header as the first bytes of a backend connection, under TLS if any.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .proxyprotocol import (
    FAMILY_UNIX,
    FAMILY_UNSPEC,
    V1_MAX,
    V2_LOCAL,
    V2_PROXY,
    Kind,
    TrustedNetworks,
    parse_ip,
    sniff,
)

log = Logger(namespace="imapproxy")

#: Section 2.2: a v2 header carries at most 16 + 65535 bytes; ours need far less.
#: TLVs (ALPN, SSL info, ...) stay well under a few hundred bytes in practice.
MAX_V2_HEADER = 16 + 4096


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header, then hands the connection to the wrapped protocol."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._header_read = False
        self._source: Any = None
        self._destination: Any = None
        self._timer: Any = None
        self._refused = False

    # -- connection ------------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        # Not ProtocolWrapper's: the wrapped protocol is connected once the header is in.
        directlyProvides(self, providedBy(transport))
        self.factory.registerProtocol(self)
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        if not self.factory.trusted.allows(getattr(peer, "host", "")):
            self._refuse("peer not in [proxy_protocol] trusted")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._header_read:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        buffer = self._buffer
        kind = sniff(buffer)
        if kind is Kind.NEED_DATA:
            return
        if kind is Kind.NOT_A_HEADER:
            self._refuse("no PROXY header")
            return
        if kind is Kind.V1:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > V1_MAX:
                    self._refuse("PROXY header too long")
                return
            header, remaining = buffer[:end + 2], buffer[end + 2:]
        else:
            if len(buffer) < 16:
                return
            size = 16 + struct.unpack("!H", buffer[14:16])[0]
            if size > MAX_V2_HEADER:
                self._refuse("PROXY header too long")
                return
            if len(buffer) < size:
                return
            header, remaining = buffer[:size], buffer[size:]
        self._buffer = b""
        try:
            addresses = _ip_addresses(kind, header)
        except (InvalidProxyHeader, ValueError) as e:
            # ValueError: what Twisted's parsers let through (a port that is no number,
            # bytes that are not UTF-8), and addresses that are not IP addresses.
            self._refuse(f"invalid PROXY header ({type(e).__name__})")
            return
        self._header_done(addresses, remaining)

    def _header_done(self, addresses: tuple[Any, Any] | None, remaining: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # None: the header names no IP addresses, so the connection's own stand (getPeer).
        self._source, self._destination = addresses or (None, None)
        self._header_read = True
        self.wrappedProtocol.makeConnection(self)
        if remaining and self.wrappedProtocol is not None and self.connected:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, reason: str) -> None:
        self._refused = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        peer = self.transport.getPeer()
        self.factory.refused(getattr(peer, "host", str(peer)), reason)
        # A reset, not a polite close: nothing was said, and nothing will be.
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("no PROXY header in time")

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.protocols.pop(self, None)
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if self._header_read and wrapped is not None:
            wrapped.connectionLost(reason)

    # -- addresses -------------------------------------------------------------------------

    def getPeer(self) -> Any:  # noqa: N802
        """The client's address from the header (the real peer's for a LOCAL header)."""
        if self._source is not None:
            return self._source
        return self.transport.getPeer()

    def getHost(self) -> Any:  # noqa: N802
        """The address the client connected to, from the header."""
        if self._destination is not None:
            return self._destination
        return self.transport.getHost()

    def proxy_peer(self) -> Any:
        """The real peer: the load balancer the header came from."""
        return self.transport.getPeer()


def _ip_addresses(kind: Kind, header: bytes) -> tuple[Any, Any] | None:
    """The header's source and destination when they are IP addresses; None when it
    carries none to use (section 2.2: LOCAL, UNSPEC and AF_UNIX, and v1 UNKNOWN, mean
    "use the real connection's addresses"). Raises InvalidProxyHeader or ValueError."""
    if kind is Kind.V1:
        # Section 2.1: after UNKNOWN the receiver ignores everything up to the CRLF, which
        # may follow at once (Twisted's parser wants a space there).
        if header[6:13] == b"UNKNOWN" and header[13:14] in (b" ", b"\r"):
            return None
        info = V1Parser.parse(header[:-2])
    else:
        command, family = header[12], header[13]
        # Section 2.2: a LOCAL command's addresses are to be ignored, and UNSPEC and UNIX
        # ones name no IP address; Twisted's parser is not asked to decode UNIX paths
        # (it fails on non-UTF-8 ones).
        if command == V2_LOCAL or (command == V2_PROXY and family & 0x0F <= 2
                                   and family >> 4 in (FAMILY_UNSPEC, FAMILY_UNIX)):
            return None
        info = V2Parser.parse(header)
    source, destination = _ip(info.source), _ip(info.destination)
    if source is None or destination is None:
        return None  # e.g. AF_INET with an unspecified transport: no addresses parsed
    return source, destination


def _ip(address: Any) -> IPv4Address | IPv6Address | None:
    """An IP address of the header, checked (Twisted's v1 parser takes any text and any
    number), in the usual form (its v2 parser writes IPv6 uncompressed), and an IPv4-mapped
    address as the IPv4 one it is."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    ip = parse_ip(address.host)
    if ip is None or "%" in address.host:
        raise ValueError("not an IP address")
    if not 0 <= address.port <= 65535:
        raise ValueError("port out of range")
    if ip.version == 4:
        return IPv4Address("TCP", str(ip), address.port)
    return IPv6Address("TCP", str(ip), address.port)


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a listener's factory: PROXY headers from trusted peers, nothing from others."""

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, trusted: TrustedNetworks, clock: Any,
                 timeout: float = 10.0, metrics: Any = None) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.clock = clock
        self.timeout = timeout
        self.metrics = metrics

    def refused(self, peer: str, reason: str) -> None:
        log.warn("PROXY header refused from {peer}: {reason}", peer=peer, reason=reason)
        if self.metrics is not None:
            self.metrics.proxy_header_refused(reason)

    def logPrefix(self) -> str:  # noqa: N802
        return "ProxyHeader"


class _HeaderFirst(ProtocolWrapper):
    """Writes the header before the wrapped protocol (maybe TLS) writes anything."""

    def __init__(self, factory: Any, wrapped: Any, header: bytes) -> None:
        super().__init__(factory, wrapped)
        self._header = header

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        transport.write(self._header)
        super().makeConnection(transport)


class _HeaderFirstFactory(WrappingFactory):
    noisy = False

    def __init__(self, wrapped: Any, header: bytes) -> None:
        super().__init__(wrapped)
        self._header = header

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        return _HeaderFirst(self, self.wrappedFactory.buildProtocol(addr), self._header)


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """A client endpoint whose connections start with ``header`` (a PROXY v2 header)."""

    def __init__(self, wrapped: IStreamClientEndpoint, header: bytes) -> None:
        self._wrapped = wrapped
        self._header = header

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d = self._wrapped.connect(_HeaderFirstFactory(factory, self._header))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)

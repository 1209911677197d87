# -*- test-case-name: tests.test_proxyheader -*-
"""The PROXY protocol on the wire: inbound headers on listeners, outbound to backends.

Inbound (``[[listen]] proxy_protocol = true``): ``ProxyHeaderFactory`` wraps the
listener's factory (``proxy_listener`` builds the stack). A connection from outside
``[proxy_protocol] trusted`` is closed at once, before a byte is read or written.
From a trusted peer, the v1 or v2 header is read with proxyprotocol.py's
``HeaderReader``, and only then does the wrapped protocol (the IMAP/POP3 front end,
or the TLS layer of an implicit-TLS listener) see the connection: its ``getPeer()``
and ``getHost()`` are the header's, so whatever logs, limits or forwards the client's address
uses the real one. A header that names no IP addresses (LOCAL, AF_UNSPEC, AF_UNIX,
v1 UNKNOWN) leaves the connection's own, as the spec says (section 2.2). The header
may arrive in any number of pieces, and a peer that never finishes it is closed after
``[proxy_protocol] timeout``.

Outbound (``[backend] forward_client = "proxy-v2"``): ``HeaderFirstEndpoint``
writes a v2 header as the first bytes of a backend connection, under TLS if any.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .config import Listener
from .proxyprotocol import (
    MAX_V2_HEADER,
    NEED_DATA,
    HeaderReader,
    HeaderTooLong,
    InvalidHeader,
    IPAddress,
    NotAHeader,
    ProxyHeader,
    TrustedNetworks,
)

log = Logger(namespace="imapproxy")


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header, then hands the connection to the wrapped protocol."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        #: until the header is read or refused (then gone: sessions live long)
        self._reader: HeaderReader | None = HeaderReader(MAX_V2_HEADER)
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
        if self._refused or self._reader is None:
            return
        try:
            result = self._reader.feed(data)
        except (NotAHeader, HeaderTooLong) as e:
            self._refuse(e.reason)
            return
        except InvalidHeader as e:
            self._refuse(f"invalid PROXY header ({e.reason})")
            return
        if result is NEED_DATA:
            return
        header, remaining = result
        self._header_done(_ip_addresses(header), remaining)

    def _header_done(self, addresses: tuple[Any, Any] | None, remaining: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._reader = None
        # None: the header names no IP addresses, so the connection's own stand (getPeer).
        self._source, self._destination = addresses or (None, None)
        self._header_read = True
        self.wrappedProtocol.makeConnection(self)
        if remaining and self.wrappedProtocol is not None and self.connected:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, reason: str) -> None:
        self._refused = True
        self._reader = None
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


def _ip_addresses(header: ProxyHeader) -> tuple[Any, Any] | None:
    """The header's source and destination as Twisted addresses, when it carries IP
    addresses to use; None when the connection's own apply (``ProxyHeader.addresses``).
    IPv4-mapped addresses are the IPv4 ones they are, and IPv6 ones are written
    compressed, as Twisted's transports write them, whatever form a v1 line used."""
    addresses = header.addresses
    if addresses is None:
        return None
    (source, source_port), (destination, destination_port) = addresses
    return _address(source, source_port), _address(destination, destination_port)


def _address(ip: IPAddress, port: int) -> IPv4Address | IPv6Address:
    if ip.version == 4:
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


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


class CurrentProxyHeaderFactory(ProxyHeaderFactory):
    """A ProxyHeaderFactory that reads ``[proxy_protocol]`` and the metrics through the
    running config (runtime.Current), so a reload changes the trusted networks and the
    timeout for the next connection, as it does every other setting."""

    def __init__(self, wrapped: Any, current: Any, clock: Any) -> None:
        WrappingFactory.__init__(self, wrapped)
        self.clock = clock
        self._current = current
        self._config: Any = None
        self._trusted = TrustedNetworks(())

    @property  # type: ignore[override]
    def trusted(self) -> TrustedNetworks:
        config = self._current.runtime.config
        if config is not self._config:  # parsed once per config, not per connection
            self._trusted = TrustedNetworks(config.proxy_protocol.trusted)
            self._config = config
        return self._trusted

    @property  # type: ignore[override]
    def timeout(self) -> float:
        return float(self._current.runtime.config.proxy_protocol.timeout)

    @property  # type: ignore[override]
    def metrics(self) -> Any:
        return self._current.runtime.shared.metrics


def proxy_listener(reactor: Any, current: Any, listener: Listener, factory: Any,
                   tls: Any) -> tuple[Listener, ProxyHeaderFactory]:
    """For a ``proxy_protocol = true`` listener: the plain TCP listener to bind, and the
    factory stack (PROXY header, then TLS for an implicit-TLS listener, then the proxy).
    ``current`` is the runtime.Current the header factory reads its settings through."""
    inner = TLSMemoryBIOFactory(tls, False, factory) if listener.tls == "implicit" else factory
    return replace(listener, tls="none"), CurrentProxyHeaderFactory(inner, current, reactor)


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

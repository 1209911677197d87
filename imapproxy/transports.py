# -*- test-case-name: tests.test_transports -*-
"""What the proxy does to Twisted's transports, in one place: socket options, writing at
once on the hot path, backpressure, and ending a connection.

Socket options (``configure_socket``): TCP_NODELAY, and TCP keepalive tuned for the
NATs of mobile carriers, on both legs.

Writing (``write_now``): Twisted's write() only queues, and the send waits for the
reactor's next turn; on the relay's hot path that turn is pure latency (one per hop, two
per round trip: NOOP's added latency went from 0.084 to 0.057 ms with this), so when
nothing is queued on a plain TCP transport the bytes go out at once. Twisted has no
public API for it: this reads tcp.Connection's queue (``dataBuffer``, ``offset``,
``_tempDataLen``) and calls ``writeSomeData``; tests/test_transports.py checks those
parts on whatever Twisted it runs on (each supported stack runs it).

Ending a connection. Every way a session ends (LOGOUT, the backend going away, a kick,
a drain, a timeout, too many bad commands) closes its connections through
``Leg.close()``, on both legs. It knows three things about Twisted's transports that a
plain ``loseConnection()`` does not take care of:

- Twisted's TLS layer (``twisted.protocols.tls``) sends its close_notify only once no
  producer is registered on it, and a relay registers producers both ways
  (``Backpressure`` below): a TLS close with the other leg still registered as its
  producer never happens. So the producer goes first.
- Having sent close_notify, that TLS layer waits for the peer's close_notify before it
  closes TCP, and a peer that waits for our EOF (mbsync after LOGOUT) never sends one.
  RFC 8446 section 6.1 (and RFC 5246 section 7.2.1 for TLS 1.2) lets the side that
  closes first not wait for the reply, so once our close_notify is on its way the TCP
  connection beneath the TLS layer is closed as well: the client sees EOF at once.
- A peer that stops reading keeps a flushing close open forever, and with it our
  buffers and a descriptor: after ``CLOSE_TIMEOUT`` the close becomes an abort.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOProtocol

from .config import Timeouts

#: Seconds a closing connection may take to flush what we wrote before it is aborted.
#: Far above any real client's reading of a BYE line; a client that does not read at
#: all gets no more of our memory than this.
CLOSE_TIMEOUT = 10.0
#: Seconds a backend has to answer the LOGOUT the proxy sent for a client and close by
#: itself (RFC 3501 section 6.1.3) before the proxy closes the connection anyway.
LOGOUT_GRACE = 5.0


def tcp_server_endpoint(reactor: Any, host: str, port: int, backlog: int = 50) -> Any:
    """A TCP listening endpoint on ``host`` (IPv4 or IPv6) and ``port``."""
    if isIPv6Address(host):
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)


def configure_socket(transport: Any, timeouts: Timeouts) -> None:
    """TCP_NODELAY (no Nagle stalls on multi-part replies) and tuned TCP keepalive."""
    if not hasattr(transport, "setTcpNoDelay"):
        return  # not TCP (an in-memory transport in tests)
    transport.setTcpNoDelay(True)
    transport.setTcpKeepAlive(True)
    sock = transport.getHandle()
    if not hasattr(sock, "setsockopt"):
        return
    for option, value in ((getattr(socket, "TCP_KEEPIDLE", None), timeouts.tcp_keepalive_idle),
                          (getattr(socket, "TCP_KEEPINTVL", None),
                           timeouts.tcp_keepalive_interval),
                          (getattr(socket, "TCP_KEEPCNT", None), timeouts.tcp_keepalive_count)):
        if option is not None:
            with contextlib.suppress(OSError):  # not every kernel has every option
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


#: transports write_now may send on directly (exact types: subclasses may differ)
PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """Write, sending at once when nothing is queued on a plain TCP transport.

    TLS transports (and anything else) keep the ordinary path; so does a transport with
    bytes queued already (order), or one that is closing.
    """
    if type(transport) not in PLAIN_TCP or (
            transport.TLS  # after startTLS the same transport encrypts inside write()
            or len(transport.dataBuffer) > transport.offset or transport._tempDataLen
            or transport.disconnecting or not transport.connected):
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if isinstance(sent, Exception) or sent < 0:
        transport.write(data)  # the reactor's next write attempt reports the error
    elif sent < len(data):
        transport.write(data[sent:])


class Backpressure:
    """An IPushProducer that passes pause and resume on to a transport, never a stop.

    The relay registers one on each leg for the other (as twisted.protocols.portforward
    does with the transports themselves); before login the client's leg registers one
    for itself: our replies are its only writes, and a client that never reads them is
    no longer read (frontend.py). Registering the transport itself would let
    Twisted end one leg whenever the other is lost (``stopProducing`` is a
    ``loseConnection``), ahead of the session's own decision about how to end it
    (a BYE to the client first, a LOGOUT to the backend): that decision is the
    session's, carried out by ``Leg.close()``, so ``stopProducing`` does nothing here.
    """

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:  # noqa: N802
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        pass


def tls_layer(transport: Any) -> TLSMemoryBIOProtocol | None:
    """The TLS protocol carrying ``transport``, if there is one.

    Implicit TLS: the transport is the TLS protocol. STARTTLS: Twisted's TCP transport
    hands its bytes to a TLS protocol it keeps as ``protocol`` (``TLS`` is then true).
    Behind a PROXY header either one may sit under a ProtocolWrapper.
    """
    layer = transport
    for _ in range(4):  # TLS, a PROXY header wrapper, TCP: never deeper than that
        if isinstance(layer, TLSMemoryBIOProtocol):
            return layer
        if getattr(layer, "TLS", False) is True:
            inner = getattr(layer, "protocol", None)
            if isinstance(inner, TLSMemoryBIOProtocol):
                return inner
        layer = getattr(layer, "transport", None)
        if layer is None:
            return None
    return None


class Leg:
    """One connection of a session (the client's or the backend's): who produces into
    it, and how it ends. Every close of a session's connection goes through ``close()``.
    """

    __slots__ = ("transport", "clock", "producer", "gone", "_closing")

    def __init__(self, transport: Any, clock: Any) -> None:
        self.transport = transport
        self.clock = clock
        #: the IPushProducer registered on this transport by us, if any
        self.producer: Any = None
        #: the connection is lost: nothing more to close
        self.gone = False
        self._closing: Any = None

    def register(self, producer: Any) -> None:
        """Register a streaming producer (backpressure) on this connection."""
        self.unregister()
        self.producer = producer
        self.transport.registerProducer(producer, True)

    def unregister(self) -> None:
        if self.producer is not None:
            self.producer = None
            self.transport.unregisterProducer()

    def close(self, abort: bool = False) -> None:
        """Close now, after flushing what was written (unless ``abort``); see the module."""
        if self.gone:
            return
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        # Nothing may hold the close back: no producer stays registered on this leg.
        self.unregister()
        transport = self.transport
        if abort:
            transport.abortConnection()
            return
        # The deadline first: a transport may report the connection lost within
        # loseConnection() itself, and lost() must find the deadline to cancel it.
        self._closing = self.clock.callLater(CLOSE_TIMEOUT, self._abort)
        transport.loseConnection()
        tls = tls_layer(transport)
        if tls is not None and tls.transport is not None and _close_notify_sent(tls):
            # Our close_notify is written to the TCP layer; that layer now flushes it
            # (and everything before it) and closes, without waiting for the peer's reply.
            tls.transport.loseConnection()

    def close_after(self, seconds: float) -> None:
        """Let the peer close first; close ourselves if it has not within ``seconds``."""
        if self.gone:
            return
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self.unregister()
        self._closing = self.clock.callLater(seconds, self.close)

    def lost(self) -> None:
        """The connection is gone: no abort is due any more."""
        self.gone = True
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        self.producer = None

    def _abort(self) -> None:
        self._closing = None
        self.transport.abortConnection()


def _close_notify_sent(tls: TLSMemoryBIOProtocol) -> bool:
    handle = tls.getHandle()
    if handle is None:
        return False  # connection already lost: Twisted has let go of OpenSSL's
    try:
        return bool(handle.get_shutdown() & SSL.SENT_SHUTDOWN)
    except SSL.Error:
        return False

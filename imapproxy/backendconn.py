# -*- test-case-name: tests.test_backendconn -*-
"""The proxy's connections to backends: dialling one, logging in there, relaying.

``BackendConnector.connect()`` dials one server (TLS as [backend] tls says, a PROXY
header first if asked), runs the backend login dialogue (imapbackend.py,
pop3backend.py: sans-IO) on the connection, and returns the logged-in
``BackendProtocol``, or raises a ProxyError saying why not, in words an operator can
act on. Which server to dial, and what a failure means, is the login's business
(login.py). Once logged in, the protocol hands the backend's bytes to the relay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .actions import BackendLoggedIn, BackendLoginFailed, SendToBackend, StartBackendTLS
from .backendtls import backend_client_options
from .config import Config
from .directory import Server
from .errors import BackendUnavailable, LoginDropped
from .proxyheader import HeaderFirstEndpoint
from .transports import Leg, configure_socket, write_now

CONNECTION_DONE = Failure(error.ConnectionDone())

EndpointFactory = Callable[[str, int], IStreamClientEndpoint]


def default_endpoint_factory(reactor: Any, timeout: float) -> EndpointFactory:
    """Dial IP literals directly (no resolver round trip); names through HostnameEndpoint."""
    def factory(host: str, port: int) -> IStreamClientEndpoint:
        if isIPAddress(host):
            return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return factory


def why_lost(reason: Failure) -> str:
    """Why a backend connection failed, in words an operator can act on."""
    if reason.check(VerificationError):
        return "TLS: certificate name mismatch"
    if reason.check(SSL.Error):
        text = str(reason.value)
        if "certificate verify failed" in text:
            return "TLS: certificate not trusted"
        errors = reason.value.args[0] if reason.value.args else []
        last = errors[-1][-1] if errors and isinstance(errors[-1], tuple) else text
        return f"TLS: {last or text}"
    if reason.check(error.ConnectionRefusedError, ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.TimeoutError, TimeoutError, defer.CancelledError):
        return "connect timed out"
    if reason.check(error.DNSLookupError):
        return "host name not found"
    if reason.check(error.ConnectionDone, error.ConnectionLost):
        return "closed the connection during the login"
    return reason.getErrorMessage() or reason.type.__name__


class BackendProtocol(Protocol):
    """The proxy's connection to a backend: the login dialogue first, then relay."""

    def __init__(self, server: Server, tls_creator: Callable[[], Any], config: Config,
                 clock: Any) -> None:
        #: the login dialogue once it runs (start()); bytes before it wait in _early
        self.dialogue: Any = None
        self._early = b""
        #: the route's server (its port None if the route names none)
        self.server = server
        self.relay: Any = None
        self.logged_in: defer.Deferred[BackendLoggedIn] = defer.Deferred()
        self.result: BackendLoggedIn | None = None
        self.leg: Leg | None = None
        #: told when this connection is gone (the session registry, during a drain)
        self.registry: Any = None
        self._tls_creator = tls_creator
        self._config = config
        self._clock = clock

    # What the login needs to know of where it landed (routing loops, login.py).

    @property
    def peer_host(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", ""))

    @property
    def peer_port(self) -> int:
        return int(getattr(self.transport.getPeer(), "port", 0))

    @property
    def local_host(self) -> str:
        return str(getattr(self.transport.getHost(), "host", ""))

    def close(self, abort: bool = False) -> None:
        """Close the connection to the backend (transports.py: TLS, producers, a deadline)."""
        if self.leg is not None:
            self.leg.close(abort)

    def connectionMade(self) -> None:  # noqa: N802
        self.leg = Leg(self.transport, self._clock)
        configure_socket(self.transport, self._config.timeouts)

    def start(self, dialogue: Any) -> None:
        """Run the login dialogue (what came before it, a greeting, goes to it first)."""
        self.dialogue = dialogue
        early, self._early = self._early, b""
        if early:
            self.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        relay = self.relay
        if relay is not None:
            relay.from_backend(data)
            return
        if self.logged_in.called:
            return  # login over but not yet spliced: cannot happen with a paused client
        dialogue = self.dialogue
        if dialogue is None:
            # Connected, not yet started: the greeting waits (bounded by what a backend
            # says before it hears a word from us).
            if len(self._early) < 65536:
                self._early += data
            return
        for action in dialogue.receive_data(data):
            self._execute(action)

    def _execute(self, action: object) -> None:
        if isinstance(action, SendToBackend):
            write_now(self.transport, action.data)
        elif isinstance(action, StartBackendTLS):
            self.transport.startTLS(self._tls_creator())
            for follow_up in self.dialogue.tls_started():
                self._execute(follow_up)
        elif isinstance(action, BackendLoggedIn):
            self.transport.pauseProducing()  # until the client side is wired up
            self.result = action
            self.logged_in.callback(action)
        elif isinstance(action, BackendLoginFailed):
            self.logged_in.errback(action.error)
            self.close()

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:  # noqa: N802
        if self.leg is not None:
            self.leg.lost()
        if self.registry is not None:
            self.registry.backend_closed(self)
        dialogue, self.dialogue = self.dialogue, None
        if not self.logged_in.called:
            if (dialogue is not None and dialogue.credentials_sent
                    and reason.check(error.ConnectionDone, error.ConnectionLost)):
                # Closed on the client's credentials (Dovecot drops a 4 KB name): the
                # login is refused; the backend is fine.
                self.logged_in.errback(LoginDropped())
            else:
                self.logged_in.errback(BackendUnavailable(why_lost(reason)))
        elif self.relay is not None:
            self.relay.backend_lost()


class _OneConnection(Factory):
    """Hands out one pre-built protocol, without the start/stop log lines of Factory."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


class BackendConnector:
    """Dials one backend and runs a login dialogue there."""

    def __init__(self, reactor: Any, config: Config, *, endpoint_factory: EndpointFactory,
                 trust_root: object = None, client_certificate: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.endpoint_factory = endpoint_factory
        #: the CAs backend certificates are checked against (backendtls.py)
        self.trust_root = trust_root
        #: shown to backends that ask for a client certificate
        self.client_certificate = client_certificate

    def _tls_creator(self, host: str) -> Callable[[], Any]:
        backend = self.config.backend
        return lambda: backend_client_options(host, self.trust_root,
                                              backend.insecure_skip_verify,
                                              self.client_certificate)

    async def dial(self, server: Server, port: int, proxy_header: bytes = b"",
                   ) -> BackendProtocol:
        """A connection to ``server`` at ``port``; raises BackendUnavailable (with why)."""
        endpoint = self.endpoint_factory(server.host, port)
        if proxy_header:  # forward_client = "proxy-v2": before anything else, TLS included
            endpoint = HeaderFirstEndpoint(endpoint, proxy_header)
        tls_creator = self._tls_creator(server.host)
        if self.config.backend.tls == "implicit":
            endpoint = wrapClientTLS(tls_creator(), endpoint)
        backend = BackendProtocol(server, tls_creator, self.config, self.reactor)
        try:
            await endpoint.connect(_OneConnection(backend))
        except (error.ConnectError, error.TimeoutError, OSError, defer.CancelledError) as e:
            raise BackendUnavailable(why_lost(Failure(e))) from None
        return backend

    async def log_in(self, backend: BackendProtocol, dialogue: Any) -> BackendProtocol:
        """Run the login dialogue; the logged-in connection, or raises its error (a
        refused login, a protocol error) or BackendUnavailable (with why)."""
        backend_config = self.config.backend
        logged_in = backend.logged_in
        backend.start(dialogue)
        timer = self.reactor.callLater(backend_config.login_timeout, logged_in.cancel)
        try:
            await logged_in
        except defer.CancelledError:
            backend.close(abort=True)
            raise BackendUnavailable(f"no answer to the login within "
                                     f"{backend_config.login_timeout:g}s") from None
        finally:
            if timer.active():
                timer.cancel()
        return backend

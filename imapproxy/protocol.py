"""Twisted adapters: feed bytes into the sans-IO sessions and carry out their actions.

FrontendProtocol serves one client: pre-login it drives an ImapSession (or a POP3
session), then it relays bytes to the BackendProtocol it logged in through. The
backend connector dials the user's servers in order and runs the backend login
dialogue. Nothing here parses the protocol; that lives in imap.py and backend.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import ImapBackendLogin
from .config import Config, Listener
from .credentials import Credentials
from .directory import Directory, Route, Server
from .errors import BackendProtocolError, BackendUnavailable, ProxyError
from .events import (
    BackendLoggedIn,
    BackendLoginFailed,
    Close,
    Login,
    SendToBackend,
    SendToClient,
    Splice,
    StartBackendTLS,
    StartClientTLS,
)
from .imap import ImapSession
from .tls import backend_client_options

log = Logger(namespace="imapproxy")
_session_ids = itertools.count(1)

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


def _make_imap_login(credentials: Credentials, login: str, starttls: bool,
                     client_id: tuple[tuple[str, str | None], ...]) -> ImapBackendLogin:
    return ImapBackendLogin(credentials, login, starttls=starttls, client_id=client_id)


#: protocol name -> backend login dialogue constructor
BACKEND_DIALOGUES: dict[str, Callable[..., Any]] = {"imap": _make_imap_login}


class BackendProtocol(Protocol):
    """The proxy's connection to a backend: login dialogue first, then relay."""

    def __init__(self, dialogue: Any, server: Server, tls_creator: Callable[[], Any]) -> None:
        self.dialogue = dialogue
        self.server = server
        self.peer: FrontendProtocol | None = None
        self.logged_in: defer.Deferred[BackendLoggedIn] = defer.Deferred()
        self.result: BackendLoggedIn | None = None
        self._tls_creator = tls_creator

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.setTcpNoDelay(True)
        self.transport.setTcpKeepAlive(True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            peer.bytes_to_client += len(data)
            return
        if self.logged_in.called:
            return  # login over but not yet spliced: cannot happen with a paused client
        for action in self.dialogue.receive_data(data):
            self._execute(action)

    def _execute(self, action: object) -> None:
        if isinstance(action, SendToBackend):
            self.transport.write(action.data)
        elif isinstance(action, StartBackendTLS):
            self.transport.startTLS(self._tls_creator())
            for follow_up in self.dialogue.tls_started():
                self._execute(follow_up)
        elif isinstance(action, BackendLoggedIn):
            self.transport.pauseProducing()  # until the client side is wired up
            self.result = action
            self.logged_in.callback(action)
        elif isinstance(action, BackendLoginFailed):
            self.transport.loseConnection()
            self.logged_in.errback(action.error)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # noqa: N802
        if not self.logged_in.called:
            self.logged_in.errback(BackendUnavailable())
        elif self.peer is not None:
            self.peer.backend_lost()


class _OneConnection(Factory):
    """Hands out one pre-built protocol, without the start/stop log lines of Factory."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


class BackendConnector:
    """Connects to the first reachable server of a route and logs in there."""

    def __init__(self, reactor: Any, config: Config, health: Any = None,
                 endpoint_factory: EndpointFactory | None = None,
                 trust_root: object = None) -> None:
        self.reactor = reactor
        self.config = config.backend
        self.health = health
        self.endpoint_factory = endpoint_factory or default_endpoint_factory(
            reactor, config.backend.connect_timeout)
        self.trust_root = trust_root

    def _port(self, server: Server, protocol: str) -> int:
        if server.port is not None:
            return server.port
        return self.config.imap_port if protocol == "imap" else self.config.pop3_port

    def _tls_creator(self, host: str) -> Callable[[], Any]:
        return lambda: backend_client_options(host, self.trust_root,
                                              self.config.insecure_skip_verify)

    async def login(self, route: Route, protocol: str, credentials: Credentials,
                    client_id: tuple[tuple[str, str | None], ...] = ()) -> BackendProtocol:
        servers = list(route.servers)
        if self.health is not None:
            servers = self.health.order(servers)
        for server in servers:
            try:
                backend = await self._login_at(server, route, protocol, credentials, client_id)
            except (BackendUnavailable, BackendProtocolError) as e:
                if self.health is not None:
                    self.health.mark_failed(server)
                log.warn("backend {server} unavailable for {user}: {reason}",
                         server=str(server), user=credentials.username, reason=type(e).__name__)
                continue
            if self.health is not None:
                self.health.mark_ok(server)
            return backend
        raise BackendUnavailable()

    async def _login_at(self, server: Server, route: Route, protocol: str,
                        credentials: Credentials,
                        client_id: tuple[tuple[str, str | None], ...]) -> BackendProtocol:
        port = self._port(server, protocol)
        endpoint = self.endpoint_factory(server.host, port)
        tls_creator = self._tls_creator(server.host)
        if self.config.tls == "implicit":
            endpoint = wrapClientTLS(tls_creator(), endpoint)
        dialogue = BACKEND_DIALOGUES[protocol](credentials, route.login,
                                                self.config.tls == "starttls", client_id)
        backend = BackendProtocol(dialogue, server, tls_creator)
        try:
            await endpoint.connect(_OneConnection(backend))
        except (error.ConnectError, error.TimeoutError, OSError, defer.CancelledError):
            raise BackendUnavailable() from None
        logged_in = backend.logged_in
        timer = self.reactor.callLater(self.config.login_timeout, logged_in.cancel)
        try:
            await logged_in
        except defer.CancelledError:
            backend.transport.abortConnection()
            raise BackendUnavailable() from None
        finally:
            if timer.active():
                timer.cancel()
        return backend


#: protocol name -> front-end session constructor
def _make_imap_session(listener: Listener, config: Config) -> ImapSession:
    return ImapSession(tls_active=listener.tls == "implicit",
                       starttls_available=listener.tls == "starttls",
                       plaintext_auth=config.tls.plaintext_auth, limits=config.limits)


FRONTEND_SESSIONS: dict[str, Callable[[Listener, Config], Any]] = {"imap": _make_imap_session}


class FrontendProtocol(Protocol):
    """One client connection: the pre-login session, then the relay."""

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.session: Any = None
        self.backend: BackendProtocol | None = None
        self.session_id = next(_session_ids)
        self.user = ""
        self.mechanism = ""
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.started = 0.0
        self.last_activity = 0.0
        self.end_reason = ""
        self.disconnected = False
        self._timer: Any = None

    # -- connection events ----------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        factory = self.factory
        self.started = self.last_activity = factory.reactor.seconds()
        self.transport.setTcpNoDelay(True)
        self.transport.setTcpKeepAlive(True)
        self.session = FRONTEND_SESSIONS[factory.listener.protocol](factory.listener,
                                                                     factory.config)
        self._timer = factory.reactor.callLater(factory.config.limits.preauth_timeout,
                                                self._preauth_timeout)
        factory.sessions.add(self)
        self._execute(self.session.start())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.bytes_from_client += len(data)
        backend = self.backend
        if backend is not None:
            backend.transport.write(data)
            self.last_activity = self.factory.reactor.seconds()
            return
        self._execute(self.session.receive_data(data))

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # noqa: N802
        self.disconnected = True
        self.factory.sessions.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.backend is not None:
            self.backend.transport.loseConnection()
        if not self.end_reason:
            self.end_reason = "client closed"
        client = self.transport.getPeer()
        log.info(
            "session end id={session_id} client={client} user={user} backend={backend} "
            "duration={duration:.1f}s in={bytes_in} out={bytes_out} reason={reason}",
            session_id=self.session_id, client=f"{client.host}:{client.port}",
            user=self.user or "-", backend=str(self.backend.server) if self.backend else "-",
            duration=self.factory.reactor.seconds() - self.started,
            bytes_in=self.bytes_from_client, bytes_out=self.bytes_to_client,
            reason=self.end_reason,
        )

    def backend_lost(self) -> None:
        """The backend closed while relaying: close the client after what it was sent."""
        if not self.end_reason:
            self.end_reason = "backend closed"
        self.transport.loseConnection()

    def close_idle(self) -> None:
        self.end_reason = "idle timeout"
        self.transport.loseConnection()

    def _preauth_timeout(self) -> None:
        self._timer = None
        self._execute(self.session.timed_out())

    # -- actions --------------------------------------------------------------------------

    def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendToClient):
                self.transport.write(action.data)
                self.bytes_to_client += len(action.data)
            elif isinstance(action, StartClientTLS):
                self.transport.startTLS(self.factory.server_tls)
            elif isinstance(action, Login):
                self.transport.pauseProducing()
                defer.ensureDeferred(self._login(action))
            elif isinstance(action, Splice):
                self._splice(action.trailing)
            elif isinstance(action, Close):
                self.end_reason = action.reason
                self.transport.loseConnection()

    async def _login(self, action: Login) -> None:
        factory = self.factory
        credentials = action.credentials
        client = self.transport.getPeer()
        try:
            route = await defer.maybeDeferred(factory.directory.lookup, credentials.username,
                                              factory.listener.protocol)
            backend = await factory.connector.login(route, factory.listener.protocol,
                                                    credentials, action.client_id)
        except ProxyError as e:
            log.info("login failed id={session_id} client={client} user={user} reason={reason}",
                     session_id=self.session_id, client=client.host, user=credentials.username,
                     reason=type(e).__name__)
            if not self.disconnected:
                self.transport.resumeProducing()
                self._execute(self.session.login_failed(e))
            return
        except Exception:
            log.failure("unexpected error during login of {user}", user=credentials.username)
            if not self.disconnected:
                self.transport.resumeProducing()
                self._execute(self.session.login_failed(BackendUnavailable()))
            return
        if self.disconnected:
            backend.transport.loseConnection()
            return
        self.user = credentials.username
        self.mechanism = credentials.mechanism
        self.backend = backend
        log.info("login id={session_id} client={client} user={user} backend={backend} "
                 "mechanism={mechanism}", session_id=self.session_id, client=client.host,
                 user=self.user, backend=str(backend.server), mechanism=self.mechanism)
        assert backend.result is not None
        self._execute(self.session.login_succeeded(backend.result.capabilities))

    def _splice(self, trailing: bytes) -> None:
        backend = self.backend
        assert backend is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.session = None  # the pre-login session is done; free it
        result = backend.result
        assert result is not None
        if result.trailing:
            self.transport.write(result.trailing)
            self.bytes_to_client += len(result.trailing)
        backend.peer = self
        # Backpressure both ways, as twisted.protocols.portforward does.
        self.transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(self.transport, True)
        if trailing:
            backend.transport.write(trailing)
        backend.transport.resumeProducing()
        self.transport.resumeProducing()


class ProxyFactory(ServerFactory):
    """Builds FrontendProtocols for one listener, sharing directory and connector."""

    protocol = FrontendProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, reactor: Any, config: Config, listener: Listener, directory: Directory,
                 connector: BackendConnector, server_tls: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.listener = listener
        self.directory = directory
        self.connector = connector
        self.server_tls = server_tls
        self.sessions: set[FrontendProtocol] = set()

    def buildProtocol(self, addr: Any) -> FrontendProtocol:  # noqa: N802
        return FrontendProtocol(self)

    def sweep_idle(self) -> None:
        """Close relayed sessions whose client has been silent too long (one timer for all)."""
        limit = max(self.config.timeouts.authenticated, self.config.timeouts.idle)
        deadline = self.reactor.seconds() - limit
        for session in [s for s in self.sessions if s.backend is not None]:
            if session.last_activity < deadline:
                session.close_idle()

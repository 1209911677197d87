"""Twisted adapters: feed bytes into the sans-IO sessions and carry out their actions.

FrontendProtocol serves one client: pre-login it drives an ImapSession (or a POP3
session), then it relays bytes to the BackendProtocol it logged in through. The
backend connector dials the user's servers in order and runs the backend login
dialogue. Nothing here parses the protocol; that lives in imap.py and backend.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
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
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import forwarding
from .actions import (
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
from .backend import ImapBackendLogin
from .backendtls import backend_client_options
from .clienttls import NoApplicationProtocol
from .closing import LOGOUT_GRACE, Backpressure, Leg
from .config import Config, Listener, Timeouts
from .credentials import Credentials
from .directory import Directory, Route, Server
from .errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendUnavailable,
    InvalidUsername,
    LoginDropped,
    ProxyError,
    RoutingLoop,
    TooManyConnections,
)
from .imap import ImapSession
from .imapwire import response
from .limits import ConnectionLimiter, Refusal, Ticket, client_key
from .logquote import quoted
from .metrics import NULL_METRICS
from .penalty import Outcome, Penalty
from .penaltygate import LocalGate, LoginsRefused
from .pop3 import Pop3Session, reply
from .pop3backend import Pop3BackendLogin
from .proxyheader import HeaderFirstEndpoint
from .registry import SessionRegistry
from .relay import Relay, write_now
from .routingloops import is_own_listener, names_own_listener
from .usernames import rewrite, username_problem

log = Logger(namespace="imapproxy")
CONNECTION_DONE = Failure(error.ConnectionDone())
_session_ids = itertools.count(1)


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


#: protocol name -> backend login dialogue: (credentials, login, *, starttls, client_id)
BACKEND_DIALOGUES: dict[str, Callable[..., Any]] = {"imap": ImapBackendLogin,
                                                    "pop3": Pop3BackendLogin}


class BackendProtocol(Protocol):
    """The proxy's connection to a backend: login dialogue first, then relay."""

    def __init__(self, dialogue: Any, server: Server, tls_creator: Callable[[], Any],
                 timeouts: Timeouts, clock: Any) -> None:
        self.dialogue = dialogue
        self.server = server
        self.relay: Relay | None = None
        self.logged_in: defer.Deferred[BackendLoggedIn] = defer.Deferred()
        self.result: BackendLoggedIn | None = None
        self._tls_creator = tls_creator
        self._timeouts = timeouts
        self._clock = clock
        self.leg: Leg | None = None
        #: told when this connection is gone (the session registry, during a drain)
        self.registry: Any = None

    def close(self, abort: bool = False) -> None:
        """Close the connection to the backend (closing.py: TLS, producers, a deadline)."""
        if self.leg is not None:
            self.leg.close(abort)

    def connectionMade(self) -> None:  # noqa: N802
        self.leg = Leg(self.transport, self._clock)
        configure_socket(self.transport, self._timeouts)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        relay = self.relay
        if relay is not None:
            relay.from_backend(data)
            return
        if self.logged_in.called:
            return  # login over but not yet spliced: cannot happen with a paused client
        for action in self.dialogue.receive_data(data):
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


class _OneConnection(Factory):
    """Hands out one pre-built protocol, without the start/stop log lines of Factory."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


class BackendConnector:
    """Connects to the first reachable server of a route and logs in there."""

    #: told of failures per backend (operations.py sets the real one)
    metrics: Any = NULL_METRICS

    def __init__(self, reactor: Any, config: Config, health: Any = None,
                 endpoint_factory: EndpointFactory | None = None,
                 trust_root: object = None, client_certificate: Any = None) -> None:
        self.reactor = reactor
        self.config = config.backend
        #: our own listening addresses: never a backend (routingloops.py)
        self.listeners = config.listeners
        #: shown to backends that ask for a client certificate (tls.py)
        self.client_certificate = client_certificate
        self.timeouts = config.timeouts
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
                                              self.config.insecure_skip_verify,
                                              self.client_certificate)

    def _loop(self, server: Server, port: int) -> RoutingLoop:
        log.error("refusing backend {server} port {port}: it is one of this proxy's own "
                  "listeners (routing loop); fix the map or directory entry",
                  server=str(server), port=port)
        return RoutingLoop()

    async def login(self, route: Route, protocol: str, credentials: Credentials,
                    client_id: tuple[tuple[str, str | None], ...] = (),
                    proxy_header: bytes = b"") -> BackendProtocol:
        servers = list(route.servers)
        if self.health is not None:
            servers = self.health.order(servers)
        for server in servers:
            try:
                backend = await self._login_at(server, route, protocol, credentials, client_id,
                                               proxy_header)
            except (BackendUnavailable, BackendProtocolError) as e:
                if self.health is not None:
                    self.health.mark_failed(server)
                self.metrics.backend_failed(str(Server(server.host, self._port(server, protocol))),
                                            type(e).__name__)
                log.warn("backend {server} unavailable for {user}: {reason}",
                         server=str(server), user=quoted(credentials.username),
                         user_raw=credentials.username, reason=e.detail or type(e).__name__)
                continue
            if self.health is not None:
                self.health.mark_ok(server)
            return backend
        raise BackendUnavailable("no server of the route could be reached")

    async def _login_at(self, server: Server, route: Route, protocol: str,
                        credentials: Credentials,
                        client_id: tuple[tuple[str, str | None], ...],
                        proxy_header: bytes = b"") -> BackendProtocol:
        port = self._port(server, protocol)
        if names_own_listener(self.listeners, server.host, port):
            raise self._loop(server, port)
        endpoint = self.endpoint_factory(server.host, port)
        if proxy_header:  # forward_client = "proxy-v2": before anything else, TLS included
            endpoint = HeaderFirstEndpoint(endpoint, proxy_header)
        tls_creator = self._tls_creator(server.host)
        if self.config.tls == "implicit":
            endpoint = wrapClientTLS(tls_creator(), endpoint)
        dialogue = BACKEND_DIALOGUES[protocol](credentials, route.login,
                                                starttls=self.config.tls == "starttls",
                                                client_id=client_id)
        backend = BackendProtocol(dialogue, server, tls_creator, self.timeouts, self.reactor)
        try:
            await endpoint.connect(_OneConnection(backend))
        except (error.ConnectError, error.TimeoutError, OSError, defer.CancelledError) as e:
            raise BackendUnavailable(why_lost(Failure(e))) from None
        peer, local = backend.transport.getPeer(), backend.transport.getHost()
        if is_own_listener(self.listeners, getattr(peer, "host", ""), getattr(peer, "port", 0),
                           getattr(local, "host", "")):
            backend.close(abort=True)
            raise self._loop(server, port)
        logged_in = backend.logged_in
        timer = self.reactor.callLater(self.config.login_timeout, logged_in.cancel)
        try:
            await logged_in
        except defer.CancelledError:
            backend.close(abort=True)
            raise BackendUnavailable(f"no answer to the login within "
                                     f"{self.config.login_timeout:g}s") from None
        finally:
            if timer.active():
                timer.cancel()
        return backend


#: protocol name -> front-end session class (both take the same keyword arguments)
FRONTEND_SESSIONS: dict[str, Callable[..., Any]] = {"imap": ImapSession, "pop3": Pop3Session}


def new_session(listener: Listener, config: Config) -> Any:
    """The pre-login session for a new client of this listener."""
    return FRONTEND_SESSIONS[listener.protocol](
        tls_active=listener.tls == "implicit", starttls_available=listener.tls == "starttls",
        plaintext_auth=config.tls.plaintext_auth, limits=config.limits)

#: protocol name -> the line refusing a connection in place of the greeting: RFC 3501
#: section 7.1.5 allows BYE as the greeting; RFC 2449 section 8 codes for POP3.
REFUSALS: dict[str, Callable[[ProxyError], bytes]] = {
    "imap": lambda e: response(b"*", b"BYE", e.client_text(), e.imap_code),
    "pop3": lambda e: reply(False, e.client_text(), e.pop3_code),
}


#: reasons to stop reading a client before login (a bit mask)
HOLD_REPLIES = 2


class _ReplyBackpressure:
    """IPushProducer for the pre-login phase: the transport pauses us when our replies
    pile up unread, and we stop reading the client until they drain."""

    __slots__ = ("client",)

    def __init__(self, client: FrontendProtocol) -> None:
        self.client = client

    def pauseProducing(self) -> None:  # noqa: N802
        self.client._hold(HOLD_REPLIES)

    def resumeProducing(self) -> None:  # noqa: N802
        self.client._release(HOLD_REPLIES)

    def stopProducing(self) -> None:  # noqa: N802
        pass


@implementer(IHandshakeListener)
class FrontendProtocol(Protocol):
    """One client connection: the pre-login session, then the relay."""

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.session: Any = None
        self.relay: Relay | None = None
        self.backend: BackendProtocol | None = None
        self.session_id = next(_session_ids)
        self.user = ""
        self.mechanism = ""
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.started = 0.0
        self.end_reason = ""
        self.disconnected = False
        self._timer: Any = None
        self.leg: Leg | None = None
        self._holds = 0
        self._gate = False
        #: this connection's place in the connection limits (limits.py)
        self.ticket: Ticket | None = None
        #: a failed login's answer, held back for login_delay (see _login)
        self._answer: Any = None
        #: the penalty's admission this login waits for (penaltygate.py), if any
        self._waiting: defer.Deferred[Any] | None = None

    # -- connection events ----------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        factory = self.factory
        self.leg = Leg(self.transport, factory.reactor)
        self.started = factory.reactor.seconds()
        configure_socket(self.transport, factory.config.timeouts)
        factory.registry.add(self)
        if factory.registry.draining:
            # The session says it in its own protocol (BYE / -ERR [SYS/TEMP]) and closes.
            self._execute(new_session(factory.listener, factory.config).shutdown())
            return
        admitted = factory.limiter.admit(getattr(self.transport.getPeer(), "host", ""))
        if isinstance(admitted, Refusal):
            factory.metrics.refused(admitted.name.lower())
            # Answer and close; the listener goes on accepting (unlike Perdition's -L).
            self.transport.write(REFUSALS[factory.listener.protocol](
                TooManyConnections(admitted.value.capitalize() + ", try again later")))
            self.close(admitted.value)
            return
        self.ticket = admitted
        if factory.debug:
            log.debug("connection id={session_id} client={client} admitted ({count} from there, "
                      "{total} in all)", session_id=self.session_id, client=admitted.client,
                      count=factory.limiter.connections_from(admitted.client),
                      total=factory.limiter.total)
        self.session = new_session(factory.listener, factory.config)
        if factory.listener.tls != "implicit":
            self._add_gate()  # with TLS: once the handshake is done (handshakeCompleted)
        self._timer = factory.reactor.callLater(factory.config.limits.preauth_timeout,
                                                self._preauth_timeout)
        self._execute(self.session.start())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.bytes_from_client += len(data)
        relay = self.relay
        if relay is not None:
            relay.from_client(data)
        elif self.session is not None:
            self._execute(self.session.receive_data(data))

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:  # noqa: N802
        self.disconnected = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._answer is not None and self._answer.active():
            self._answer.cancel()
        if self._waiting is not None:
            self._waiting.cancel()  # leaves the penalty's queue
        if self.leg is not None:
            self.leg.lost()
        if self.ticket is not None:
            self.ticket.release()
        if not self.end_reason:
            # An ALPN refusal (ALPACA) is worth telling apart from a client that left.
            self.end_reason = ("TLS: no application protocol"
                               if reason.check(NoApplicationProtocol) else "client closed")
        backend = self.backend
        if backend is not None:
            if self.relay is not None and self.relay.logout_sent:
                # The backend answers our LOGOUT and closes by itself (RFC 3501 section
                # 6.1.3); closing first could cut the LOGOUT short (Dovecot's TLS login
                # process drops what it had not yet passed on). A drain waits for it.
                self.factory.registry.backend_closing(backend)
                backend.leg.close_after(LOGOUT_GRACE)
            else:
                backend.close()
        # After the backend is in the closing set: a drain waiting for this session
        # must also wait for its backend's answer to our LOGOUT.
        self.factory.registry.remove(self)
        peer = self.transport.getPeer()
        fields = {"session_id": self.session_id, "client": f"{peer.host}:{peer.port}",
                  "user": self.user or "-",
                  "backend": str(self.backend.server) if self.backend else "-",
                  "duration": self.factory.reactor.seconds() - self.started,
                  "bytes_in": self.bytes_from_client, "bytes_out": self.bytes_to_client,
                  "reason": self.end_reason}
        # The line is built here (an f-string) and the fields ride along for JSON logs:
        # twisted.logger's own formatting of a many-field format costs more than the
        # rest of a short session's bookkeeping.
        log.info("{line}", line=(
            "session end id={session_id} client={client} user={quoted_user} "
            "backend={backend} duration={duration:.1f}s in={bytes_in} out={bytes_out} "
            "reason={reason}").format(quoted_user=quoted(self.user or None), **fields),
            **fields)
        self.factory.metrics.session_ended(self, reason)
        self.relay = None
        self.session = None

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the client connection (after flushing, unless ``abort``): closing.py."""
        if not self.end_reason:
            self.end_reason = reason
        # The leg unregisters whatever producer is registered: the pre-login gate or,
        # when relaying, the backend's backpressure.
        self._gate = False
        self._holds = 0
        if self.leg is not None:
            self.leg.close(abort)

    def _hold(self, reason: int) -> None:
        """Stop reading the client for ``reason`` (login in progress, replies unread)."""
        if not self._holds:
            self.transport.pauseProducing()
        self._holds |= reason

    def _release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds:
                self.transport.resumeProducing()

    def _add_gate(self) -> None:
        """Before login our replies are the only writes: a client that pipelines commands
        and never reads them must stop being read, or its replies pile up here. Not during
        a TLS handshake: the TLS layer pauses its producer until the handshake is done,
        and we would stop reading the very handshake it waits for."""
        if not self._gate and self.session is not None and not self.end_reason:
            self._gate = True
            self.leg.register(_ReplyBackpressure(self))

    def _drop_gate(self) -> None:
        if self._gate:
            self._gate = False
            self.leg.unregister()
            self._release(HOLD_REPLIES)

    def handshakeCompleted(self) -> None:  # noqa: N802
        """IHandshakeListener: the client's TLS handshake is done (implicit or STARTTLS)."""
        self._add_gate()

    def drain(self) -> None:
        """Graceful shutdown of this session: see Relay.drain; pre-login ones just get BYE."""
        if self.relay is not None:
            self.relay.drain()
        elif self.session is not None and not self.disconnected:
            self._execute(self.session.shutdown())

    def _preauth_timeout(self) -> None:
        self._timer = None
        if self.session is not None:
            self._execute(self.session.timed_out())

    # -- actions --------------------------------------------------------------------------

    def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendToClient):
                write_now(self.transport, action.data)
                self.bytes_to_client += len(action.data)
            elif isinstance(action, StartClientTLS):
                self._drop_gate()
                self.transport.startTLS(self.factory.server_tls)
            elif isinstance(action, Login):
                # Client bytes are still read meanwhile (the session holds them, bounded),
                # so a client that goes away is noticed at once.
                defer.ensureDeferred(self._login(action))
            elif isinstance(action, Splice):
                self._splice(action.trailing)
            elif isinstance(action, Close):
                self.close(action.reason)

    async def _login(self, action: Login) -> None:
        """Penalty first, then lookup and backend login: the path of every login."""
        factory = self.factory
        credentials = action.credentials
        client = self.transport.getPeer()
        names = rewrite(credentials.username, factory.config.username)
        gate = factory.penalty
        password = credentials.password.reveal()
        # The penalty is paid before the directory or a backend sees the credentials
        # (penalty.py): a client that goes away while it waits leaves the queue.
        self._waiting = gate.enter(self._client_key(), gate.user_key(names.lookup))
        try:
            admission = await self._waiting
        except defer.CancelledError:
            return  # the client went away while waiting
        except LoginsRefused as e:
            self._log_login_failed(credentials.username, type(e).__name__, e.reason)
            factory.metrics.login(factory.listener.protocol, "failed", type(e).__name__)
            factory.metrics.refused("penalty")
            self._login_failed(e)
            return
        finally:
            self._waiting = None
        if admission.waited >= 0.001:
            log.info("login delayed id={session_id} client={client} user={user} "
                     "waited={waited:.3f}s", session_id=self.session_id,
                     client=self._client_key(), user=quoted(credentials.username),
                     user_raw=credentials.username, waited=admission.waited)
        started = factory.reactor.seconds()
        try:
            problem = username_problem(credentials.username, factory.config.limits.max_username)
            if problem is not None:
                raise InvalidUsername(problem)
            route = await defer.maybeDeferred(factory.directory.lookup, names.lookup,
                                              factory.listener.protocol, names.backend)
            forward = forwarding.for_login(
                factory.config.backend.forward_client, action.client_id,
                forwarding.ip_endpoint(client), forwarding.ip_endpoint(self.transport.getHost()),
                f"{os.getpid()}-{self.session_id}")
            backend = await factory.connector.login(route, factory.listener.protocol,
                                                    credentials, forward.client_id,
                                                    proxy_header=forward.proxy_header)
        except ProxyError as e:
            guess = isinstance(e, AuthenticationFailed)
            admission.finish(Outcome.FAILURE if guess else Outcome.NEUTRAL,
                             gate.fingerprint(names.lookup, password))
            self._log_login_failed(credentials.username, type(e).__name__,
                                   getattr(e, "detail", ""))
            factory.metrics.login(factory.listener.protocol, "failed", type(e).__name__)
            # A failure is answered no sooner than login_delay after its check began, so
            # an unknown user (the directory answers at once) and a wrong password (the
            # backend takes its time) cannot be told apart by the clock.
            delay = started + factory.config.limits.login_delay - factory.reactor.seconds()
            self._login_failed(e, delay if guess else 0.0)
            return
        except Exception:
            admission.finish(Outcome.NEUTRAL)
            log.failure("unexpected error during login of {user}", user=quoted(
                credentials.username))
            self._login_failed(BackendUnavailable())
            return
        admission.finish(Outcome.SUCCESS)
        if self.disconnected or self.end_reason or self.session is None:
            backend.close()
            return
        refusal = self.ticket.login(names.lookup) if self.ticket is not None else None
        if refusal is not None:
            log.info("login refused id={session_id} client={client} user={user} "
                     "reason={reason}", session_id=self.session_id, client=client.host,
                     user=quoted(credentials.username), user_raw=credentials.username,
                     reason=refusal.value)
            factory.metrics.refused(refusal.name.lower())
            backend.close()
            self._login_failed(TooManyConnections(refusal.value.capitalize()))
            return
        self.user = credentials.username
        self.mechanism = credentials.mechanism
        self.backend = backend
        fields = {"session_id": self.session_id, "client": client.host, "user": self.user,
                  "backend": str(backend.server), "mechanism": self.mechanism,
                  "tls": getattr(self.session, "tls_active", False), "pid": os.getpid()}
        log.info("{line}", line=(
            "login id={session_id} client={client} user={quoted_user} backend={backend} "
            "mechanism={mechanism} tls={tls} pid={pid}").format(
                quoted_user=quoted(self.user), **fields), **fields)
        factory.metrics.login(factory.listener.protocol, "ok")
        assert backend.result is not None
        actions = self.session.login_succeeded(backend.result.capabilities)
        if not actions:  # the session ended while we were logging in (timeout, drain)
            self.backend = None
            backend.close()
            return
        self._execute(actions)

    def _log_login_failed(self, username: str, reason: str, detail: str = "") -> None:
        """``reason`` is the error's name (one word, for parsers); ``detail`` says why."""
        log.info("login failed id={session_id} client={client} user={user} reason={reason}"
                 "{why}", session_id=self.session_id, client=self.transport.getPeer().host,
                 user=quoted(username), user_raw=username, reason=reason,
                 why=f" ({detail})" if detail else "", detail=detail)

    def _client_key(self) -> str:
        if self.ticket is not None:
            return self.ticket.client
        host = getattr(self.transport.getPeer(), "host", "")
        return client_key(host, self.factory.config.limits.ipv6_prefix)

    def _login_failed(self, error: ProxyError, delay: float = 0.0) -> None:
        if self.disconnected or self.end_reason or self.session is None:
            return
        if delay > 0:
            # Never block: the answer is scheduled.
            self._answer = self.factory.reactor.callLater(delay, self._login_failed, error)
            return
        self._answer = None
        self._execute(self.session.login_failed(error))

    def _splice(self, trailing: bytes) -> None:
        backend = self.backend
        assert backend is not None and backend.result is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.session = None  # the pre-login session is done; free it
        factory = self.factory
        relay = Relay(self, backend, factory.reactor, factory.listener.protocol == "imap")
        self.relay = backend.relay = relay
        backend.dialogue = None
        if backend.result.trailing:
            relay.from_backend(backend.result.trailing)
        backend.result = None
        # Backpressure both ways, as twisted.protocols.portforward does (closing.py says
        # why through a Backpressure rather than the transports themselves).
        self._drop_gate()
        self._holds = 0
        self.leg.register(Backpressure(backend.transport))
        backend.leg.register(Backpressure(self.transport))
        if trailing:
            relay.from_client(trailing)
        backend.transport.resumeProducing()
        self.transport.resumeProducing()
        if factory.registry.draining:
            relay.drain()


class ProxyFactory(ServerFactory):
    """Builds FrontendProtocols for one listener, sharing directory and connector."""

    protocol = FrontendProtocol  # type: ignore[assignment]
    noisy = False
    #: logins, session ends (operations.py sets the real one when [metrics] is on)
    metrics: Any = NULL_METRICS

    def __init__(self, reactor: Any, config: Config, listener: Listener, directory: Directory,
                 connector: BackendConnector, registry: SessionRegistry,
                 server_tls: Any = None, *, limiter: ConnectionLimiter | None = None,
                 penalty: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.listener = listener
        self.directory = directory
        self.connector = connector
        self.debug = config.log.level == "debug"
        self.registry = registry
        self.server_tls = server_tls
        # Shared by all listeners when build_service passes them; a factory on its own
        # (tests) gets its own from the config.
        self.limiter = limiter if limiter is not None else ConnectionLimiter.from_limits(
            config.limits)
        #: the brute-force penalty's gate (penaltygate.py)
        self.penalty = penalty if penalty is not None else LocalGate(
            Penalty.from_limits(config.limits, reactor.seconds), reactor)

    def buildProtocol(self, addr: Any) -> FrontendProtocol:  # noqa: N802
        return FrontendProtocol(self)

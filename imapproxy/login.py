# -*- test-case-name: tests.test_login -*-
"""The path of one login, as policy: sans-IO.

A LOGIN (AUTHENTICATE, USER/PASS) goes: the name rewritten ([username]) -> the
brute-force penalty, paid before anyone sees the credentials -> its turn (admission
pacing, [limits] max_login_rate) -> the name checked -> the directory -> what the
backend is told of the client ([backend] forward_client) -> the route's servers in
order (circuit breaker, routing loops) -> the backend's login dialogue -> the
connection limits (with [shared], counted on every instance) -> logged in. This
module decides that order, what each failure means (a guess, or not), what is logged
and counted, and how long a failure waits before it is answered. The adapter
(frontend.py) carries out its actions and sends back what came of each.

The turn comes after the penalty's admission, not before it, for two reasons. A
guesser's attempts wait in the penalty's queues (one at a time per penalised address
or user, bounded), so they cannot fill the line the storm's logins wait in; paced
first, every queued guess would hold a place in that line while it then sat out its
penalty. And a turn is spent right before the lookup it paces, so the rate is the
rate the directory and the backends see; a turn taken before the penalty could be
spent seconds before its lookup, and penalised logins would reach the backends in
bunches. The price: an admitted attempt holds its penalty slot while it waits its
turn, so one address has at most max_parallel_logins_per_ip logins in the line at
once unless its users are known there (the rest wait in the penalty's queue, never
refused for it); the check's clock (login_delay) starts when the turn comes.

``login()`` is a generator: it yields actions (actions.py) and is sent their results
(or thrown their errors), so it reads top to bottom like the login it is, as
mitmproxy's layers do. Its value is a ``LoggedIn`` or a ``Refused``. Nothing here
touches a socket or a clock: the time comes from the ``clock`` it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from . import forwarding
from .actions import (
    ClaimSession,
    CloseBackend,
    CountBackendFailure,
    CountLogin,
    CountRefusal,
    CountTurn,
    Dial,
    FinishPenalty,
    LoginAction,
    LogInAtBackend,
    LoginLog,
    Lookup,
    WaitForPenalty,
    WaitForTurn,
)
from .breaker import CircuitBreaker
from .config import BackendConfig, Config
from .credentials import Credentials
from .directory import Route, Server
from .errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendUnavailable,
    InvalidUsername,
    LoginQueueFull,
    LoginsRefused,
    ProxyError,
    RoutingLoop,
    TooManyConnections,
)
from .imapbackend import ImapBackendLogin
from .limits import Ticket
from .logquote import quoted
from .penalty import Outcome
from .pop3backend import Pop3BackendLogin
from .proxyprotocol import Address
from .routingloops import is_own_listener, names_own_listener
from .sievebackend import SieveBackendLogin
from .usernames import rewrite, username_problem

#: protocol name -> backend login dialogue: (credentials, login, *, starttls, client_id)
BACKEND_DIALOGUES: dict[str, Callable[..., Any]] = {"imap": ImapBackendLogin,
                                                    "pop3": Pop3BackendLogin,
                                                    "managesieve": SieveBackendLogin}


def default_port(backend: BackendConfig, protocol: str) -> int:
    """[backend]'s port for a protocol, for servers the route gives without one."""
    ports = {"imap": backend.imap_port, "pop3": backend.pop3_port,
             "managesieve": backend.managesieve_port}
    return ports[protocol]


@dataclass(frozen=True, slots=True)
class Client:
    """The connection a login comes on, as the login needs to know it."""

    protocol: str
    #: "<pid>-<session number>": the session's id at the backend (x-session-id)
    session_id: str
    session_number: int
    #: (host, port) of the client and of our end, when they are IP addresses
    address: Address | None
    local: Address | None
    #: the unit the limits and the penalty count (limits.client_key)
    client_key: str
    #: for log lines
    host: str
    tls: bool


class Keys(Protocol):
    """The penalty's keyed hashes (penaltygate.py): names and passwords never kept."""

    def user_key(self, user: str) -> bytes: ...

    def fingerprint(self, user: str, password: bytes) -> bytes: ...


class Backend(Protocol):
    """A logged-in backend connection, as the login sees it (backendconn.py)."""

    server: Server
    peer_host: str
    peer_port: int
    local_host: str


@dataclass(frozen=True, slots=True)
class LoggedIn:
    backend: Any
    user: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Refused:
    error: ProxyError
    #: seconds to wait before answering: a failed guess is answered no sooner than
    #: [limits] login_delay after its check began (unknown users and wrong passwords
    #: then take the same time)
    delay: float = 0.0


Flow = Generator[LoginAction, Any, LoggedIn | Refused]


def login(client: Client, credentials: Credentials, client_id: tuple[tuple[str, str | None], ...],
          *, config: Config, breaker: CircuitBreaker[Server], keys: Keys,
          clock: Callable[[], float], ticket: Ticket | None) -> Flow:
    """One login, from the credentials to a logged-in backend or a refusal."""
    names = rewrite(credentials.username, config.username)
    password = credentials.password.reveal()
    # The penalty is paid before the directory or a backend sees the credentials
    # (penalty.py); a client that goes away meanwhile leaves the queue.
    try:
        admission = yield WaitForPenalty(client.client_key, keys.user_key(names.lookup))
    except LoginsRefused as e:
        yield _failed(client, credentials.username, e, e.reason)
        yield CountLogin("failed", type(e).__name__)
        yield CountRefusal("penalty")
        return Refused(e)
    if admission.waited >= 0.001:
        yield _log(client, "info", "login delayed id={session_id} client={client} user={user} "
                   "waited={waited:.3f}s", credentials.username, waited=admission.waited)
    # Then its turn (pacing.py), the last wait before the login costs anything (the
    # directory, a backend); after the penalty: the module docstring says why.
    try:
        waited = yield WaitForTurn()
    except LoginQueueFull as e:
        yield FinishPenalty(admission, Outcome.NEUTRAL)
        yield _log(client, "info", "login refused id={session_id} client={client} user={user} "
                   "reason={reason}", credentials.username, reason=e.reason)
        yield CountRefusal("login_queue")
        return Refused(e)
    if waited is not None:
        yield CountTurn(waited)
        if waited >= 0.001:
            yield _log(client, "info", "login paced id={session_id} client={client} "
                       "user={user} waited={waited:.3f}s", credentials.username, waited=waited)
    started = clock()
    try:
        problem = username_problem(credentials.username, config.limits.max_username)
        if problem is not None:
            raise InvalidUsername(problem)
        route = yield Lookup(names.lookup, client.protocol, names.backend)
        forward = forwarding.for_login(config.backend.forward_client, client_id,
                                       client.address, client.local, client.session_id)
        backend = yield from _backend_login(client, credentials, route, forward,
                                            config=config, breaker=breaker)
    except ProxyError as e:
        guess = isinstance(e, AuthenticationFailed)
        yield FinishPenalty(admission, Outcome.FAILURE if guess else Outcome.NEUTRAL,
                            keys.fingerprint(names.lookup, password))
        yield _failed(client, credentials.username, e, getattr(e, "detail", ""))
        yield CountLogin("failed", type(e).__name__)
        # A guess is answered no sooner than login_delay after its check began, so an
        # unknown user (the directory answers at once) and a wrong password (the backend
        # takes its time) cannot be told apart by the clock.
        delay = started + config.limits.login_delay - clock() if guess else 0.0
        return Refused(e, max(0.0, delay))
    yield FinishPenalty(admission, Outcome.SUCCESS)
    refusal = ticket.login(names.lookup) if ticket is not None else None
    limit = config.limits.max_connections_per_user_ip
    if refusal is None and ticket is not None and limit and config.shared.url is not None:
        # The same limit over every instance, counted in Redis (or, Redis away, here
        # alone: the adapter decides within [shared] timeout).
        refusal = yield ClaimSession(names.lookup, ticket.client, limit)
        if refusal is not None:
            ticket.logout()
    if refusal is not None:
        yield _log(client, "info", "login refused id={session_id} client={client} user={user} "
                   "reason={reason}", credentials.username, reason=refusal.value)
        yield CountRefusal(refusal.name.lower())
        yield CloseBackend(backend)
        return Refused(TooManyConnections(refusal.value.capitalize()))
    yield _log(client, "info", "login id={session_id} client={client} user={user} "
               "backend={backend} mechanism={mechanism} tls={tls} pid={pid}",
               credentials.username, backend=str(backend.server),
               mechanism=credentials.mechanism, tls=client.tls,
               pid=client.session_id.partition("-")[0])
    yield CountLogin("ok")
    return LoggedIn(backend, credentials.username, credentials.mechanism)


def _backend_login(client: Client, credentials: Credentials, route: Route,
                   forward: forwarding.Forwarding, *, config: Config,
                   breaker: CircuitBreaker[Server]) -> Generator[LoginAction, Any, Backend]:
    """The route's servers in order (failed ones last), until one logs the user in."""
    for server in breaker.order(route.servers):
        port = server.port if server.port is not None else default_port(config.backend,
                                                                         client.protocol)
        label = str(Server(server.host, port))
        try:
            if names_own_listener(config.listeners, server.host, port):
                raise RoutingLoop()
            backend = yield Dial(server, port, forward.proxy_header)
            # A host name (or a wildcard listener) can lead back to us: seen once
            # connected, before a byte of the credentials goes out (routingloops.py).
            if is_own_listener(config.listeners, backend.peer_host, backend.peer_port,
                               backend.local_host):
                yield CloseBackend(backend, abort=True)
                raise RoutingLoop()
            dialogue = BACKEND_DIALOGUES[client.protocol](
                credentials, route.login, starttls=config.backend.tls == "starttls",
                client_id=forward.client_id)
            backend = yield LogInAtBackend(backend, dialogue)
        except (BackendUnavailable, BackendProtocolError) as e:
            breaker.mark_failed(server)
            yield CountBackendFailure(label, type(e).__name__)
            if isinstance(e, RoutingLoop):
                yield LoginLog("error", f"refusing backend {label}: it is one of "
                               "this proxy's own listeners (routing loop); fix the map or "
                               "directory entry")
            yield LoginLog("warn", f"backend {server} unavailable for "
                           f"{quoted(credentials.username)}: {e.detail or type(e).__name__}",
                           (("server", str(server)), ("user_raw", credentials.username)))
            continue
        breaker.mark_ok(server)
        logged_in: Backend = backend
        return logged_in
    raise BackendUnavailable("no server of the route could be reached")


def _failed(client: Client, username: str, error: ProxyError, detail: str) -> LoginLog:
    """``reason`` is the error's name (one word, for parsers); the detail says why."""
    return _log(client, "info", "login failed id={session_id} client={client} user={user} "
                "reason={reason}{why}", username, reason=type(error).__name__,
                why=f" ({detail})" if detail else "", detail=detail)


def _log(client: Client, level: str, template: str, username: str,
         **fields: Any) -> LoginLog:
    """One line: client text quoted (logquote.py); the raw fields go along for JSON."""
    values = {"session_id": client.session_number, "client": client.host,
              "user": username, **fields}
    text = template.format(**{**values, "user": quoted(username)})
    return LoginLog(level, text, tuple(values.items()))

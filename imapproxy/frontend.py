# -*- test-case-name: tests.test_frontend -*-
"""The client's connection: a thin adapter that feeds bytes in and carries actions out.

``FrontendProtocol`` serves one client. Before login it feeds the bytes to the
protocol's pre-login session (imap.py, pop3.py) and carries out what that asks; a
login it hands to the login's policy (login.py), carrying out each of its steps
(the penalty's wait, the wait for its turn, the lookup, the backend connection) and
sending back what came of it; once logged in, the relay (relay.py) pumps the bytes.
It decides nothing of its own: what it knows is how to do each action, and the state
of its connection.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import forwarding, login
from .actions import (
    Close,
    Login,
    SendToClient,
    Splice,
    StartClientTLS,
)
from .backendconn import CONNECTION_DONE, BackendProtocol
from .clienttls import NoApplicationProtocol
from .config import Listener
from .errors import ProxyError, TooManyConnections
from .limits import Refusal, Ticket, client_key
from .loginrunner import LoginRunner
from .logquote import quoted
from .protocols import REFUSALS, new_session
from .relay import Relay
from .runtime import Current, Runtime
from .transports import LOGOUT_GRACE, Backpressure, Leg, configure_socket, write_now

log = Logger(namespace="imapproxy")
_session_ids = itertools.count(1)

@implementer(IHandshakeListener)
class FrontendProtocol(Protocol):
    """One client connection: the pre-login session, the login, then the relay."""

    def __init__(self, factory: ProxyFactory, runtime: Runtime) -> None:
        self.factory = factory
        #: the runtime current when the client came (a reload does not change it)
        self.runtime = runtime
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
        self.leg: Leg | None = None
        #: this connection's place in the connection limits (limits.py)
        self.ticket: Ticket | None = None
        self._timer: Any = None
        self._gate = False
        #: a failed login's answer, held back (login.Refused.delay)
        self._answer: Any = None
        #: the login being carried out, or done (its count in the shared state)
        self._runner: LoginRunner | None = None

    @property
    def clock(self) -> Any:
        return self.runtime.shared.reactor

    # -- connection events ----------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        runtime, listener = self.runtime, self.factory.listener
        config, registry = runtime.config, runtime.registry
        self.leg = Leg(self.transport, self.clock)
        self.started = self.clock.seconds()
        configure_socket(self.transport, config.timeouts)
        registry.add(self)
        if registry.draining:
            # The session says it in its own protocol (BYE / -ERR [SYS/TEMP]) and closes.
            self._execute(new_session(listener, config, runtime.shared.sieve).shutdown())
            return
        limiter = runtime.shared.limiter
        admitted = limiter.admit(getattr(self.transport.getPeer(), "host", ""))
        if isinstance(admitted, Refusal):
            runtime.metrics.refused(admitted.name.lower())
            # Answer and close; the listener goes on accepting (unlike Perdition's -L).
            self.transport.write(REFUSALS[listener.protocol](
                TooManyConnections(admitted.value.capitalize() + ", try again later")))
            self.close(admitted.value)
            return
        self.ticket = admitted
        if config.log.level == "debug":
            log.debug("connection id={session_id} client={client} admitted ({count} from there, "
                      "{total} in all)", session_id=self.session_id, client=admitted.client,
                      count=limiter.connections_from(admitted.client), total=limiter.total)
        self.session = new_session(listener, config, runtime.shared.sieve)
        if listener.tls != "implicit":
            self._add_gate()  # with TLS: once the handshake is done (handshakeCompleted)
        self._timer = self.clock.callLater(config.limits.preauth_timeout, self._preauth_timeout)
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
        for timer in (self._timer, self._answer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._runner is not None:
            self._runner.client_gone()
        if self.leg is not None:
            self.leg.lost()
        if self.ticket is not None:
            self.ticket.release()
        if not self.end_reason:
            # An ALPN refusal (ALPACA) is worth telling apart from a client that left.
            self.end_reason = ("TLS: no application protocol"
                               if reason.check(NoApplicationProtocol) else "client closed")
        registry = self.runtime.registry
        backend = self.backend
        if backend is not None:
            if self.relay is not None and self.relay.logout_sent:
                # The backend answers our LOGOUT and closes by itself (RFC 3501 section
                # 6.1.3); closing first could cut the LOGOUT short (Dovecot's TLS login
                # process drops what it had not yet passed on). A drain waits for it,
                # unless it has closed already: its answer can come in while our BYE to
                # the client is still being flushed, and a drain waiting for a
                # connection that is gone would hold a SIGTERM up for [timeouts] drain.
                assert backend.leg is not None
                if not backend.leg.gone:
                    registry.backend_closing(backend)
                    backend.leg.close_after(LOGOUT_GRACE)
            else:
                backend.close()
        # After the backend is in the closing set: a drain waiting for this session
        # must also wait for its backend's answer to our LOGOUT.
        registry.remove(self)
        self._log_end()
        self.runtime.metrics.session_ended(self, reason)
        self.relay = None
        self.session = None

    def _log_end(self) -> None:
        peer = self.transport.getPeer()
        fields = {"session_id": self.session_id, "client": f"{peer.host}:{peer.port}",
                  "user": self.user or "-",
                  "backend": str(self.backend.server) if self.backend else "-",
                  "duration": self.clock.seconds() - self.started,
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

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the client connection (after flushing, unless ``abort``): transports.py."""
        if not self.end_reason:
            self.end_reason = reason
        if self._runner is not None:
            self._runner.stop_waiting()
        # The leg unregisters whatever producer is registered: the pre-login gate or,
        # when relaying, the backend's backpressure.
        self._gate = False
        if self.leg is not None:
            self.leg.close(abort)

    def _add_gate(self) -> None:
        """Before login our replies are the only writes: a client that pipelines commands
        and never reads them must stop being read, or its replies pile up here. Not during
        a TLS handshake: the TLS layer pauses its producer until the handshake is done,
        and we would stop reading the very handshake it waits for."""
        if not self._gate and self.session is not None and not self.end_reason:
            self._gate = True
            assert self.leg is not None
            self.leg.register(Backpressure(self.transport))

    def _drop_gate(self) -> None:
        if self._gate:
            self._gate = False
            assert self.leg is not None
            self.leg.unregister()
            self.transport.resumeProducing()

    def handshakeCompleted(self) -> None:  # noqa: N802
        """IHandshakeListener: the client's TLS handshake is done (implicit or STARTTLS)."""
        self._add_gate()

    def drain(self) -> None:
        """Graceful shutdown of this session: see relaysession.py; pre-login ones get BYE."""
        if self.relay is not None:
            self.relay.drain()
        elif self.session is not None and not self.disconnected:
            self._execute(self.session.shutdown())

    def _preauth_timeout(self) -> None:
        self._timer = None
        if self.session is not None:
            self._execute(self.session.timed_out())

    # -- the pre-login session's actions ----------------------------------------------------

    def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendToClient):
                write_now(self.transport, action.data)
                self.bytes_to_client += len(action.data)
            elif isinstance(action, StartClientTLS):
                self._drop_gate()
                self.transport.startTLS(self.factory.client_tls)
            elif isinstance(action, Login):
                # Client bytes are still read meanwhile (the session holds them, bounded),
                # so a client that goes away is noticed at once.
                self._login(action)
            elif isinstance(action, Splice):
                self._splice(action.trailing)
            elif isinstance(action, Close):
                self.close(action.reason)

    # -- the login: login.py decides, this carries out --------------------------------------

    def _login(self, action: Login) -> None:
        runtime = self.runtime
        shared = runtime.shared
        peer, host = self.transport.getPeer(), self.transport.getHost()
        client = login.Client(
            protocol=self.factory.listener.protocol,
            session_id=f"{os.getpid()}-{self.session_id}", session_number=self.session_id,
            address=forwarding.ip_endpoint(peer), local=forwarding.ip_endpoint(host),
            client_key=self._client_key(), host=getattr(peer, "host", ""),
            tls=getattr(self.session, "tls_active", False))
        flow = login.login(client, action.credentials, action.client_id,
                           config=runtime.config, breaker=shared.breaker, keys=shared.penalty,
                           clock=self.clock.seconds, ticket=self.ticket)
        self._runner = LoginRunner(runtime, client.protocol, self._logged_in)
        defer.ensureDeferred(self._runner.run(flow, action.credentials.username))

    def _logged_in(self, outcome: login.LoggedIn | login.Refused) -> None:
        if isinstance(outcome, login.Refused):
            self._login_failed(outcome.error, outcome.delay)
            return
        backend = outcome.backend
        if self.disconnected or self.end_reason or self.session is None:
            backend.close()
            return
        self.user, self.mechanism, self.backend = outcome.user, outcome.mechanism, backend
        assert backend.result is not None
        actions = self.session.login_succeeded(backend.result.capabilities)
        if not actions:  # the session ended while we were logging in (timeout, drain)
            self.backend = None
            backend.close()
            return
        self._execute(actions)

    def _client_key(self) -> str:
        if self.ticket is not None:
            return self.ticket.client
        host = getattr(self.transport.getPeer(), "host", "")
        return client_key(host, self.runtime.config.limits.ipv6_prefix)

    def _login_failed(self, error: ProxyError, delay: float = 0.0) -> None:
        if self.disconnected or self.end_reason or self.session is None:
            return
        if delay > 0:
            # Never block: the answer is scheduled.
            self._answer = self.clock.callLater(delay, self._login_failed, error)
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
        relay = Relay(self, backend, self.clock, self.factory.listener.protocol)
        self.relay = backend.relay = relay
        backend.dialogue = None
        if backend.result.trailing:
            relay.from_backend(backend.result.trailing)
        backend.result = None
        # Backpressure both ways, as twisted.protocols.portforward does (transports.py
        # says why through a Backpressure rather than the transports themselves).
        self._drop_gate()
        assert self.leg is not None and backend.leg is not None
        self.leg.register(Backpressure(backend.transport))
        backend.leg.register(Backpressure(self.transport))
        if trailing:
            relay.from_client(trailing)
        backend.transport.resumeProducing()
        self.transport.resumeProducing()
        if self.runtime.registry.draining:
            relay.drain()


class ProxyFactory(ServerFactory):
    """Builds FrontendProtocols for one listener, each with the runtime current then."""

    protocol = FrontendProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, current: Current, listener: Listener, client_tls: Any = None) -> None:
        self.current = current
        self.listener = listener
        #: the client TLS of this listener (clienttls.ServerTLS.for_protocol), for STARTTLS
        self.client_tls = client_tls

    def buildProtocol(self, addr: Any) -> FrontendProtocol:  # noqa: N802
        return FrontendProtocol(self, self.current.runtime)

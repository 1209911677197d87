"""Every live client session of this process: one timer for all, graceful drain, undrain."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .config import Timeouts

log = Logger(namespace="imapproxy")


class SessionRegistry:
    """Tracks FrontendProtocols; sweeps relayed ones for timeouts and keepalives."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.sessions: set[Any] = set()
        #: backend connections of ended sessions, closing after our LOGOUT
        self.closing: set[Any] = set()
        #: new connections are told BYE / -ERR and closed (frontend.py)
        self.draining = False
        #: the process is going away (the SIGTERM drain): no undrain
        self.stopping = False
        #: [timeouts] drain_notice is running: /readyz says 503, sessions go on
        self.leaving = False
        #: the timer of an announced drain that undrain() may call off (drain_after)
        self._announced: Any = None
        #: drains under way: (fires when done, its sessions, their backends)
        self._drains: list[tuple[defer.Deferred[None], set[Any], set[Any]]] = []

    def add(self, session: Any) -> None:
        self.sessions.add(session)

    def remove(self, session: Any) -> None:
        self.sessions.discard(session)
        self._check_drained()

    def backend_closing(self, backend: Any) -> None:
        """A session ended with LOGOUT to its backend: a drain waits for the backend too."""
        self.closing.add(backend)
        backend.registry = self

    def backend_closed(self, backend: Any) -> None:
        self.closing.discard(backend)
        self._check_drained()

    def _check_drained(self) -> None:
        for drain in list(self._drains):
            done, sessions, backends = drain
            if not (sessions & self.sessions) and not (backends & self.closing):
                self._drains.remove(drain)
                done.callback(None)

    def sweep(self, timeouts: Timeouts) -> None:
        """The one timer: idle/inactivity timeouts and IDLE keepalives for every session."""
        now = self.clock.seconds()
        for session in list(self.sessions):
            relay = session.relay
            if relay is not None:
                relay.tick(now, timeouts)

    def drain(self, timeout: float, *, stopping: bool = False) -> defer.Deferred[None]:
        """End every session without losing anything; close what is left after ``timeout``
        seconds ([timeouts] drain).

        ``stopping``: this is the process's last drain (SIGTERM); undrain() refuses then.
        """
        self._cancel_announced()
        self.draining = True
        self.stopping = self.stopping or stopping
        log.info("draining {count} sessions (at most {timeout:g}s)", count=len(self.sessions),
                 timeout=timeout)
        if not self.sessions and not self.closing:
            return defer.succeed(None)
        # The drain (and its deadline) is about what it ends: its sessions, their
        # backends waiting for our LOGOUT, and the backends already doing so. After an
        # undrain, sessions that came in since are none of its business.
        ending = list(self.sessions)
        backends = [*self.closing, *(s.backend for s in ending if s.backend is not None)]
        done: defer.Deferred[None] = defer.Deferred()
        self._drains.append((done, set(ending), set(backends)))
        for session in ending:
            session.drain()
        self._check_drained()
        if not done.called:
            deadline = self.clock.callLater(timeout, self._force_close, ending, backends)

            def stop_deadline(result: object) -> object:
                if deadline.active():
                    deadline.cancel()
                return result

            done.addBoth(stop_deadline)
        return done

    def announce(self, notice: float, *, stopping: bool = False) -> defer.Deferred[None]:
        """Say a drain is coming ([timeouts] drain_notice): for ``notice`` seconds /readyz
        answers 503 while every session, new ones too, goes on, so that a load balancer
        takes this instance out of its pool before the drain sends the clients back
        through it. Fires when the notice is over (at once without one).

        ``stopping``: the process is going away (SIGTERM): from now on undrain() refuses,
        so nothing calls the notice off; otherwise undrain() may.
        """
        self.stopping = self.stopping or stopping
        over: defer.Deferred[None] = defer.Deferred()
        if notice <= 0:
            over.callback(None)
            return over
        self.leaving = True
        log.info("drain announced{why}: /readyz answers 503; the drain begins in {notice:g}s",
                 why=" (stopping)" if stopping else "", notice=notice)
        timer = self.clock.callLater(notice, over.callback, None)
        if not stopping:
            self._announced = timer
        return over

    def drain_after(self, notice: float, timeout: float) -> None:
        """The admin's drain: announced first (announce()), then drain(timeout)."""
        if self.draining or self.leaving:
            return  # under way already, announced or not
        self.announce(notice).addCallback(lambda _: self.drain(timeout))

    def _cancel_announced(self) -> None:
        announced, self._announced = self._announced, None
        if announced is not None and announced.active():
            announced.cancel()

    def undrain(self) -> bool:
        """Accept new sessions again after a drain; False if the process is stopping.

        Sessions the drain ended stay ended, and those still ending keep their deadline
        (they were told to go: a command in flight finishes, then BYE). A later drain
        waits for the sessions of its own time.
        """
        if self.stopping:
            return False
        if self._announced is not None:
            log.info("undrain: the announced drain will not begin")
        self._cancel_announced()
        self.leaving = False
        if self.draining:
            log.info("undrain: accepting new sessions again ({count} still ending)",
                     count=len(self.sessions))
        self.draining = False
        return True

    def _force_close(self, sessions: list[Any], backends: list[Any]) -> None:
        left = [session for session in sessions if session in self.sessions]
        if left:
            log.warn("drain timeout: closing {count} sessions", count=len(left))
        for session in left:
            session.close("drain timeout", abort=True)
        for backend in backends:
            if backend in self.closing:
                backend.close(abort=True)

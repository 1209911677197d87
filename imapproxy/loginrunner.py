# -*- test-case-name: tests.test_loginrunner -*-
"""One login carried out on the reactor: login.py decides, ``LoginRunner`` does.

login.py's generator yields the login's actions (the penalty's wait, its turn, the
lookup, the dial, the backend dialogue, log lines, counters, the shared session count);
the runner performs each and sends back what came of it (a value, or an error thrown
into the flow, which decides what it means), until the flow returns ``LoggedIn`` or
``Refused``, which goes to ``done``. The client connection (frontend.py) tells it two
things: ``stop_waiting()`` when its session ends (a pre-login timeout, a drain: a login
waiting for the penalty or its turn leaves that queue at once), and ``client_gone()``
when the connection is lost (then nothing is left to log in: what the login brought, a
backend connection or an admission, is given back as soon as it comes).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from . import login
from .actions import (
    ClaimSession,
    CloseBackend,
    CountBackendFailure,
    CountLogin,
    CountRefusal,
    CountTurn,
    Dial,
    FinishPenalty,
    LogInAtBackend,
    LoginLog,
    Lookup,
    WaitForPenalty,
    WaitForTurn,
)
from .backendconn import BackendProtocol
from .errors import BackendUnavailable
from .limits import Refusal
from .logquote import quoted
from .penalty import Outcome
from .runtime import Runtime

log = Logger(namespace="imapproxy")

#: the login's steps that wait for something outside (the client may leave meanwhile)
_AWAITED = frozenset({WaitForPenalty, WaitForTurn, Lookup, Dial, LogInAtBackend,
                      ClaimSession})


class LoginRunner:
    """Runs one login's flow for one client connection of ``protocol``."""

    def __init__(self, runtime: Runtime, protocol: str,
                 done: Callable[[login.LoggedIn | login.Refused], None]) -> None:
        self.runtime = runtime
        self.protocol = protocol
        self.done = done
        #: what the login waits for that a queue holds: the penalty's admission
        #: (penaltygate.py) or its turn (pacinggate.py)
        self.waiting: defer.Deferred[Any] | None = None
        #: the session as counted in the shared state (redisstate.py), if it is
        self.claim: Any = None
        self.gone = False

    def stop_waiting(self) -> None:
        """The session ended: a login waiting in a queue leaves it now, not when the
        client has read our last words and gone."""
        if self.waiting is not None:
            self.waiting.cancel()

    def client_gone(self) -> None:
        """The connection is lost: stop waiting, and give back the session's count."""
        self.gone = True
        self.stop_waiting()
        if self.claim is not None:
            self.runtime.shared.state.release(self.claim)
            self.claim = None

    async def run(self, flow: Generator[Any, Any, login.LoggedIn | login.Refused],
                  username: str) -> None:
        result: Any = None
        error: BaseException | None = None
        admission: Any = None  # finished by the flow; by us only if the flow breaks
        while True:
            try:
                step = flow.send(result) if error is None else flow.throw(error)
            except StopIteration as finished:
                self.done(finished.value)
                return
            except Exception:
                log.failure("unexpected error during login of {user}", user=quoted(username))
                if admission is not None:
                    admission.finish(Outcome.NEUTRAL)
                self.done(login.Refused(BackendUnavailable()))
                return
            result, error = None, None
            try:
                result = self._perform(step)
                if isinstance(result, defer.Deferred):
                    result = await result
            except defer.CancelledError:
                # The client went away (or its session ended) while the login waited for
                # the penalty or for its turn: an admission it holds is given back.
                flow.close()
                if admission is not None:
                    admission.finish(Outcome.NEUTRAL)
                return
            except Exception as e:  # noqa: BLE001 - the flow decides; what it does not
                error = e           # handle comes back out of it, and is logged above
            if isinstance(step, WaitForPenalty) and error is None:
                admission = result
            elif isinstance(step, FinishPenalty):
                admission = None
            if self.gone and type(step) in _AWAITED:
                # The client went away while the login waited for the directory or a
                # backend: nobody is left to log in. A backend connection it brought is
                # closed (logged in there or not), an admission given back.
                flow.close()
                if isinstance(result, BackendProtocol):
                    result.close(abort=True)
                if admission is not None:
                    admission.finish(Outcome.NEUTRAL)
                return

    def _perform(self, step: Any) -> Any:
        """One action of the login's; its result (maybe a Deferred), or raises."""
        runtime = self.runtime
        if isinstance(step, LoginLog):
            getattr(log, step.level)("{line}", line=step.text, **dict(step.fields))
        elif isinstance(step, CountLogin):
            runtime.metrics.login(self.protocol, step.result, step.reason)
        elif isinstance(step, CountRefusal):
            runtime.metrics.refused(step.limit)
        elif isinstance(step, CountBackendFailure):
            runtime.metrics.backend_failed(step.backend, step.reason)
        elif isinstance(step, WaitForPenalty):
            self.waiting = runtime.shared.penalty.enter(step.address, step.user_key)
            return self.waiting.addBoth(self._waited)
        elif isinstance(step, WaitForTurn):
            turn = runtime.shared.pacer.enter()  # raises LoginQueueFull into the flow
            if isinstance(turn, defer.Deferred):
                self.waiting = turn
                return turn.addBoth(self._waited)
            return turn
        elif isinstance(step, CountTurn):
            runtime.metrics.login_turn(step.waited)
        elif isinstance(step, FinishPenalty):
            step.admission.finish(step.outcome, step.fingerprint)  # type: ignore[attr-defined]
        elif isinstance(step, Lookup):
            return defer.maybeDeferred(runtime.directory.lookup, step.name, step.protocol,
                                       step.backend_login)
        elif isinstance(step, Dial):
            return defer.ensureDeferred(runtime.connector.dial(
                step.server, step.port, step.proxy_header))  # type: ignore[arg-type]
        elif isinstance(step, LogInAtBackend):
            return defer.ensureDeferred(runtime.connector.log_in(
                step.backend, step.dialogue))  # type: ignore[arg-type]
        elif isinstance(step, CloseBackend):
            step.backend.close(step.abort)  # type: ignore[attr-defined]
        elif isinstance(step, ClaimSession):
            state = runtime.shared.state
            if state is None:
                return None
            return state.claim(step.user, step.client, step.limit).addCallback(self._claimed)
        return None

    def _claimed(self, claim: Any) -> Refusal | None:
        if claim is None:
            return Refusal.PER_USER_CLIENT
        if self.gone:
            self.runtime.shared.state.release(claim)  # gone while it was counted
        else:
            self.claim = claim
        return None

    def _waited(self, result: Any) -> Any:
        self.waiting = None
        return result

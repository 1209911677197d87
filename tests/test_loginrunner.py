"""loginrunner: a login's flow carried out on a Clock, with stand-ins for what it asks
(the penalty's gate, the directory, the backend connector); the whole login with real
parts is in tests/test_frontend.py and tests/integration/."""

from __future__ import annotations

from collections.abc import Generator
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from imapproxy import login
from imapproxy.actions import ClaimSession, Lookup, WaitForPenalty
from imapproxy.errors import BackendUnavailable, DirectoryUnavailable
from imapproxy.loginrunner import LoginRunner
from imapproxy.penalty import Outcome


class Admission:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.waited = 0.0

    def finish(self, outcome: Outcome, fingerprint: bytes = b"") -> None:
        self.outcomes.append(outcome)


class Parts:
    """The runtime's parts a login asks, each answering with a Deferred we hold."""

    def __init__(self) -> None:
        self.entered: defer.Deferred[Any] = defer.Deferred()
        self.looked_up: defer.Deferred[Any] = defer.Deferred()
        self.released: list[Any] = []
        self.claims: defer.Deferred[Any] = defer.Deferred()
        self.runtime = SimpleNamespace(
            shared=SimpleNamespace(penalty=SimpleNamespace(enter=lambda *a: self.entered),
                                   state=SimpleNamespace(claim=lambda *a: self.claims,
                                                         release=self.released.append)),
            directory=SimpleNamespace(lookup=lambda *a: self.looked_up),
            metrics=SimpleNamespace())


def run(parts: Parts, flow: Generator[Any, Any, Any]) -> tuple[LoginRunner, list[Any]]:
    done: list[Any] = []
    runner = LoginRunner(parts.runtime, "imap", done.append)  # type: ignore[arg-type]
    defer.ensureDeferred(runner.run(flow, "alice"))
    return runner, done


def test_each_step_is_performed_and_its_answer_sent_back() -> None:
    seen: list[Any] = []

    def flow() -> Generator[Any, Any, Any]:
        admission = yield WaitForPenalty("192.0.2.7", b"k")
        seen.append(admission)
        route = yield Lookup("alice", "imap", "alice")
        seen.append(route)
        return login.Refused(BackendUnavailable())

    parts = Parts()
    runner, done = run(parts, flow())
    assert runner.waiting is parts.entered and done == []
    admission = Admission()
    parts.entered.callback(admission)
    assert runner.waiting is None and seen == [admission]
    parts.looked_up.callback("the route")
    assert seen == [admission, "the route"] and len(done) == 1


def test_an_error_goes_into_the_flow_which_decides() -> None:
    def flow() -> Generator[Any, Any, Any]:
        try:
            yield Lookup("alice", "imap", "alice")
        except DirectoryUnavailable as e:
            return login.Refused(e)
        return None

    parts = Parts()
    _runner, done = run(parts, flow())
    parts.looked_up.errback(DirectoryUnavailable("down"))
    assert isinstance(done[0].error, DirectoryUnavailable)


def test_stop_waiting_leaves_the_queue_and_ends_the_login_quietly() -> None:
    def flow() -> Generator[Any, Any, Any]:
        yield WaitForPenalty("192.0.2.7", b"k")
        raise AssertionError("never admitted")

    parts = Parts()
    runner, done = run(parts, flow())
    runner.stop_waiting()
    assert parts.entered.called and done == []  # cancelled: no answer to anyone


def test_a_client_gone_during_a_lookup_gives_the_admission_back() -> None:
    def flow() -> Generator[Any, Any, Any]:
        yield WaitForPenalty("192.0.2.7", b"k")
        yield Lookup("alice", "imap", "alice")
        raise AssertionError("nobody is left to log in")

    parts = Parts()
    runner, done = run(parts, flow())
    admission = Admission()
    parts.entered.callback(admission)
    runner.client_gone()
    parts.looked_up.callback("the route")
    assert admission.outcomes == [Outcome.NEUTRAL] and done == []


def test_a_session_counted_after_the_client_left_is_released_at_once() -> None:
    def flow() -> Generator[Any, Any, Any]:
        yield ClaimSession("alice", "192.0.2.7", 3)
        return login.Refused(BackendUnavailable())

    parts = Parts()
    runner, _done = run(parts, flow())
    runner.client_gone()
    parts.claims.callback("claim-1")
    assert parts.released == ["claim-1"] and runner.claim is None
    # Counted while the client is there: released when it goes.
    parts = Parts()
    runner, _done = run(parts, flow())
    parts.claims.callback("claim-2")
    assert runner.claim == "claim-2" and parts.released == []
    runner.client_gone()
    assert parts.released == ["claim-2"]


def test_a_flow_that_breaks_is_logged_and_refused_and_its_admission_given_back() -> None:
    def flow() -> Generator[Any, Any, Any]:
        yield WaitForPenalty("192.0.2.7", b"k")
        raise KeyError("a bug")

    parts = Parts()
    with capturedLogs() as events:
        _runner, done = run(parts, flow())
        admission = Admission()
        parts.entered.callback(admission)
    assert isinstance(done[0].error, BackendUnavailable)
    assert admission.outcomes == [Outcome.NEUTRAL]
    assert any("unexpected error during login of <alice>" in formatEvent(e) for e in events)

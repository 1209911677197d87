"""sharedgate: the penalty shared through Redis in front of the local gate, on a
MemoryReactorClock with a stand-in for RedisState (the real one against a real Redis:
tests/test_redisstate.py)."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from imapproxy.config import Limits
from imapproxy.penalty import Outcome, Penalty, Refused, user_key
from imapproxy.penaltygate import LocalGate, LoginsRefused
from imapproxy.sharedgate import SharedGate
from imapproxy.sharedstate import BUSY, PenaltySettings, Verdict


def gate(**kwargs: object) -> tuple[LocalGate, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return LocalGate(Penalty(clock.seconds, **kwargs), clock), clock  # type: ignore[arg-type]


# -- shared by instances through Redis (the state faked; tests/test_redisstate.py has Redis)


class FakeState:
    """RedisState as SharedGate uses it: answers given by hand."""

    def __init__(self, key: bytes | None = b"s" * 32) -> None:
        self.enabled = True
        self.key = key
        self.asked: list[tuple[str, bytes, str, defer.Deferred[object]]] = []
        self.finished: list[tuple[str, bytes, str, str, bytes]] = []
        self.left: list[str] = []
        #: START's answers, in turn (then: start now); None is "Redis unavailable"
        self.waits: list[float | None] = []
        self.started: list[str] = []
        #: START asked, not answered yet: when set, each START waits for a callback
        self.hold_starts = False
        self.held: list[defer.Deferred[float | None]] = []

    def start(self, address: str, ukey: bytes, token: str) -> defer.Deferred[float | None]:
        self.started.append(token)
        if self.hold_starts:
            d: defer.Deferred[float | None] = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(self.waits.pop(0) if self.waits else 0.0)

    def enter(self, address: str, ukey: bytes, token: str,
              settings: PenaltySettings) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.asked.append((address, ukey, token, d))
        return d

    def finish(self, address: str, ukey: bytes, token: str, outcome: str, fingerprint: bytes,
               settings: PenaltySettings) -> None:
        self.finished.append((address, ukey, token, outcome, fingerprint))

    def leave(self, address: str, ukey: bytes, token: str) -> None:
        self.left.append(token)


def shared(**limits: object) -> tuple[SharedGate, LocalGate, FakeState, MemoryReactorClock]:
    local, clock = gate()
    state = FakeState()
    return SharedGate(local, state, clock, Limits(**limits)), local, state, clock  # type: ignore[arg-type]


def test_the_shared_turn_is_waited_for_then_the_local_gate() -> None:
    g, local, state, clock = shared()
    ukey = g.user_key("alice")
    assert ukey == user_key(b"s" * 32, "alice") != local.user_key("alice")
    entered = g.enter("192.0.2.7", ukey)
    (address, asked_key, token, answer), = state.asked
    assert (address, asked_key) == ("192.0.2.7", ukey) and not entered.called
    answer.callback(Verdict(False, 1, 1, 2.5, 2))
    assert not entered.called and local.penalty.waiting == 0, "waits before the local gate"
    # At its turn it asks whether it may start: an earlier check still runs (START
    # says so twice: asked again 0.1 s later, then 0.2 s); then the penalty since that
    # one's end (1.5 s more).
    state.waits = [BUSY, BUSY, 1.5]
    clock.advance(2.5)
    assert state.started == [token] and not entered.called
    clock.advance(0.1)
    assert state.started == [token] * 2 and not entered.called
    clock.advance(0.2)
    assert state.started == [token] * 3 and not entered.called
    clock.advance(1.5)
    assert state.started == [token] * 4
    admission = entered.result
    assert admission.waited == pytest.approx(4.3)
    admission.finish(Outcome.FAILURE, g.fingerprint("alice", b"guess"))
    assert state.finished == [("192.0.2.7", ukey, token, "failure",
                               g.fingerprint("alice", b"guess"))]
    assert local.penalty.failures("192.0.2.7", "x") == (1, 0), "the local gate learnt it too"
    assert state.left == []


def test_no_turn_no_start_and_redis_gone_at_the_turn_starts() -> None:
    g, _local, state, clock = shared()
    entered = g.enter("192.0.2.7", g.user_key("alice"))
    state.asked[0][3].callback(Verdict(False, 0, 0, 0.0, 0))
    assert entered.called and state.started == [], "no penalised lane: nothing to ask"
    again = g.enter("192.0.2.7", g.user_key("alice"))
    state.waits = [None]
    state.asked[1][3].callback(Verdict(False, 1, 0, 1.0, 1))
    clock.advance(1.0)
    assert again.called, "Redis gone at its turn: the local gate decides"


def test_what_other_instances_know_reaches_the_local_gate() -> None:
    g, local, state, clock = shared()
    mate = local.enter("192.0.2.7", g.user_key("mate")).result
    mate.finish(Outcome.FAILURE, b"typo")  # penalised here
    entered = g.enter("192.0.2.7", g.user_key("alice"))
    state.asked[0][3].callback(Verdict(True, 1, 0, 0.0, 0))  # known there, elsewhere
    assert entered.called, "the owner's known address skips the local penalty"


def test_refused_by_the_shared_lanes() -> None:
    g, _local, state, _clock = shared()
    entered = g.enter("192.0.2.7", g.user_key("alice"))
    state.asked[0][3].callback(Refused("too many login attempts waiting for this user"))
    failures: list[object] = []
    entered.addErrback(failures.append)
    assert failures and failures[0].check(LoginsRefused)  # type: ignore[attr-defined]
    assert failures[0].value.reason == "too many login attempts waiting for this user"  # type: ignore[attr-defined]


def test_redis_unavailable_is_the_local_gate_alone() -> None:
    g, local, state, _clock = shared()
    entered = g.enter("192.0.2.7", g.user_key("alice"))
    state.asked[0][3].callback(None)
    assert entered.called and entered.result.waited == 0
    state.enabled = False
    assert g.enter("192.0.2.7", g.user_key("alice")).called and len(state.asked) == 1
    state.enabled, state.key = True, None
    assert g.user_key("alice") == local.user_key("alice"), "no shared key yet: local hashes"


def test_exempt_addresses_never_reach_redis() -> None:
    g, _local, state, _clock = shared(penalty_exempt=("10.0.0.0/8",))
    assert g.enter("10.1.2.3", g.user_key("webmail")).called
    assert state.asked == []
    g.reconfigure(Limits())
    g.enter("10.1.2.3", g.user_key("webmail"))
    assert len(state.asked) == 1, "a reload changes the exempt networks"


def test_a_client_gone_while_waiting_gives_its_turn_back() -> None:
    g, local, state, clock = shared()
    entered = g.enter("192.0.2.7", g.user_key("alice"))
    entered.addErrback(lambda f: f.trap(defer.CancelledError))
    state.asked[0][3].callback(Verdict(False, 1, 1, 2.0, 2))
    entered.cancel()
    assert state.left == [state.asked[0][2]]
    clock.advance(5)
    assert local.penalty.waiting == 0 and not clock.getDelayedCalls()
    # Gone before Redis answered: the turns are given back once it has.
    early = g.enter("192.0.2.7", g.user_key("alice"))
    early.addErrback(lambda f: f.trap(defer.CancelledError))
    early.cancel()
    state.asked[1][3].callback(Verdict(False, 1, 1, 4.0, 2))
    assert state.left[-1] == state.asked[1][2]
    # Gone while START was asked: given back once it is answered.
    state.hold_starts = True
    fourth = g.enter("192.0.2.7", g.user_key("alice"))
    fourth.addErrback(lambda f: f.trap(defer.CancelledError))
    state.asked[-1][3].callback(Verdict(False, 1, 1, 0.0, 2))
    assert state.started[-1] == state.asked[-1][2]
    fourth.cancel()
    assert state.left[-1] != state.asked[-1][2], "not before START's answer"
    state.held[-1].callback(0.0)
    assert state.left[-1] == state.asked[-1][2]
    state.hold_starts = False
    # Gone while the local gate held it: the local queue lets it go, the turn too.
    local.enter("192.0.2.9", b"x").result.finish(Outcome.FAILURE, b"f")
    third = g.enter("192.0.2.9", g.user_key("bob"))
    third.addErrback(lambda f: f.trap(defer.CancelledError))
    state.asked[-1][3].callback(Verdict(False, 0, 0, 0.0, 1))
    assert not third.called and local.penalty.waiting == 1
    third.cancel()
    assert local.penalty.waiting == 0 and state.left[-1] == state.asked[-1][2]

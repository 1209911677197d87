"""penaltygate: the penalty on a reactor: admissions as Deferreds, one timer."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from imapproxy.config import Limits
from imapproxy.penalty import Outcome, Penalty
from imapproxy.penaltygate import LocalGate, LoginsRefused


def gate(**kwargs: object) -> tuple[LocalGate, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return LocalGate(Penalty(clock.seconds, **kwargs), clock), clock  # type: ignore[arg-type]


def test_admitted_at_once_then_after_the_penalty_on_one_timer() -> None:
    g, clock = gate()
    first = g.enter("192.0.2.7", g.user_key("alice"))
    admission = first.result
    admission.finish(Outcome.FAILURE, g.fingerprint("alice", b"typo"))
    second = g.enter("192.0.2.7", g.user_key("alice"))
    third = g.enter("192.0.2.7", g.user_key("bob"))
    assert not second.called and not third.called
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2)
    assert second.called and not third.called  # one at a time
    assert second.result.waited == 2
    second.result.finish(Outcome.SUCCESS)
    clock.advance(2)
    assert third.called


def test_cancelling_leaves_the_queue() -> None:
    g, clock = gate()
    g.enter("192.0.2.7", g.user_key("alice")).result.finish(
        Outcome.FAILURE, g.fingerprint("alice", b"x"))
    waiting = g.enter("192.0.2.7", g.user_key("alice"))
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    waiting.cancel()
    assert g.penalty.waiting == 0
    newcomer = g.enter("192.0.2.7", g.user_key("alice"))
    clock.advance(2)
    assert newcomer.called


def test_a_full_queue_is_refused_unchecked() -> None:
    g, _clock = gate(parallel=1)
    g.enter("192.0.2.7", g.user_key("x")).result.finish(
        Outcome.FAILURE, g.fingerprint("x", b"typo"))  # penalised: its queue is bounded
    queued = [g.enter("192.0.2.7", g.user_key(f"user{i}")) for i in range(16)]
    refused = g.enter("192.0.2.7", g.user_key("user99"))
    failures: list[object] = []
    refused.addErrback(failures.append)
    assert failures and failures[0].check(LoginsRefused)  # type: ignore[attr-defined]
    assert not any(d.called for d in queued)


def test_reload_applies_the_new_settings_to_the_gate() -> None:
    g, _clock = gate()
    g.reconfigure(Limits(login_delay=1, login_delay_max=4, penalty_exempt=("10.0.0.0/8",)))
    assert g.penalty.cap == 4 and g.penalty.is_exempt("10.1.2.3")

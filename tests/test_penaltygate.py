"""The penalty on a reactor: admissions as Deferreds, one timer, and sharing with workers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock

from imapproxy.config import Limits
from imapproxy.penalty import Outcome, Penalty
from imapproxy.penaltygate import (
    LocalGate,
    LoginsRefused,
    RemoteGate,
    _GateServerService,
    process_gate,
)


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


def test_one_process_keeps_its_own_gate() -> None:
    local, service, path = process_gate(Limits(), MemoryReactorClock(), workers=1,
                                        worker=False, socket_path=None)
    assert isinstance(local, LocalGate) and service is None and path is None


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_workers_share_the_main_process_penalty(tmp_path: Path) -> None:
    """A failure seen by one worker holds back the next attempt on another, and names
    are hashed alike everywhere; without the main process a worker counts alone."""
    main = LocalGate(Penalty(reactor.seconds, base=0.3, cap=0.3), reactor)
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    server = _GateServerService(reactor, str(directory), main)
    server.startService()
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    workers = [RemoteGate(reactor, server.path, LocalGate(Penalty(reactor.seconds), reactor))
               for _ in range(2)]
    for worker in workers:
        worker.service.startService()
    try:
        for _ in range(100):
            if all(w.shared for w in workers):
                break
            await sleep(0.02)
        assert all(w.shared for w in workers)
        a, b = workers
        assert a.user_key("alice") == b.user_key("alice") == main.user_key("alice")
        admission = await a.enter("192.0.2.7", a.user_key("alice"))
        admission.finish(Outcome.FAILURE, a.fingerprint("alice", b"typo"))
        await sleep(0.05)
        assert main.penalty.failures("192.0.2.7", "alice") == (1, 1)
        started = reactor.seconds()
        admission = await b.enter("192.0.2.7", b.user_key("alice"))
        assert reactor.seconds() - started >= 0.2, "the other worker waited the penalty too"
        admission.finish(Outcome.SUCCESS)
        # A client gone while waiting leaves the main process's queue.
        admission = await b.enter("192.0.2.8", b.user_key("bob"))
        admission.finish(Outcome.FAILURE, b.fingerprint("bob", b"x"))
        waiting = a.enter("192.0.2.8", a.user_key("bob"))
        waiting.addErrback(lambda f: f.trap(defer.CancelledError))
        await sleep(0.05)
        assert main.penalty.waiting == 1
        waiting.cancel()
        await sleep(0.05)
        assert main.penalty.waiting == 0
    finally:
        await server.stopService()
    await sleep(0.1)
    assert not directory.exists(), "the private directory goes with the service"
    assert not workers[0].shared
    admission = await workers[0].enter("192.0.2.9", workers[0].user_key("carol"))
    assert admission is not None  # counted alone meanwhile
    for worker in workers:
        worker.service.stopService()

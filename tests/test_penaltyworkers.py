"""penaltyworkers: one penalty for every worker, over AMP on a UNIX socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock

from imapproxy.config import Limits
from imapproxy.penalty import Outcome, Penalty
from imapproxy.penaltygate import LocalGate
from imapproxy.penaltyworkers import RemoteGate, _GateServerService, process_gate


def gate(**kwargs: object) -> tuple[LocalGate, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return LocalGate(Penalty(clock.seconds, **kwargs), clock), clock  # type: ignore[arg-type]


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def test_one_process_keeps_its_own_gate() -> None:
    local, service, path = process_gate(Limits(), MemoryReactorClock(), workers=1,
                                        worker=False, socket_path=None)
    assert isinstance(local, LocalGate) and service is None and path is None


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
        # What other instances know goes along to the main process (the shared state):
        # a user known at this address elsewhere passes its penalty at once.
        known = await b.enter("192.0.2.7", b.user_key("carol"), known=True)
        assert known.waited < 0.2, "not the 0.3 s penalty"
        known.finish(Outcome.SUCCESS)
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

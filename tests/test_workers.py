"""workers: a worker stops when the main process is gone (ParentWatch), and the pool's
command line; the listening and the spreading over workers run in
tests/integration/test_push.py and test_operator.py."""

from __future__ import annotations

import os
import sys

from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from imapproxy.workers import ParentWatch, WorkerPool


class _Reactor(MemoryReactorClock):
    """Counts stop() calls (hasStopped's start value differs between Twisted versions)."""

    stops = 0

    def stop(self) -> None:
        self.stops += 1


def _watching() -> tuple[ParentWatch, _Reactor, int]:
    read_end, write_end = os.pipe()
    reactor = _Reactor()
    watch = ParentWatch(reactor, read_end)
    watch.startService()
    return watch, reactor, write_end


def test_the_worker_stops_when_the_main_process_closes_its_end() -> None:
    watch, reactor, write_end = _watching()
    (pipe,) = reactor.getReaders()
    os.write(write_end, b"ignored")  # whatever the main writes is read and dropped
    assert pipe.doRead() is None and reactor.stops == 0
    os.close(write_end)  # what the kernel does when the main process dies, SIGKILL too
    result = pipe.doRead()
    assert result is CONNECTION_DONE  # EOF: the reactor calls connectionLost
    pipe.connectionLost(Failure(result))  # as the reactor does
    assert reactor.stops == 1  # the shutdown drains the sessions, as on SIGTERM
    assert reactor.getReaders() == []
    os.close(pipe.fd)


def test_a_stopping_worker_stops_watching_and_does_not_stop_twice() -> None:
    watch, reactor, write_end = _watching()
    (pipe,) = reactor.getReaders()
    watch.stopService()
    assert reactor.getReaders() == []
    os.close(write_end)
    pipe.connectionLost(Failure(CONNECTION_LOST))
    assert reactor.stops == 0  # already stopping: nothing more to do
    os.close(pipe.fd)


def test_workers_are_the_same_twistd_with_a_pipe_as_stdin() -> None:
    pool = WorkerPool(MemoryReactorClock(), "/etc/imapproxy/imapproxy.toml", 3,
                      penalty_socket="/run/p.sock")
    command = pool.command()
    assert command[0] == sys.executable and "--worker" in command
    assert command[-2:] == ["--penalty-socket", "/run/p.sock"]

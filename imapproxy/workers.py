"""Several processes serving the same listeners: ``workers = N``.

Each process opens its own listening socket with SO_REUSEPORT, and the kernel
spreads new connections over them. The process twistd started is worker 0; it
spawns workers 1..N-1 (the same command with ``--worker``), restarts them if they
die, and passes SIGTERM on, so each drains its own sessions. A worker's stdin is a pipe
from the main process: when the main goes away in any way (SIGKILL included), the
worker reads EOF there and drains and stops too, rather than serving on alone with a
config no reload reaches and a penalty it can no longer ask (ParentWatch).

Every session costs two file descriptors (client and backend), so a process holds
at most about half its RLIMIT_NOFILE in sessions; raise LimitNOFILE (systemd) or
add workers accordingly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import abstract, defer, fdesc, protocol
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from .config import Listener

log = Logger(namespace="imapproxy")

#: listen(2) backlog: a reconnect storm of phones must not meet SYN drops.
BACKLOG = 1024
#: twistd from this very interpreter (the `twistd` script may belong to another one)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
#: seconds before a worker that died is started again
RESTART_DELAY = 1.0


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if isIPv6Address(host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class ReusePortService(service.Service):
    """Listens on a [[listen]] address with SO_REUSEPORT, beside the other workers."""

    def __init__(self, reactor: Any, listener: Listener, factory: Any, tls: Any) -> None:
        self.reactor = reactor
        self.listener = listener
        self.factory = factory if listener.tls != "implicit" else TLSMemoryBIOFactory(
            tls, False, factory)
        self.port: Any = None

    def privilegedStartService(self) -> None:  # noqa: N802
        sock = reuseport_socket(self.listener.host, self.listener.port)
        try:
            self.port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # adoptStreamPort took its own copy of the descriptor
        super().privilegedStartService()

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended.callback(None)
        self.pool.worker_ended(self)


class WorkerPool(service.Service):
    """Spawns and supervises workers 1..N-1 (this process is worker 0)."""

    def __init__(self, reactor: Any, config_path: str, count: int,
                 penalty_socket: str | None = None) -> None:
        self.reactor = reactor
        self.config_path = config_path
        self.count = count
        #: where the workers ask for the brute-force penalty (penaltyworkers.py)
        self.penalty_socket = penalty_socket
        self.workers: dict[int, tuple[_WorkerProcess, Any]] = {}

    def command(self) -> list[str]:
        command = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "imapproxy",
                   "--config", self.config_path, "--worker"]
        if self.penalty_socket is not None:
            command += ["--penalty-socket", self.penalty_socket]
        return command

    def startService(self) -> None:  # noqa: N802
        super().startService()
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        worker = _WorkerProcess(self, index)
        # Workers log to the same stdout/stderr as this process.
        command = [*self.command(), "--worker-index", str(index)]
        transport = self.reactor.spawnProcess(worker, sys.executable, command,
                                              env=dict(os.environ),
                                              childFDs={0: "w", 1: 1, 2: 2})
        self.workers[index] = (worker, transport)
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def worker_ended(self, worker: _WorkerProcess) -> None:
        self.workers.pop(worker.index, None)
        if self.running:
            log.warn("worker {index} ended; restarting", index=worker.index)
            self.reactor.callLater(RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        ended = []
        for worker, transport in list(self.workers.values()):
            ended.append(worker.ended)
            with contextlib.suppress(OSError):  # already gone
                transport.signalProcess(signal.SIGTERM)  # each worker drains its sessions
        return defer.DeferredList(ended)


class _PipeEnd(abstract.FileDescriptor):
    """The read end of a pipe, read only to learn when the writer has gone."""

    def __init__(self, reactor: Any, fd: int, gone: Any) -> None:
        super().__init__(reactor)
        self.fd = fd
        self._gone = gone
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:  # noqa: N802
        # EOF (the writer closed, or died) gives CONNECTION_LOST: connectionLost follows.
        return fdesc.readFromFD(self.fd, lambda data: None)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        self._gone()


class ParentWatch(service.Service):
    """In a worker: stop (a drain, as on SIGTERM) once the main process is gone."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd
        self._pipe: _PipeEnd | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._pipe = _PipeEnd(self.reactor, self.fd, self._parent_gone)
        self._pipe.startReading()

    def _parent_gone(self) -> None:
        self._pipe = None
        if self.running:
            log.warn("the main process is gone: this worker drains and stops")
            self.reactor.stop()

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        if self._pipe is not None:
            self._pipe.stopReading()
            self._pipe = None

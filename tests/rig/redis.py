"""A real redis-server (Debian's package) run as a child process, in memory only.

``RedisServer(workdir)`` listens on a free port of 127.0.0.1 (plain TCP; with ``cert``
on a TLS port instead, ``rediss://``), keeps nothing on disk (``--save ''``,
``--appendonly no``), and is ready once it answers PING; with ``unix`` also on a Unix
socket in its folder. ``stop()`` and ``start()``
again keep the port (a Redis that went away and came back); ``pause()`` and
``resume()`` stop and continue the process (SIGSTOP/SIGCONT), so that Redis accepts
connections but answers nothing: a slow Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .certs import CertPair
from .ports import free_port
from .processes import stop_process, tail

REDIS_SERVER = Path("/usr/bin/redis-server")
#: Seconds start() waits for PING to be answered.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServer:
    """One redis-server on a free 127.0.0.1 port, data in memory only."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, password: str | None = None,
                 cert: CertPair | None = None, unix: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        self.password = password
        self.cert = cert
        self.log_path = self.workdir / "redis.log"
        #: also on this Unix socket (mode 0700), with ``unix``
        self.socket_path: Path | None = self.workdir / "redis.sock" if unix else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL for ``[shared] redis`` (database 0), password included if any."""
        scheme = "rediss" if self.cert is not None else "redis"
        host = "localhost" if self.cert is not None else self.host
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        args = [str(REDIS_SERVER), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--logfile", str(self.log_path),
                "--daemonize", "no", "--protected-mode", "no"]
        if self.cert is not None:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.cert.cert_path),
                     "--tls-key-file", str(self.cert.key_path),
                     "--tls-ca-cert-file", str(self.cert.chain_path),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def start(self) -> RedisServer:
        """Start it and block until it answers PING (RuntimeError otherwise)."""
        if not REDIS_SERVER.exists():
            raise RuntimeError("redis-server not installed: run scripts/install-deps")
        if self.running:
            return self
        self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self._process.poll() is not None:
                self._fail(f"redis-server exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                self._fail(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        """Whether PING is answered with PONG (plain TCP only; TLS: the port accepts)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                if self.cert is not None:
                    return True
                auth = b""
                if self.password:
                    secret = self.password.encode()
                    auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret)
                sock.sendall(auth + b"PING\r\n")
                data = b""
                while b"PONG" not in data and len(data) < 200:
                    chunk = sock.recv(200)
                    if not chunk:
                        return False
                    data += chunk
                return True
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        """Run redis-cli against it; its output."""
        command = ["redis-cli", "-h", self.host, "-p", str(self.port)]
        if self.password:
            command += ["--no-auth-warning", "-a", self.password]
        result = subprocess.run([*command, *args], capture_output=True, timeout=10,
                                check=True)
        return result.stdout.decode()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted (by the kernel), nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (its data is gone: nothing is saved); no-op when not running."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused one cannot act on SIGTERM
        stop_process(process, STOP_TIMEOUT)

    def _fail(self, message: str) -> None:
        raise RuntimeError(f"{message}\n--- {self.log_path} ---\n{tail(self.log_path)}")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self.port}>"

"""imapproxy under twistd, configured from the bench's stack (static map or LDAP)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parent.parent


def _greeting(port: int, timeout: float = 1.0) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return s.recv(256)
    except OSError:
        return b""


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class Listen:
    protocol: str  # imap | pop3 | managesieve
    port: int
    tls: str  # none | implicit


@dataclass
class ImapProxy:
    """One twistd process running the proxy plugin with a generated TOML config."""

    name: str
    workdir: Path
    listeners: list[Listen]
    cert: Path
    key: Path
    static_map: list[tuple[str, str]] | None = None  # (pattern, host:port)
    ldap: dict[str, object] | None = None
    extra_toml: str = ""
    env_extra: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = []
        for lst in self.listeners:
            out.append(f'[[listen]]\nprotocol = "{lst.protocol}"\n'
                       f'address = "127.0.0.1:{lst.port}"\ntls = "{lst.tls}"\n')
        out.append(f'[tls]\ncertificate = "{self.cert}"\nkey = "{self.key}"\n'
                   "plaintext_auth = true\n")
        if self.ldap is not None:
            out.append('[directory]\ntype = "ldap"\n[directory.ldap]\n')
            for k, v in self.ldap.items():
                if isinstance(v, str):
                    out.append(f'{k} = "{v}"\n')
                elif isinstance(v, list):
                    out.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]\n")
                else:
                    out.append(f"{k} = {v}\n")
        else:
            assert self.static_map is not None
            map_path = self.workdir / f"{self.name}.map"
            map_path.write_text("".join(f"{p}  {h}\n" for p, h in self.static_map))
            out.append(f'[directory]\ntype = "static"\nmap = "{map_path}"\n')
        out.append('[backend]\ntls = "none"\nconnect_timeout = 10\n')
        out.append(self.extra_toml)
        self.config_path.write_text("\n".join(out))

    def start(self) -> None:
        self.write_config()
        self.log_path.unlink(missing_ok=True)
        err = open(self.workdir / f"{self.name}.stderr", "ab")
        # --proxy-python: run the proxy on another interpreter, e.g. .venv-debian/bin/python
        # with Debian's python3-twisted/python3-openssl (OpenSSL 3.0 rather than the 4.0
        # bundled in PyPI's cryptography wheels: about 7 KiB less per TLS session).
        python = os.environ.get("BENCH_PROXY_PYTHON") or sys.executable
        argv = [python, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", f"--logfile={self.log_path}",
                "imapproxy", "--config", str(self.config_path)]
        # twistd finds plugins by scanning twisted/plugins directories on sys.path;
        # an editable install's import hook is not one, so put the checkout first.
        env = dict(os.environ)
        env.update(self.env_extra)
        first = [env["BENCH_SITEHOOKS"]] if env.get("BENCH_SITEHOOKS") else []
        first += [env["BENCH_PROXY_PATH"]] if env.get("BENCH_PROXY_PATH") else []
        env["PYTHONPATH"] = os.pathsep.join(
            first + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                        start_new_session=True, cwd=self.workdir, env=env)
        err.close()
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self.listeners)
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"imapproxy {self.name} exited "
                                   f"({self.process.returncode}):\n{self.log_tail()}")
            still = []
            for lst in pending:
                if lst.tls == "implicit":
                    ok = _tcp_open(lst.port)
                else:
                    g = _greeting(lst.port)
                    ok = g.startswith({"pop3": b"+OK", "managesieve": b'"IMPLEMENTATION"'}
                                      .get(lst.protocol, b"* OK"))
                if not ok:
                    still.append(lst)
            pending = still
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"imapproxy {self.name} did not listen on "
                                   f"{[lst.port for lst in pending]}:\n{self.log_tail()}")
            if pending:
                time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for p in (self.log_path, self.workdir / f"{self.name}.stderr"):
            with contextlib.suppress(OSError):
                out.append(p.read_text(errors="replace")[-chars:])
        return "\n".join(out)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

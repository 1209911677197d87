"""Runs the real proxy (``twistd -n imapproxy``) as a child process for tests, bench and demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

#: Seconds start() waits for every listener to accept connections.
START_TIMEOUT = 15.0


def _twistd() -> list[str]:
    """twistd on this very interpreter, so the proxy runs on the stack the tests run on."""
    return [sys.executable, "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class ProxyProcess:
    """The proxy under test: writes its config, starts it, stops it, reads its log."""

    def __init__(self, workdir: Path, config_text: str, ports: list[int],
                 files: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "imapproxy.toml"
        self.log_path = workdir / "proxy.log"
        self.ports = ports
        self.config_path.write_text(config_text)
        for name, text in (files or {}).items():
            (workdir / name).write_text(text)
        self.extra_args = extra_args or []
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports[0]

    def command(self) -> list[str]:
        return [*_twistd(), "-n", "--pidfile=", *self.extra_args, "imapproxy",
                "--config", str(self.config_path)]

    def spawn(self) -> ProxyProcess:
        """Start the process and return at once (start() also waits for the listeners)."""
        env = dict(os.environ if self.env is None else self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
        return self

    def start(self) -> ProxyProcess:
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self.ports)
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
                pending.pop(0)
                continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy did not listen on {pending}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the proxy to exit on its own; its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


#: [limits] for test proxies: failed logins answered within 50 ms (the default delay
#: starts at 2 s and doubles), and room for many sessions of one test user. Tests of the
#: limits themselves write their own [limits] table.
RIG_LIMITS = """[limits]
login_delay = 0.01
login_delay_max = 0.05
max_connections_per_user_ip = 100
"""


#: the [admin] token of test proxies that listen for admin on TCP (admin_token_file)
ADMIN_TOKEN = "rig-admin-token-0123456789abcdef"


def admin_token_file(folder: Path, token: str = ADMIN_TOKEN,
                     name: str = "admin.token") -> Path:
    """Write an [admin] token_file the way the proxy wants it: mode 0600 from the start."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    path.chmod(0o600)  # an existing file keeps its mode through os.open
    return path


def imap_config(port: int, map_file: str = "users.map", tls: str = "none",
                plaintext_auth: bool = True, cert: tuple[str, str] | None = None,
                extra: str = "", top: str = "", protocol: str = "imap") -> str:
    """A minimal config text with one listener and a static map.

    ``top`` holds top-level keys (before any table), ``extra`` more tables at the end;
    RIG_LIMITS is added unless ``extra`` has a [limits] table.
    """
    if "[limits]" not in extra:
        extra = extra + "\n" + RIG_LIMITS
    tls_table = "[tls]\n"
    if cert is not None:
        tls_table += f'certificate = "{cert[0]}"\nkey = "{cert[1]}"\n'
    tls_table += f"plaintext_auth = {'true' if plaintext_auth else 'false'}\n"
    return (
        f'{top}\n[[listen]]\nprotocol = "{protocol}"\n'
        f'address = "127.0.0.1:{port}"\ntls = "{tls}"\n\n'
        f"{tls_table}\n"
        f'[directory]\ntype = "static"\nmap = "{map_file}"\n\n{extra}'
    )


def store_map(store1: object, store2: object, mail_users: list, extra: str = "") -> str:
    """alice, carol, erin on store1; the others on store2 (as in the slapd fixture)."""
    lines = [extra] if extra else []
    for user in mail_users:
        store = store1 if user.name in ("alice", "carol", "erin") else store2
        lines.append(f"{user.name}  127.0.0.1:{store.imap_port}")
    return "\n".join(lines) + "\n"

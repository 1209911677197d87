"""Several proxy instances behind a real HAProxy, as an operator scales out (README,
Scaling out): HAProxy passes each client with ``send-proxy-v2``, balances by
``leastconn`` (sessions live for hours: round robin would pile a reconnect storm on
whichever instance came back last) and asks each instance's ``GET /readyz`` every
``CHECK_INTERVAL``, so a draining instance (503) or a dead one (no answer) leaves the
pool; ``option redispatch`` with ``retries`` sends a connection that an instance
refused to another one.

Used by tests/integration/test_rolling_restart.py and bench/rolling.py.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .certs import CertPair
from .ports import free_port
from .processes import tail
from .proxy import ProxyProcess

HOST = "127.0.0.1"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
#: HAProxy's health check interval (``inter``); ``fall 1``: one failed check takes an
#: instance out; ``rise 2``: two good ones put it back.
CHECK_INTERVAL = 0.25

HAPROXY_CONFIG = """\
global
    maxconn {maxconn}
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    # A busy instance (a reconnect storm) may answer /readyz late: late is not down.
    timeout check 2s
    timeout client 2h
    timeout server 2h
    option redispatch 1
    retries 3
frontend imap
    bind {host}:{port}
    default_backend proxies
backend proxies
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
{servers}"""


def instance_config(port: int, health_port: int, admin_socket: Path, extra: str = "",
                    cert: CertPair | None = None, limits: str = "") -> str:
    """One instance: a PROXY-protocol listener for HAProxy (implicit TLS with ``cert``:
    HAProxy passes TLS through, the instance terminates it), /readyz, the admin socket."""
    tls = (f'certificate = "{cert.chain_path}"\nkey = "{cert.key_path}"\n' if cert
           else "plaintext_auth = true\n")
    return f"""\
[[listen]]
protocol = "imap"
address = "{HOST}:{port}"
tls = "{'implicit' if cert else 'none'}"
proxy_protocol = true

[tls]
{tls}
[proxy_protocol]
trusted = ["127.0.0.1/32"]

[directory]
type = "static"
map = "users.map"

[metrics]
address = "{HOST}:{health_port}"

[admin]
address = "{admin_socket}"

[limits]
login_delay = 0.01
login_delay_max = 0.05
{limits}

[timeouts]
drain = 20
# HAProxy sees /readyz 503 within one check interval (fall 1): by the time the drain
# sends the phones back through it, it passes them to the other instance.
drain_notice = {4 * CHECK_INTERVAL}

{extra}
"""


class Instance:
    """One proxy instance of the pool: its process comes and goes, its ports stay."""

    def __init__(self, workdir: Path, name: str, backend_port: int, extra: str = "",
                 cert: CertPair | None = None, limits: str = "") -> None:
        self.name = name
        self.port = free_port()
        self.health_port = free_port()
        self.admin_socket = workdir / f"{name}.admin.sock"
        self.process = ProxyProcess(
            workdir / name,
            instance_config(self.port, self.health_port, self.admin_socket, extra, cert,
                            limits),
            [self.port, self.health_port], {"users.map": f"*  {HOST}:{backend_port}\n"})

    def start(self) -> None:
        self.process.start()

    @property
    def running(self) -> bool:
        return self.process.process is not None and self.process.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self.process.process = None
        return code

    def stop(self) -> None:
        self.process.stop()

    def logins(self) -> int:
        return self.process.log().count("] login id=")


class Pool:
    """``size`` instances in front of one backend port, and HAProxy in front of them."""

    def __init__(self, workdir: Path, backend_port: int, size: int = 2, *, maxconn: int = 8000,
                 extra: str = "", cert: CertPair | None = None, limits: str = "") -> None:
        """``extra``: more tables for each instance's config; ``limits``: more keys of its
        [limits] table."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.instances = [Instance(workdir, f"instance{chr(ord('a') + i)}", backend_port,
                                   extra, cert, limits) for i in range(size)]
        self.port = free_port()
        self.stats = workdir / "haproxy.stats.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        servers = "".join(
            f"    server {i.name} {HOST}:{i.port} send-proxy-v2 check port {i.health_port}"
            f" inter {int(CHECK_INTERVAL * 1000)}ms fall 1 rise 2\n" for i in self.instances)
        self.config_path.write_text(HAPROXY_CONFIG.format(
            maxconn=maxconn, stats=self.stats, host=HOST, port=self.port, servers=servers))
        self.haproxy: subprocess.Popen[bytes] | None = None

    def start(self) -> Pool:
        """Start everything; on any failure, stop what was started (no orphans)."""
        if not Path(HAPROXY).exists():
            raise RuntimeError("haproxy is not installed: run scripts/install-deps")
        try:
            for instance in self.instances:
                instance.start()
            with self.log_path.open("ab") as log:
                self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                                stdout=log, stderr=subprocess.STDOUT)
            self.wait_for(lambda: all(self.up(i) for i in self.instances),
                          "every instance UP")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
            self.haproxy = None
        for instance in self.instances:
            instance.stop()

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- HAProxy's view ------------------------------------------------------------------

    def _stats(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def status(self) -> dict[str, tuple[str, int]]:
        """Each server's (status, current sessions), as HAProxy sees them."""
        lines = self._stats("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        found = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "proxies" and row.get("svname") not in (None, "BACKEND"):
                found[row["svname"]] = (row["status"], int(row["scur"] or 0))
        return found

    def up(self, instance: Instance) -> bool:
        try:
            return self.status().get(instance.name, ("",))[0] == "UP"
        except OSError:
            return False

    def wait_for(self, check: Callable[[], object], what: str, timeout: float = 30.0) -> float:
        started = time.monotonic()
        while not check():
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{tail(self.log_path)}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"timed out waiting for {what}: {self.status()}")
            time.sleep(0.05)
        return time.monotonic() - started

    # -- what an operator does -----------------------------------------------------------

    def drain(self, instance: Instance, timeout: float = 60.0) -> float:
        """A rolling restart's first half: SIGTERM (the instance drains: /readyz 503,
        every session ends gracefully) and wait for it to exit; the seconds it took."""
        started = time.monotonic()
        instance.signal(signal.SIGTERM)
        instance.wait(timeout)
        return time.monotonic() - started

    def bring_back(self, instance: Instance) -> float:
        """The second half: start it again and wait until HAProxy has it back UP."""
        started = time.monotonic()
        instance.start()
        self.wait_for(lambda: self.up(instance), f"{instance.name} back UP")
        return time.monotonic() - started

    def kill(self, instance: Instance) -> None:
        """A crash: SIGKILL, no drain."""
        instance.signal(signal.SIGKILL)
        instance.wait(10)

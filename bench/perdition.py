"""Perdition 2.2 (Debian packages perdition, perdition-ldap) run as the peer proxy.

One Perdition process serves one protocol, so the bench runs up to four: IMAP4
plain, IMAP4S (implicit TLS to the client, plaintext to the backend), POP3 and
ManageSieve.
Each looks users up in the same slapd as the proxy, through the LDAP map:
Perdition 2.2 wants exactly three attributes (login name, host, port) and the
``3:`` prefix for LDAPv3 (its default, LDAPv2, is refused by slapd 2.5).
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = {"imap": "/usr/sbin/perdition.imap4", "imaps": "/usr/sbin/perdition.imaps",
            "pop3": "/usr/sbin/perdition.pop3",
            "managesieve": "/usr/sbin/perdition.managesieve"}
START_TIMEOUT = 10.0


class PerditionMissing(RuntimeError):
    """Perdition is not installed: run bench/install-deps."""


def ldap_library() -> str:
    """Path of the LDAP map library shipped by perdition-ldap."""
    hits = sorted(glob.glob("/usr/lib/*/libperditiondb_ldap.so.0")
                  + glob.glob("/usr/lib/libperditiondb_ldap.so.0"))
    if not hits:
        raise PerditionMissing("perdition-ldap is not installed: run bench/install-deps")
    return hits[0]


def version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "perdition"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_installed() -> None:
    for path in BINARIES.values():
        if not os.path.exists(path):
            raise PerditionMissing(f"{path} missing: run bench/install-deps")
    ldap_library()


def _greets(port: int, expected: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            return s.recv(256).startswith(expected)
    except OSError:
        return False


@dataclass
class Perdition:
    """One Perdition daemon in the foreground, logging to a file in ``workdir``."""

    workdir: Path
    mode: str  # "imap" | "imaps" | "pop3" | "managesieve"
    port: int
    ldap_uri: str  # ldap://127.0.0.1:PORT
    ldap_base: str
    port_attribute: str  # mailImapPort or mailPop3Port
    cert: Path | None = None
    key: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        url = (f"3:{self.ldap_uri}/{self.ldap_base}"
               f"?uid,mailHost,{self.port_attribute}?one?(uid=%s)")
        args = [
            BINARIES[self.mode],
            "-f", "/dev/null",          # ignore /etc/perdition/*.conf
            "-F", str(self.workdir / f"perdition-{self.mode}.log"),
            "--no_daemon",
            "--pid_file", "",
            "-b", f"127.0.0.1:{self.port}",
            "-n",                       # no DNS: the map returns IP addresses
            "-u", "root", "-g", "root",  # the test CA writes 0600 keys
            "-L", "0",                  # no connection cap (it would kill the listener)
            "--connect_relog", "0",
            "-M", ldap_library(), "-m", url,
        ]
        if self.mode == "imaps":
            assert self.cert is not None and self.key is not None
            args += ["--ssl_mode", "ssl_listen",
                     "--ssl_cert_file", str(self.cert), "--ssl_key_file", str(self.key),
                     "--ssl_no_client_cert_verify"]
        return args

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        err = open(self.workdir / f"perdition-{self.mode}.stderr", "ab")
        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=err,
                                        stderr=err, start_new_session=True)
        err.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"perdition {self.mode} exited: {self._log_tail()}")
            if self.mode == "imaps":
                if _tcp_open(self.port):
                    return
            elif _greets(self.port, {"pop3": b"+OK", "managesieve": b'"IMPLEMENTATION"'}
                         .get(self.mode, b"* OK")):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"perdition {self.mode} did not start: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        out = []
        for name in (f"perdition-{self.mode}.log", f"perdition-{self.mode}.stderr"):
            with contextlib.suppress(OSError):
                out.append((self.workdir / name).read_text(errors="replace")[-2000:])
        return "\n".join(out)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """Stop the listener and every session child (its own process group)."""
        p, self.process = self.process, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        # Children survive the parent (they are not told); end the rest of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False

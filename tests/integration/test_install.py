"""README.md "Install", carried out: a wheel, scripts/install-proxy into a temporary root,
the unit checked there by systemd-analyze, and the installed proxy started as the
service user (not root), serving a login to Dovecot.

The install follows the stack this suite runs on: on Debian's packaged stack
(.venv-debian, a --system-site-packages venv) it is `install-proxy --lean`, elsewhere
the venv with PyPI's packages. Both need root (systemd-sysusers, file owners, setpriv)
and PyPI (the wheel's build backend and dependencies; pip's cache makes a second run
quick).
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rig.ports import free_port
from rig.proxy import RIG_LIMITS

from imapproxy import __version__

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
#: seconds; generous bounds, about correctness only
WAIT = 60.0


def on_system_site_packages() -> bool:
    """True on a venv made with --system-site-packages (the Debian stack)."""
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    return cfg.exists() and "include-system-site-packages = true" in cfg.read_text()


LEAN = on_system_site_packages()


def run(args: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=600, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as `make wheel` builds it, from a copy of the sources (the checkout
    keeps no build/ leftovers, and nothing outside these paths can slip in)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("imapproxy", "twisted"):
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q",
         "--no-deps", "-w", out, src])
    (built,) = out.glob("*.whl")
    return built


@dataclass
class Installed:
    root: Path
    uid: int
    gid: int

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "imapproxy"

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "imapproxy"

    def plugin_cache(self) -> Path:
        (cache,) = self.venv.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache")
        return cache

    def as_service_user(self) -> list[str]:
        """What User=/Group= do: the ids from the root's own /etc/passwd, no other groups."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--"]


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.fail("the install test needs root (systemd-sysusers, chown, setpriv)")
    # Under /tmp, not pytest's 0700 folder: the service user must reach the venv.
    root = Path(tempfile.mkdtemp(prefix="imapproxy-root-", dir="/tmp"))
    try:
        root.chmod(0o755)
        run([REPO / "scripts" / "install-proxy", *(["--lean"] if LEAN else []),
             "--root", root, wheel])
        entry = next(line for line in (root / "etc" / "passwd").read_text().splitlines()
                     if line.startswith("imapproxy:"))
        uid, gid = (int(field) for field in entry.split(":")[2:4])
        yield Installed(root, uid, gid)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_holds_the_package_the_plugin_and_the_license(wheel: Path) -> None:
    assert wheel.name == f"imapproxy-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"imapproxy-{__version__}.dist-info/METADATA").decode()
    assert "twisted/plugins/imapproxy_plugin.py" in names
    assert "imapproxy/service.py" in names and "imapproxy/sdnotify.py" in names
    # Twisted's own package files must never be replaced by ours.
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names
    assert not any(name.startswith(("tests/", "conf/", "bench/")) for name in names)
    assert f"imapproxy-{__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata


def test_declared_minimums_are_the_pinned_ones(wheel: Path) -> None:
    """pyproject's lower bounds and constraints/minimum.txt (what the suite ran on) agree."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"imapproxy-{__version__}.dist-info/METADATA").decode()
    declared = dict(re.findall(r"^Requires-Dist: ([\w.-]+)>=([\d.]+)$", metadata, re.M))
    pins = dict(re.findall(r"^([\w.-]+)==([\d.]+)", (REPO / "constraints" / "minimum.txt")
                           .read_text(), re.M))

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    def release(version: str) -> tuple[int, ...]:
        parts = tuple(int(p) for p in version.split("."))
        return parts + (0,) * (3 - len(parts))

    pins = {norm(k): v for k, v in pins.items()}
    assert declared, metadata
    for name, minimum in declared.items():
        assert release(pins[norm(name)]) == release(minimum), name


def test_unit_verifies_as_installed(installed: Installed) -> None:
    """systemd-analyze verify in the root the install made: ExecStart must exist there.

    The root gets the host's own unit files (sysinit.target and the like) and /bin/kill
    (ExecReload), as on the Debian machine it stands for.
    """
    root = installed.root
    (root / "usr" / "lib" / "systemd").mkdir(parents=True, exist_ok=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system",
                    symlinks=True, dirs_exist_ok=True)
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("kill") or "/usr/bin/kill", root / "usr" / "bin" / "kill")
    if not (root / "bin").exists():
        (root / "bin").symlink_to("usr/bin")
    assert (root / "etc/systemd/system/imapproxy.service").read_bytes() == \
        (REPO / "conf/imapproxy.service").read_bytes()
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                             "imapproxy.service"], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, with a line each: none allowed.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_unit_sandbox_scores_below_3(installed: Installed) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             f"--root={installed.root}", "imapproxy.service"],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for imapproxy\.service: ([\d.]+)",
                      result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) < 3.0, result.stdout


def test_user_and_config_folder(installed: Installed) -> None:
    etc = installed.etc
    assert etc.stat().st_uid == 0 and etc.stat().st_gid == installed.gid
    assert etc.stat().st_mode & 0o777 == 0o750
    config = etc / "imapproxy.toml"
    assert config.read_bytes() == (REPO / "conf/imapproxy.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o640
    passwd = (installed.root / "etc" / "passwd").read_text()
    assert re.search(r"^imapproxy:x:\d+:\d+:[^:]*:/nonexistent:/usr/sbin/nologin$", passwd,
                     re.M)
    assert installed.uid != 0
    link = installed.root / "usr/local/bin/imapproxy-admin"
    assert os.readlink(link) == "/opt/imapproxy/bin/imapproxy-admin"
    admin = run([installed.venv / "bin" / "imapproxy-admin", "--version"])
    assert admin.stdout == f"imapproxy-admin {__version__}\n"


@pytest.fixture
def notify_socket(installed: Installed) -> Iterator[socket.socket]:
    run_dir = installed.root / "run"
    run_dir.mkdir(mode=0o755, exist_ok=True)
    path = run_dir / "notify"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o666)  # the service user sends to it
    sock.settimeout(WAIT)
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def test_installed_proxy_serves_a_login_as_the_service_user(
        installed: Installed, notify_socket: socket.socket, store1, mail_users, server_cert,
        test_ca) -> None:
    alice = next(u for u in mail_users if u.name == "alice")
    etc, port = installed.etc, free_port()
    # What the operator adds after the install: the certificate, the key, the routes.
    shutil.copy(server_cert.chain_path, etc / "cert.pem")
    shutil.copy(server_cert.key_path, etc / "key.pem")
    runtime = installed.root / "run" / "imapproxy"  # what RuntimeDirectory= makes
    runtime.mkdir(mode=0o750, exist_ok=True)
    os.chown(runtime, installed.uid, installed.gid)
    (etc / "test.map").write_text(f"*  {HOST}:{store1.imap_port}\n")
    (etc / "test.toml").write_text(
        f'[[listen]]\nprotocol = "imap"\naddress = "{HOST}:{port}"\ntls = "implicit"\n\n'
        f'[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n\n'
        f'[directory]\ntype = "static"\nmap = "test.map"\n\n'
        f'[admin]\naddress = "{runtime}/admin.sock"\n\n{RIG_LIMITS}')
    for name in ("cert.pem", "key.pem", "test.map", "test.toml"):
        (etc / name).chmod(0o640)
        os.chown(etc / name, 0, installed.gid)

    log_path = installed.root / "proxy.log"
    # As the unit runs it: the venv's twistd, the service user, a clean environment
    # (nothing of this checkout on PYTHONPATH), working directory /.
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify_socket.getsockname()}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*installed.as_service_user(), installed.venv / "bin" / "twistd", "-n",
             "--pidfile=", "imapproxy", "--config", etc / "test.toml"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        try:
            ready = notify_socket.recv(4096)
        except TimeoutError:
            pytest.fail(f"no READY=1 within {WAIT}s:\n{log_path.read_text()}")
        assert ready.startswith(b"READY=1\n"), log_path.read_text()

        before = store1.message_count(alice.name)
        context = ssl.create_default_context(cafile=str(test_ca.ca_path))
        client = imaplib.IMAP4_SSL(HOST, port, ssl_context=context, timeout=10)
        client.login(alice.name, alice.password)
        message = b"From: installer@example.org\r\nSubject: installed\r\n\r\nhello\r\n"
        assert client.append("INBOX", "", None, message)[0] == "OK"
        assert store1.message_count(alice.name) == before + 1

        sessions = run([installed.venv / "bin" / "imapproxy-admin", "--address",
                        runtime / "admin.sock", "sessions", "--json"])
        users = [json.loads(line)["user"] for line in sessions.stdout.splitlines()]
        assert users == [alice.name]
        client.logout()

        process.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096).startswith(b"STOPPING=1")
        assert process.wait(WAIT) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert f"imapproxy {__version__} starting, pid {process.pid}" in log
    # The prebuilt plugin cache: the service user cannot write the venv.
    assert "Unable to write to plugin cache" not in log
    assert "Traceback" not in log
    if LEAN:
        # --lean runs on Debian's OpenSSL 3.0 (python3-openssl over python3-cryptography).
        debian = run(["/usr/bin/python3", "-c", "from OpenSSL import SSL; "
                      "print(SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())"])
        assert f", {debian.stdout.strip()}" in log, log


def test_plugin_cache_must_be_prebuilt(installed: Installed) -> None:
    """Why install-proxy builds the cache: without it, the service user's twistd complains
    (and rescans every plugin at every start)."""
    cache = installed.plugin_cache()
    saved = cache.read_bytes()
    scan = ("import sys; from twisted.python import log; log.startLogging(sys.stdout); "
            "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))")
    python = installed.venv / "bin" / "python"
    try:
        cache.unlink()
        result = subprocess.run([*installed.as_service_user(), python, "-c", scan],
                                capture_output=True, text=True, timeout=120, cwd="/",
                                env={"PATH": "/usr/bin:/bin"})
        assert "Unable to write to plugin cache" in result.stdout + result.stderr
        assert not cache.exists()
    finally:
        cache.write_bytes(saved)
    result = subprocess.run([*installed.as_service_user(), python, "-c", scan],
                            capture_output=True, text=True, timeout=120, cwd="/",
                            env={"PATH": "/usr/bin:/bin"})
    assert "Unable to write to plugin cache" not in result.stdout + result.stderr

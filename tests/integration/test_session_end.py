"""Every way a session ends closes the client's connection at once, in every listener mode.

The matrix of issue 11: for each listener mode (IMAP STARTTLS, IMAPS, POP3 STLS, POP3S)
and each backend leg (plain, STARTTLS, implicit TLS), each way a logged-in session
ends (the client's LOGOUT/QUIT, the backend closing, the backend dying, a kick, a
drain, an idle or inactivity timeout), and, before login, a pre-auth timeout and too
many bad commands. The client never closes first (as mbsync after LOGOUT); it
measures the time from the last byte it got to EOF, on the TLS layer and on TCP
beneath it, which must be under a second.

The proxy runs in this process on the real reactor (pytest-twisted), with real TCP,
real TLS and a real Dovecot, so that the timeouts can be set to fractions of a
second (the config file refuses under 30 minutes after login, RFC 3501 section 5.4).
The clients are blocking sockets in threads. SIGTERM of the whole process with TLS
IDLE sessions is tested on the real twistd process at the end.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from rig.dovecot import Dovecot, make_users
from rig.endclient import MODES, EndClient, Ending
from rig.ports import free_port
from rig.proxy import ADMIN_TOKEN, ProxyProcess, admin_token_file
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from imapproxy import admincli
from imapproxy.config import load
from imapproxy.service import build_service

#: the bound of issue 11: EOF within a second of the last byte
PROMPT = 1.0
LISTENER_MODES = ("imap-starttls", "imaps", "pop3-stls", "pop3s")
BACKEND_LEGS = ("plain", "starttls", "implicit")
USERS = make_users(8, prefix="ender", first_uid=4100)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, server_cert) -> Iterator[Dovecot]:
    """A Dovecot of this module's own: its sessions are killed and kicked here."""
    dovecot = Dovecot(tmp_path_factory.mktemp("ender-dovecot"), USERS, name="ender",
                      cert=server_cert)
    dovecot.start()
    yield dovecot
    dovecot.close()


def config_text(backend: Dovecot, ports: dict[str, int], leg: str, ca: str, cert) -> str:
    listeners = "".join(
        f'[[listen]]\nprotocol = "{MODES[m][0]}"\naddress = "127.0.0.1:{ports[m]}"\n'
        f'tls = "{MODES[m][1]}"\n\n' for m in LISTENER_MODES)
    implicit = leg == "implicit"
    return f"""{listeners}
[tls]
certificate = "{cert.chain_path}"
key = "{cert.key_path}"

[directory]
type = "static"
map = "users.map"

[backend]
tls = "{'none' if leg == 'plain' else leg}"
ca_file = "{ca}"
imap_port = {backend.imaps_port if implicit else backend.imap_port}
pop3_port = {backend.pop3s_port if implicit else backend.pop3_port}

[admin]
address = "127.0.0.1:{ports['admin']}"
token_file = "admin.token"

[limits]
login_delay = 0
max_bad_commands = 3
"""


@dataclasses.dataclass
class InProcessProxy:
    """The proxy's service tree on this process's reactor."""

    service: object
    ports: dict[str, int]
    admin: str

    def stop(self) -> object:
        return self.service.stopService()


@pytest.fixture
def proxy_for(tmp_path: Path, backend: Dovecot, test_ca, server_cert):
    """proxy_for(leg, **timeouts) -> a started in-process proxy; stopped after the test."""
    started: list[InProcessProxy] = []

    def start(leg: str = "plain", **changes: float) -> InProcessProxy:
        ports = {name: free_port() for name in (*LISTENER_MODES, "admin")}
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        (workdir / "users.map").write_text("*  127.0.0.1\n")
        admin_token_file(workdir)
        path = workdir / "imapproxy.toml"
        path.write_text(config_text(backend, ports, leg, str(test_ca.ca_path), server_cert))
        config = load(path)
        timeouts = {k: v for k, v in changes.items() if k in ("authenticated", "idle")}
        limits = {k: v for k, v in changes.items() if k == "preauth_timeout"}
        config = dataclasses.replace(
            config,
            timeouts=dataclasses.replace(config.timeouts, sweep_interval=0.05, drain=10.0,
                                         **timeouts),
            limits=dataclasses.replace(config.limits, **limits))
        service = build_service(config, reactor)
        service.startService()
        proxy = InProcessProxy(service, ports, f"127.0.0.1:{ports['admin']}")
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.service.running:
            proxy.service.stopService()


def logged_in(backend: Dovecot, proxy: InProcessProxy, mode: str, user, ca: str,
              idle: bool = True) -> EndClient:
    client = EndClient(mode, proxy.ports[mode], ca)
    client.login(user.name, user.password)
    if idle and client.protocol == "imap":
        client.idle()
    client.mark()
    return client


def kill_backend_session(backend: Dovecot, user: str, protocol: str) -> None:
    """The user's imap/pop3 process dies (SIGKILL): no BYE, the kernel closes its socket."""
    pattern = f"{protocol} \\[{user} "
    subprocess.run(["pkill", "-KILL", "-f", pattern], check=True)


def assert_prompt(ending: Ending, what: str) -> None:
    assert ending.eof_after_last_byte < PROMPT, (what, ending)
    assert ending.tcp_eof_after_last_byte < PROMPT, (what, ending)


# -- after login -----------------------------------------------------------------------


def _end_after_login(how: str, client: EndClient, backend: Dovecot, proxy: InProcessProxy,
                     user) -> Ending:
    """Runs in a thread: make the session end ``how``, and wait for EOF."""
    if how == "logout":
        if client.protocol == "imap":
            client.send(b"DONE\r\n")
            client.readline()
            client.command(b"z LOGOUT", b"z ")
        else:
            client.command(b"QUIT", b"+OK")
    elif how == "backend-closes":
        backend.doveadm("kick", user.name)
    elif how == "backend-dies":
        kill_backend_session(backend, user.name, client.protocol)
    elif how == "kick":
        admincli.request(proxy.admin, "POST", f"/kick?user={user.name}",
                         token=ADMIN_TOKEN.encode())
    elif how == "drain":
        admincli.request(proxy.admin, "POST", "/drain", token=ADMIN_TOKEN.encode())
    elif how == "timeout":
        pass  # the proxy's own timer ends it
    return client.wait_end()


#: what the client must have been told before EOF, per way of ending and protocol
EXPECTED = {
    ("logout", "imap"): b"z OK",
    ("logout", "pop3"): b"+OK",
    ("backend-closes", "imap"): b"* BYE",
    ("backend-dies", "imap"): b"* BYE [UNAVAILABLE]",
    ("kick", "imap"): b"* BYE [UNAVAILABLE]",
    ("drain", "imap"): b"* BYE [UNAVAILABLE]",
    ("timeout", "imap"): b"* BYE Autologout",
}

ENDINGS = ("logout", "backend-closes", "backend-dies", "kick", "drain", "timeout")


@pytest.mark.parametrize("leg", BACKEND_LEGS)
@pytest.mark.parametrize("mode", LISTENER_MODES)
@pytest.mark.parametrize("how", ENDINGS)
@pytest_twisted.ensureDeferred
async def test_logged_in_session_ends_at_once(how, mode, leg, backend, proxy_for, test_ca):
    proxy = proxy_for(leg, authenticated=0.6, idle=0.6) if how == "timeout" else proxy_for(leg)
    user = USERS[LISTENER_MODES.index(mode)]
    ca = str(test_ca.ca_path)
    client = await deferToThread(logged_in, backend, proxy, mode, user, ca)
    try:
        ending = await deferToThread(_end_after_login, how, client, backend, proxy, user)
    finally:
        client.close()
    expected = EXPECTED.get((how, client.protocol))
    if expected is not None:
        assert expected in ending.data, ending
    assert_prompt(ending, f"{how} {mode} backend={leg}")
    if how == "drain":
        await proxy.stop()


# -- before login ----------------------------------------------------------------------


def _preauth(how: str, mode: str, proxy: InProcessProxy, ca: str) -> Ending:
    client = EndClient(mode, proxy.ports[mode], ca)
    try:
        client.mark()
        if how == "bad-commands":
            for i in range(3):
                client.send(b"x%d BOGUS\r\n" % i if client.protocol == "imap" else b"BOGUS\r\n")
        return client.wait_end()
    finally:
        client.close()


@pytest.mark.parametrize("mode", LISTENER_MODES)
@pytest.mark.parametrize("how", ("preauth-timeout", "bad-commands"))
@pytest_twisted.ensureDeferred
async def test_session_before_login_ends_at_once(how, mode, proxy_for, test_ca):
    proxy = proxy_for("plain", preauth_timeout=1.0)
    ending = await deferToThread(_preauth, how, mode, proxy, str(test_ca.ca_path))
    if MODES[mode][0] == "imap":
        assert b"* BYE" in ending.data, ending
    else:
        assert b"-ERR" in ending.data, ending
    assert_prompt(ending, f"{how} {mode}")


# -- SIGTERM of the real process -------------------------------------------------------


def _idle_then_wait(mode: str, port: int, user, ca: str, ready) -> Ending:
    client = EndClient(mode, port, ca)
    try:
        client.login(user.name, user.password)
        if client.protocol == "imap":
            client.idle()
        client.mark()
        ready.append(client)
        return client.wait_end()
    finally:
        client.close()


@pytest.mark.parametrize("leg", ("plain", "starttls"))
def test_sigterm_with_tls_idlers_ends_the_process_in_moments(leg, tmp_path, backend, test_ca,
                                                             server_cert):
    """Every idler gets DONE+LOGOUT at the backend and BYE, and the process exits."""
    import concurrent.futures

    ports = {name: free_port() for name in (*LISTENER_MODES, "admin")}
    log_start = backend.log_path.stat().st_size
    proxy = ProxyProcess(tmp_path / "proxy",
                         config_text(backend, ports, leg, str(test_ca.ca_path), server_cert),
                         [ports[m] for m in LISTENER_MODES], {"users.map": "*  127.0.0.1\n"})
    admin_token_file(proxy.workdir)
    proxy.start()
    try:
        ready: list[EndClient] = []
        with concurrent.futures.ThreadPoolExecutor(len(LISTENER_MODES)) as pool:
            futures = {mode: pool.submit(_idle_then_wait, mode, ports[mode],
                                         USERS[4 + i], str(test_ca.ca_path), ready)
                       for i, mode in enumerate(LISTENER_MODES)}
            deadline = time.monotonic() + 20
            while len(ready) < len(LISTENER_MODES) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(ready) == len(LISTENER_MODES)
            started = time.monotonic()
            proxy.signal(signal.SIGTERM)
            code = proxy.wait(timeout=10)
            exited_after = time.monotonic() - started
            endings = {mode: future.result(timeout=10) for mode, future in futures.items()}
        assert exited_after < 3.0, (exited_after, proxy.log())
        assert code in (0, -signal.SIGTERM), proxy.log()
        for mode, ending in endings.items():
            expected = b"* BYE [UNAVAILABLE]" if mode.startswith("imap") else b""
            assert expected in ending.data, (mode, ending)
            assert_prompt(ending, f"SIGTERM {mode}")
        assert "drain timeout" not in proxy.log()
        # The backend got DONE and LOGOUT for each idler (not a cut connection) before
        # the process exited: Dovecot logs "Logged out" for those alone.
        with backend.log_path.open(errors="replace") as log:
            log.seek(log_start)
            lines = log.read().splitlines()
        for i, mode in enumerate(LISTENER_MODES):
            if mode.startswith("imap"):
                name = USERS[4 + i].name
                ended = [line for line in lines if f"imap({name})" in line
                         and "Disconnected" in line]
                assert ended and "Logged out" in ended[-1], (name, ended)
    finally:
        proxy.stop()

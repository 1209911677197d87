"""Push sessions through the real proxy: BYE when the backend dies, SIGTERM drain, workers."""

from __future__ import annotations

import imaplib
import re
import signal
import time

from rig.imapraw import RawImap
from rig.ports import free_port
from rig.proxy import imap_config

HOST = "127.0.0.1"


def _user(mail_users, name):
    return next(u for u in mail_users if u.name == name)


def _idle(port: int, user, timeout: float = 10.0) -> RawImap:
    raw = RawImap(HOST, port, timeout=timeout)
    assert raw.command(b"l", b"LOGIN " + user.name.encode() + b" " + user.password.encode()
                       )[-1].startswith(b"l OK")
    assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    raw.send(b"i IDLE\r\n")
    assert raw.readline().startswith(b"+")
    return raw


def test_backend_killed_mid_idle_gives_bye(dovecot_factory, start_proxy, mail_users):
    store = dovecot_factory(name="doomed", tls=False)
    port = free_port()
    proxy = start_proxy(imap_config(port), [port],
                        {"users.map": f"*  127.0.0.1:{store.imap_port}\n"})
    # Dovecot, stopping, gives its IDLE sessions up to 10 s before it closes them: the
    # client waits longer than that for the BYE.
    raw = _idle(proxy.port, _user(mail_users, "erin"), timeout=30.0)
    store.stop()
    # Dovecot may flush an IDLE keepalive ("* OK Still here") as it shuts down;
    # untagged OK lines are relayed as they come, the BYE must follow them.
    while (line := raw.readline()).startswith(b"* OK"):
        pass
    assert line.startswith(b"* BYE"), line
    assert raw.at_eof()


def test_sigterm_drains_idle_sessions_and_finishes_an_append(store1, start_proxy, mail_users):
    port = free_port()
    proxy = start_proxy(imap_config(port), [port],
                        {"users.map": f"*  127.0.0.1:{store1.imap_port}\n"})
    alice = _user(mail_users, "alice")
    idlers = [_idle(proxy.port, alice) for _ in range(3)]
    appender = RawImap(HOST, proxy.port)
    appender.command(b"l", b"LOGIN alice " + alice.password.encode())
    marker = f"drain-{time.time_ns()}".encode()
    message = b"From: a@example.org\r\nSubject: " + marker + b"\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    appender.send(b"a APPEND INBOX {%d}\r\n" % len(message))
    assert appender.readline().startswith(b"+")
    appender.send(message[:50_000])
    time.sleep(0.2)  # let the first half reach the backend before the signal
    proxy.signal(signal.SIGTERM)
    for raw in idlers:
        line = raw.readline()
        assert line == b"* BYE [UNAVAILABLE] Shutting down\r\n", line
        assert raw.at_eof()
    appender.send(message[50_000:] + b"\r\n")
    lines = appender.until_tagged(b"a")
    assert lines[-1].startswith(b"a OK"), lines
    assert appender.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert appender.at_eof()
    started = time.monotonic()
    # twistd re-raises the signal that stopped it once shutdown is complete.
    assert proxy.wait(30) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in proxy.log()
    assert time.monotonic() - started < 10, "drain ended well before its 30 s deadline"
    direct = imaplib.IMAP4(HOST, store1.imap_port)
    direct.login(alice.name, alice.password)
    direct.select("INBOX", readonly=True)
    typ, found = direct.search(None, "HEADER", "Subject", marker.decode())
    assert typ == "OK" and found[0].split(), "the APPENDed message is on the backend"
    direct.logout()


def test_workers_share_the_load(store1, start_proxy, mail_users):
    port = free_port()
    proxy = start_proxy(imap_config(port, top="workers = 2\n"), [port],
                        {"users.map": f"*  127.0.0.1:{store1.imap_port}\n"})
    alice = _user(mail_users, "alice")
    # The second worker starts after the first listens, and binds its own socket
    # (SO_REUSEPORT) when it is up, which on a busy machine takes a while: log in in
    # rounds until logins have come through both processes.
    deadline = time.monotonic() + 30
    pids: set[str] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        clients = []
        for _ in range(12):
            client = imaplib.IMAP4(HOST, proxy.port)
            client.login(alice.name, alice.password)
            clients.append(client)
        for client in clients:
            client.logout()
        pids = set(re.findall(r"login id=\S+ .* pid=(\d+)", proxy.log()))
    assert len(pids) >= 2, proxy.log()


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (a container's init may not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_stops_when_the_main_process_is_killed(store1, start_proxy):
    """SIGKILL of the main process (no drain, nothing passed on): the workers read EOF
    on the pipe the main held and stop, instead of serving on alone."""
    port = free_port()
    proxy = start_proxy(imap_config(port, top="workers = 2\n"), [port],
                        {"users.map": f"*  127.0.0.1:{store1.imap_port}\n"})
    deadline = time.monotonic() + 10  # the main spawns it once its listeners are up
    while not (started := re.findall(r"worker 1 started \(pid (\d+)\)", proxy.log())):
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.1)
    worker = int(started[0])
    assert not _ended(worker)
    proxy.signal(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not _ended(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ended(worker), proxy.log()
    assert "the main process is gone: this worker drains and stops" in proxy.log()

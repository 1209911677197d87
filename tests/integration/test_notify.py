"""The Type=notify handshake with the real proxy, as systemd's manager sees it.

READY=1 must come only once the listeners accept (`systemctl start` returns then and the
next unit may send clients), never for a proxy that could not bind, and STOPPING=1 as
soon as SIGTERM starts the drain.
"""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.ports import free_port
from rig.proxy import ProxyProcess, imap_config

from imapproxy import __version__

HOST = "127.0.0.1"
#: generous: the proxy starts in about a second
WAIT = 30.0


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The notification socket, bound as systemd binds it; $NOTIFY_SOCKET names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def notified_proxy(tmp_path: Path, manager: socket.socket, port: int,
                   routes: str) -> ProxyProcess:
    env = {**os.environ, "NOTIFY_SOCKET": manager.getsockname()}
    return ProxyProcess(tmp_path / "proxy", imap_config(port), [port],
                        {"users.map": routes}, env=env)


def test_ready_once_serving_and_stopping_on_sigterm(tmp_path, manager, store1, mail_users):
    alice = next(u for u in mail_users if u.name == "alice")
    port = free_port()
    proxy = notified_proxy(tmp_path, manager, port, f"alice  {HOST}:{store1.imap_port}\n")
    # spawn(), not start(): start() polls the port itself, and here the datagram must be
    # the only signal that the proxy serves.
    proxy.spawn()
    try:
        ready = manager.recv(4096)
        assert ready == f"READY=1\nSTATUS=serving imap on {HOST}:{port} (none)".encode(), \
            proxy.log()
        # What systemd's "started" promises: a client connecting now is served at once.
        client = imaplib.IMAP4(HOST, port, timeout=10)
        assert client.welcome.startswith(b"* OK")
        client.login(alice.name, alice.password)
        assert client.select("INBOX")[0] == "OK"
        proxy.signal(signal.SIGTERM)
        assert manager.recv(4096) == b"STOPPING=1\nSTATUS=draining sessions"
        # The drain ends the logged-in session (BYE) and the process exits cleanly: twistd
        # ends by re-raising the SIGTERM that stopped it, which systemd counts as a clean
        # exit (systemd.service(5), SuccessExitStatus=).
        assert proxy.wait(WAIT) in (0, -signal.SIGTERM)
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            client.noop()
            client.noop()
        client.shutdown()
    finally:
        proxy.stop()
    assert pending(manager) == []
    assert f"imapproxy {__version__} starting, pid " in proxy.log()


def test_no_ready_when_a_listener_cannot_bind(tmp_path, manager):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = notified_proxy(tmp_path, manager, port, "*  127.0.0.1:143\n")
        proxy.spawn()
        try:
            deadline = time.monotonic() + WAIT
            while "not ready: a listener could not bind" not in proxy.log():
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.05)
            assert pending(manager) == [b"STATUS=a listener could not bind"]
        finally:
            proxy.stop()

"""sdnotify: datagrams to a real AF_UNIX socket, as systemd's manager receives them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application import internet
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor

from imapproxy import __version__
from imapproxy.config import Listener, load
from imapproxy.sdnotify import ReadyNotifier, notify, serving, socket_address, stack
from imapproxy.service import build_service


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The receiving end, as systemd binds it: a datagram socket at a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting."""
    out = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def env_for(sock: socket.socket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": sock.getsockname()}


def test_sends_one_datagram_to_a_path_socket(manager: socket.socket) -> None:
    assert notify("READY=1\nSTATUS=serving", env_for(manager))
    assert manager.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_namespace_socket() -> None:
    # sd_notify(3): "@" in $NOTIFY_SOCKET stands for the NUL byte of an abstract name.
    name = f"imapproxy-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_nothing_without_the_variable_or_with_an_unknown_form() -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": ""})
    assert socket_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})


def test_a_socket_that_is_gone_is_not_an_error(tmp_path: Path) -> None:
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "no-such-socket")})


def listening_tree(reactor: object, manager: socket.socket) -> tuple[MultiService, ReadyNotifier]:
    top = MultiService()
    endpoint = TCP4ServerEndpoint(reactor, 1143, interface="127.0.0.1")
    internet.StreamServerEndpointService(endpoint, Factory()).setServiceParent(top)
    notifier = ReadyNotifier("serving imap", env_for(manager))
    notifier.setServiceParent(top)
    return top, notifier


def test_ready_after_the_listeners_and_stopping_first(manager: socket.socket) -> None:
    reactor = MemoryReactorClock()
    top, _ = listening_tree(reactor, manager)
    top.privilegedStartService()
    assert reactor.tcpServers and pending(manager) == []  # bound, not yet started
    top.startService()
    assert pending(manager) == [b"READY=1\nSTATUS=serving imap"]
    top.stopService()
    assert pending(manager) == [b"STOPPING=1\nSTATUS=draining sessions"]


def test_no_ready_when_a_listener_could_not_bind(manager: socket.socket) -> None:
    reactor = RaisingMemoryReactor(listenException=CannotListenError("127.0.0.1", 1143,
                                                                     OSError("in use")))
    top, _ = listening_tree(reactor, manager)
    top.privilegedStartService()
    top.startService()
    assert pending(manager) == [b"STATUS=a listener could not bind"]


def test_status_names_every_listener() -> None:
    listeners = [Listener("imap", "127.0.0.1", 143, "starttls"),
                 Listener("pop3", "::1", 995, "implicit", proxy_protocol=True)]
    assert serving(listeners) == ("serving imap on 127.0.0.1:143 (starttls), "
                                  "pop3 on [::1]:995 (implicit, PROXY header)")


def test_start_line_names_version_and_stack(tmp_path: Path) -> None:
    from OpenSSL import SSL

    assert stack().startswith("Python ")
    assert SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode() in stack()
    assert __version__ and __version__[0].isdigit()


def test_only_the_main_process_notifies(tmp_path: Path) -> None:
    """Workers inherit $NOTIFY_SOCKET, but systemd takes READY=1 from the main PID only."""
    (tmp_path / "users.map").write_text("* 10.0.0.1\n")
    path = tmp_path / "imapproxy.toml"
    path.write_text('workers = 2\n[[listen]]\naddress = "127.0.0.1:1143"\ntls = "none"\n'
                    '[tls]\nplaintext_auth = true\n[directory]\nmap = "users.map"\n')
    main = build_service(load(path), MemoryReactorClock())
    worker = build_service(load(path), MemoryReactorClock(), worker=True, worker_index=1)
    assert [type(s) for s in main][-1] is ReadyNotifier and list(main)[-1].systemd
    # A worker keeps its readiness for GET /readyz, and tells systemd nothing.
    assert [type(s) for s in worker][-1] is ReadyNotifier and not list(worker)[-1].systemd

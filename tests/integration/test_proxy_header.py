"""PROXY headers without IP addresses from a trusted load balancer (issue 12): AF_UNIX,
AF_UNSPEC, LOCAL and v1 UNKNOWN headers, from raw sockets and from a real HAProxy that
listens on a UNIX socket, log in through the proxy to the rig's Dovecot normally; and
a real HAProxy's v1 line and v2 header with a CRC32C TLV (our parser against the
reference sender) give the client's address."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import ProxyProcess, imap_config

from imapproxy.proxyprotocol import V2_SIGNATURE

HOST = "127.0.0.1"
#: a client address other than HAProxy's (Linux routes all of 127.0.0.0/8 to lo)
CLIENT = "127.0.0.2"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


UNIX_BODY = b"/run/haproxy/client.sock".ljust(108, b"\0") + b"/run/imap.sock".ljust(108, b"\0")
HEADERS = {
    "v2 AF_UNIX stream": v2(0x21, 0x31, UNIX_BODY),
    "v2 AF_UNIX datagram": v2(0x21, 0x32, UNIX_BODY),
    "v2 AF_UNSPEC": v2(0x21, 0x00, b""),
    "v2 LOCAL": v2(0x20, 0x00, b""),
    "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, store1: Dovecot) -> Iterator[ProxyProcess]:
    port = free_port()
    config = imap_config(port, extra=f"""
[proxy_protocol]
trusted = ["127.0.0.1/32"]

[backend]
imap_port = {store1.imap_port}
""").replace('tls = "none"\n', 'tls = "none"\nproxy_protocol = true\n', 1)
    process = ProxyProcess(tmp_path_factory.mktemp("pp"), config, [port],
                           {"users.map": "*  127.0.0.1\n"})
    # start() probes the port with a connection that sends no header: refused, logged.
    process.start()
    yield process
    process.stop()


@pytest.fixture
def alice(mail_users: list[MailUser]) -> MailUser:
    return mail_users[0]


def converse(sock: socket.socket, alice: MailUser) -> bytes:
    """Log in, select INBOX and log out; everything the proxy sent back."""
    reader = sock.makefile("rb")
    lines = [reader.readline()]
    for tag, command in ((b"a", f'LOGIN {alice.name} "{alice.password}"'.encode()),
                         (b"b", b"SELECT INBOX"), (b"c", b"LOGOUT")):
        sock.sendall(tag + b" " + command + b"\r\n")
        while not (line := reader.readline()).startswith(tag + b" ") and line:
            lines.append(line)
        lines.append(line)
    assert reader.read() == b""  # closed after LOGOUT
    return b"".join(lines)


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
def test_headers_without_ip_addresses_log_in_to_dovecot(proxy: ProxyProcess, alice: MailUser,
                                                        header: bytes) -> None:
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(header)
        transcript = converse(sock, alice)
    assert transcript.startswith(b"* OK [CAPABILITY")
    for tag in (b"a", b"b", b"c"):
        assert b"\r\n" + tag + b" OK" in transcript, transcript
    assert "Traceback" not in proxy.log()


HAPROXY_CONFIG = """
global
    maxconn 20
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend front
    bind {bind}
    default_backend proxy
backend proxy
    server p 127.0.0.1:{port} {send}
"""


@contextlib.contextmanager
def haproxy_in_front(tmp_path: Path, bind: str, port: int, send: str,
                     ready: Callable[[], bool]) -> Iterator[None]:
    """A real HAProxy listening on ``bind``, passing connections to ``port`` with ``send``
    (its server option: send-proxy, send-proxy-v2, proxy-v2-options ...)."""
    if not Path(HAPROXY).exists():
        pytest.fail("haproxy is not installed: run scripts/install-deps")
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(bind=bind, port=port, send=send))
    with (tmp_path / "haproxy.log").open("ab") as log:
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            assert haproxy.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "haproxy.log").read_text()
            time.sleep(0.05)
        yield
    finally:
        haproxy.terminate()
        haproxy.wait(10)


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy",
                                  "send-proxy-v2 proxy-v2-options crc32c"])
def test_haproxy_on_a_unix_socket_in_front(proxy: ProxyProcess, alice: MailUser,
                                           tmp_path: Path, send: str) -> None:
    """What HAProxy sends for a client on a UNIX socket (the header the issue saw); with
    crc32c, a checksum TLV after the two 108-byte paths, which the proxy checks."""
    path = tmp_path / "imap.sock"
    with haproxy_in_front(tmp_path, f"unix@{path}", proxy.port, send, path.exists), \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        transcript = converse(sock, alice)
    for tag in (b"a", b"b", b"c"):
        assert b"\r\n" + tag + b" OK" in transcript, transcript
    log = proxy.log()
    assert "Traceback" not in log
    assert "] login id=" in log


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2 proxy-v2-options crc32c"])
def test_haproxy_over_tcp_in_front(proxy: ProxyProcess, alice: MailUser, tmp_path: Path,
                                   send: str) -> None:
    """A v1 line and a v2 header with a CRC32C TLV from a real HAProxy: the proxy logs
    the client's address (127.0.0.2), not HAProxy's (127.0.0.1)."""
    port = free_port()
    with haproxy_in_front(tmp_path, f"{HOST}:{port}", proxy.port, send,
                          lambda: _accepts(port)), \
            socket.create_connection((HOST, port), source_address=(CLIENT, 0),
                                     timeout=10) as sock:
        transcript = converse(sock, alice)
    for tag in (b"a", b"b", b"c"):
        assert b"\r\n" + tag + b" OK" in transcript, transcript
    logins = [line for line in proxy.log().splitlines()
              if "] login id=" in line and f"user=<{alice.name}>" in line]
    assert logins and f" client={CLIENT} " in logins[-1], logins
    assert "Traceback" not in proxy.log()

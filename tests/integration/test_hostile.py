"""Hostile clients against a live proxy in front of real Dovecot (issue 7).

Every attack is followed by ``assert_serves``: another client still logs in and works.
The proxy under attack has short limits so the suite stays quick: a 3 s pre-auth
timeout, 40 connections per address, a brute-force delay of 5 ms doubling to 40 ms.
Timing assertions are lower bounds only (a scheduled delay never fires early), so a
loaded machine cannot make them fail.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import poplib
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import ProxyProcess

HOST = "127.0.0.1"
PREAUTH_TIMEOUT = 3
PER_IP = 40
BASE_DELAY = 0.005
MAX_DELAY = 0.04


@dataclass
class Proxy:
    process: ProxyProcess
    imap: int
    imaps: int
    starttls: int
    pop3: int
    passwords: dict[str, str]

    def log(self) -> str:
        return self.process.log()

    def rss_kib(self) -> int:
        assert self.process.process is not None
        status = Path(f"/proc/{self.process.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, store1: Dovecot, store2: Dovecot,
          mail_users: list[MailUser], test_ca: object) -> Iterator[Proxy]:
    cert = test_ca.issue("localhost")  # type: ignore[attr-defined]
    imap, imaps, starttls, pop3 = free_port(), free_port(), free_port(), free_port()
    # Every user's mailbox is on store1; the map names no port, so IMAP logins go to
    # its IMAP port and POP3 logins to its POP3 port ([backend] below).
    routes = "*  127.0.0.1\n"
    config = f"""
[[listen]]
protocol = "imap"
address = "{HOST}:{imap}"
tls = "none"

[[listen]]
protocol = "imap"
address = "{HOST}:{imaps}"
tls = "implicit"

[[listen]]
protocol = "imap"
address = "{HOST}:{starttls}"
tls = "starttls"

[[listen]]
protocol = "pop3"
address = "{HOST}:{pop3}"
tls = "none"

[tls]
certificate = "{cert.chain_path}"
key = "{cert.key_path}"
plaintext_auth = true

[directory]
type = "static"
map = "users.map"

[backend]
connect_timeout = 3
imap_port = {store1.imap_port}
pop3_port = {store1.pop3_port}

[limits]
preauth_timeout = {PREAUTH_TIMEOUT}
max_connections_per_ip = {PER_IP}
login_delay = {BASE_DELAY}
login_delay_max = {MAX_DELAY}
"""
    process = ProxyProcess(tmp_path_factory.mktemp("hostile"), config,
                           [imap, imaps, starttls, pop3], {"users.map": routes})
    process.start()
    yield Proxy(process, imap, imaps, starttls, pop3, {u.name: u.password for u in mail_users})
    process.stop()


# -- helpers -----------------------------------------------------------------------------


def connect(port: int, source: str = HOST, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 15.0, limit: int = 1 << 20) -> bytes:
    """Everything the proxy sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data
    except TimeoutError:
        raise AssertionError(f"still open after {timeout}s; got {data[-300:]!r}") from None
    raise AssertionError("too much data")


def read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; buffered {bytes(buffer)!r}")
        buffer += chunk
    end = buffer.index(b"\r\n") + 2
    line = bytes(buffer[:end])
    del buffer[:end]
    return line


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating the proxy closing the connection half way (it may)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


class SourceIMAP4(imaplib.IMAP4):
    """imaplib from a chosen local address (127.0.0.0/8 all reach the proxy)."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__(HOST, port, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


class SourcePOP3(poplib.POP3):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__(HOST, port, timeout=15)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def assert_serves(proxy: Proxy, user: str = "alice", source: str = HOST) -> None:
    """Another client still logs in through the proxy and works (IMAP and POP3)."""
    client = SourceIMAP4(proxy.imap, source)
    try:
        assert client.login(user, proxy.passwords[user])[0] == "OK"
        typ, data = client.select("INBOX")
        assert typ == "OK", data
        assert client.noop()[0] == "OK"
    finally:
        with contextlib.suppress(imaplib.IMAP4.abort, OSError):
            client.logout()
    pop = SourcePOP3(proxy.pop3, source)
    try:
        pop.user(user)
        assert pop.pass_(proxy.passwords[user]).startswith(b"+OK")
        pop.stat()
    finally:
        pop.quit()


def imap_exchange(proxy: Proxy, payload: bytes) -> bytes:
    """After the greeting: ``payload`` and a LOGOUT; what the proxy says until it closes."""
    return exchange(proxy.imap, payload + b"zz LOGOUT\r\n", b"* OK")


def pop3_exchange(proxy: Proxy, payload: bytes) -> bytes:
    return exchange(proxy.pop3, payload + b"QUIT\r\n", b"+OK")


def exchange(port: int, payload: bytes, greeting: bytes) -> bytes:
    sock = connect(port)
    buffer = bytearray()
    assert read_line(sock, buffer).startswith(greeting)
    send_all(sock, payload)
    data = bytes(buffer) + read_until_closed(sock)
    sock.close()
    return data


# -- oversized and malformed input ----------------------------------------------------


def test_ten_megabyte_line_without_crlf(proxy: Proxy) -> None:
    before = proxy.rss_kib()
    sock = connect(proxy.imap)
    buffer = bytearray()
    read_line(sock, buffer)
    chunk = b"a" * 65536
    try:
        for _ in range(160):  # 10 MiB, no line end
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the proxy hung up after its BYE: what we want
    reply = bytes(buffer) + read_until_closed(sock)
    assert reply in (b"", b"* BYE Line too long\r\n")  # a reset may eat the BYE
    assert proxy.rss_kib() - before < 20_000  # the line was never buffered
    assert_serves(proxy)


@pytest.mark.parametrize("size", [b"9223372036854775808", b"18446744073709551616",
                                  b"99999999999999999999"])
def test_literal_of_two_to_the_63(proxy: Proxy, size: bytes) -> None:
    reply = imap_exchange(proxy, b"a1 LOGIN {" + size + b"}\r\na2 NOOP\r\n")
    assert b"a1 BAD Literal too large\r\n" in reply
    assert b"a2 OK NOOP completed\r\n" in reply  # the connection goes on
    # Non-synchronising (RFC 7888): the data would follow at once, so the stream is lost.
    reply = imap_exchange(proxy, b"a1 LOGIN {" + size + b"+}\r\nxxxxxxxx")
    assert reply.endswith(b"* BYE Literal too large\r\n")
    assert_serves(proxy)


def test_negative_and_non_numeric_literal_sizes(proxy: Proxy) -> None:
    lines = [b"{-1}", b"{-9223372036854775808}", b"{abc}", b"{}", b"{ 5}", b"{5 }", b"{0x10}",
             b"{1e3}", b"{123456789012345678901234567890}", b"{5++}"]
    payload = b"".join(b"t%d LOGIN %s\r\n" % (i, line) for i, line in enumerate(lines))
    payload += b"t99 NOOP\r\n"
    reply = imap_exchange(proxy, payload)
    # Ten invalid commands is the limit: the tenth BAD comes with a BYE.
    assert reply.count(b" BAD ") == len(lines)
    assert reply.endswith(b"* BYE Too many invalid commands\r\n")
    assert_serves(proxy)


def test_nul_bytes(proxy: Proxy) -> None:
    reply = imap_exchange(proxy, b'a1 LOGIN "al\x00ice" pw\r\n\x00\x00\x00\r\n'
                                 b"a3 LOGIN {6+}\r\nal\x00ice pw\r\na4 N\x00OP\r\na5 NOOP\r\n")
    assert b"a1 BAD " in reply and b"* BAD " in reply
    # A name with NUL (in a literal) is no protocol error but a failed login, refused
    # before any lookup (usernames.username_problem) and counted by the penalty.
    assert b"a3 NO [AUTHENTICATIONFAILED] " in reply
    assert b"a4 BAD " in reply and b"a5 OK NOOP completed\r\n" in reply
    pop = pop3_exchange(proxy, b"USER al\x00ice\r\nPASS x\r\n\x00\x00\r\nCAPA\r\n")
    assert b"-ERR [AUTH] Authentication failed\r\n" in pop
    assert pop.count(b"-ERR") == 2 and b"+OK Capability list follows" in pop
    assert_serves(proxy)


def test_invalid_utf8(proxy: Proxy) -> None:
    reply = imap_exchange(proxy, b"a1 LOGIN \xff\xfe\xfd pw\r\na2 LOGIN \"\xc3\x28\" pw\r\n"
                                 b"a3 AUTHENTICATE PLAIN " + base64.b64encode(b"\x00\xff\x00pw")
                          + b"\r\na4 NOOP\r\n")
    # Names that are not UTF-8 are failed logins, refused before any lookup.
    for tag in (b"a1", b"a2", b"a3"):
        assert tag + b" NO [AUTHENTICATIONFAILED] Authentication failed\r\n" in reply
    assert b"a4 OK NOOP completed\r\n" in reply
    pop = pop3_exchange(proxy, b"USER \xff\xfe\r\nPASS pw\r\nCAPA\r\n")
    assert b"-ERR [AUTH] Authentication failed\r\n" in pop
    assert_serves(proxy)


def test_a_thousand_pipelined_bad_commands(proxy: Proxy) -> None:
    payload = b"".join(b"x%d FROB\r\n" % i for i in range(1000))
    reply = imap_exchange(proxy, payload)
    lines = reply.splitlines()
    assert lines[:10] == [b"x%d BAD Unknown command" % i for i in range(10)]
    assert lines[10:] == [b"* BYE Too many invalid commands"]
    pop = pop3_exchange(proxy, b"FROB\r\n" * 1000)
    assert pop.count(b"\r\n") == 10 and pop.endswith(
        b"-ERR Unknown command; too many invalid commands, closing\r\n")
    assert_serves(proxy)


def test_pipelined_commands_whose_replies_are_never_read(proxy: Proxy) -> None:
    """26 MB of NOOPs, no reply read: the proxy stops reading instead of piling up replies."""
    before = proxy.rss_kib()
    sock = connect(proxy.imap)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(3.0)  # far longer than the proxy needs to take in a chunk
    chunk = b"a NOOP\r\n" * 8192
    sent = 0
    try:
        while sent < 26_000_000:
            sent += sock.send(chunk)
    except TimeoutError:
        pass  # the proxy stopped reading: backpressure, what we want
    grown = proxy.rss_kib() - before
    sock.close()
    assert sent < 26_000_000, "the proxy should stop reading a client that does not read"
    assert grown < 10_000, f"proxy memory grew by {grown} KiB"
    assert_serves(proxy)


# -- TLS garbage ------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    os.urandom(4096),
    b"\x16\x03\x01\xff\xff" + os.urandom(200),  # a handshake record claiming 64 KiB
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello that ends at once
    b"a1 LOGIN alice secret\r\n",  # plaintext on the TLS port
    b"\x80\x2e\x01\x00\x02" + os.urandom(48),  # an SSLv2-style hello
])
def test_tls_handshake_garbage(proxy: Proxy, garbage: bytes,
                               client_tls: ssl.SSLContext) -> None:
    sock = connect(proxy.imaps)
    send_all(sock, garbage)
    read_until_closed(sock, timeout=PREAUTH_TIMEOUT + 10)
    # STARTTLS, then garbage instead of a ClientHello.
    sock = connect(proxy.starttls)
    buffer = bytearray()
    read_line(sock, buffer)
    sock.sendall(b"s1 STARTTLS\r\n")
    assert read_line(sock, buffer) == b"s1 OK Begin TLS negotiation now\r\n"
    send_all(sock, garbage)
    read_until_closed(sock, timeout=PREAUTH_TIMEOUT + 10)
    # A real TLS client still gets in on both ports.
    client = imaplib.IMAP4_SSL(HOST, proxy.imaps, ssl_context=client_tls, timeout=15)
    assert client.login("alice", proxy.passwords["alice"])[0] == "OK"
    client.logout()
    assert_serves(proxy)


# -- slow and half-open clients -----------------------------------------------------------


def test_half_open_connections(proxy: Proxy) -> None:
    started = time.monotonic()
    # Silent clients: connected, never a byte.
    silent = [connect(proxy.imap) for _ in range(10)] + [connect(proxy.pop3) for _ in range(5)]
    # Clients that close their sending side half way through a command, or just after
    # a pipelined LOGIN; and one that sends a LOGIN and never reads.
    half: list[socket.socket] = []
    for payload in (b"a1 LOG", b"a1 LOGIN alice", b"a1 LOGIN alice " +
                    proxy.passwords["alice"].encode() + b"\r\na2 SELECT INBOX\r\n"):
        sock = connect(proxy.imap)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        half.append(sock)
    assert_serves(proxy)  # meanwhile, everyone else is served
    for sock in half:
        read_until_closed(sock)  # the proxy closes them, it does not wait forever
    for sock in silent:
        data = read_until_closed(sock, timeout=PREAUTH_TIMEOUT + 15)
        assert data.endswith((b"* BYE Autologout; idle for too long\r\n",
                              b"-ERR Autologout; idle for too long\r\n"))
    # Not closed before their time (less the reactor's timer slack, a few ms).
    assert time.monotonic() - started >= PREAUTH_TIMEOUT - 0.1
    assert_serves(proxy)


def test_slowloris(proxy: Proxy) -> None:
    """A byte every half second never completes a login: the pre-auth timeout ends it."""
    sockets = [connect(proxy.imap) for _ in range(20)]
    stop = threading.Event()

    def drip() -> None:
        message = b"a1 LOGIN alice " + b"x" * 1000
        for byte in message:
            if stop.wait(0.5):
                return
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(1)
        assert_serves(proxy)  # served while the attack goes on
        for sock in sockets:
            data = read_until_closed(sock, timeout=PREAUTH_TIMEOUT + 15)
            assert data.endswith(b"* BYE Autologout; idle for too long\r\n")
    finally:
        stop.set()
        dripper.join()
    assert_serves(proxy)


# -- floods from one address ------------------------------------------------------------


def test_a_thousand_connections_from_one_address(proxy: Proxy) -> None:
    source = "127.0.0.5"
    sockets = [connect(proxy.imap, source, timeout=30) for _ in range(1000)]
    greetings: list[bytes] = []
    for sock in sockets:
        greetings.append(read_line(sock, bytearray()))
    refused = b"* BYE [UNAVAILABLE] Too many connections from this address, try again later\r\n"
    assert sum(g.startswith(b"* OK [CAPABILITY") for g in greetings) == PER_IP
    assert greetings.count(refused) == 1000 - PER_IP
    assert greetings[:PER_IP] == [greetings[0]] * PER_IP  # the first ones got in
    # Refused ones are closed cleanly; the listener is alive for another address.
    for sock in sockets[PER_IP:]:
        assert read_until_closed(sock) == b""
        sock.close()
    assert_serves(proxy, source="127.0.0.6")
    assert_serves(proxy)
    for sock in sockets[:PER_IP]:
        sock.close()
    # Once they are gone the address is welcome again (after the proxy saw them close).
    deadline = time.monotonic() + 30
    while True:
        sock = connect(proxy.imap, source)
        greeting = read_line(sock, bytearray())
        sock.close()
        if greeting.startswith(b"* OK") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert greeting.startswith(b"* OK")
    assert_serves(proxy, source=source)


def guess(proxy: Proxy, source: str, user: str, attempts: list[int]) -> set[bytes]:
    """Wrong passwords, each on a fresh connection, until the list is empty."""
    replies = set()
    while attempts:
        sock = connect(proxy.imap, source)
        buffer = bytearray()
        read_line(sock, buffer)
        try:
            n = attempts.pop()
            tag = b"w%d" % n
            sock.sendall(tag + b" LOGIN " + user.encode() + b" wrong-%d\r\n" % n)
            line = read_line(sock, buffer)
            assert line.startswith(tag + b" NO "), line
            replies.add(line[len(tag):])
        finally:
            sock.close()
    return replies


def test_thirty_wrong_passwords_three_at_a_time(proxy: Proxy) -> None:
    """30 distinct wrong passwords for one user from one address, three clients at a time:
    the penalty is paid before each check, so they reach the backend one at a time.
    (Three: a queued client waits for the checks ahead of it, each of which Dovecot
    answers in half a second here, and this module's pre-auth timeout is 3 s.)"""
    source, user, workers = "127.0.0.7", "dave", 3
    started = time.monotonic()
    attempts = list(range(30))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda _: guess(proxy, source, user, attempts),
                                range(workers)))
    elapsed = time.monotonic() - started
    assert set().union(*results) == {b" NO [AUTHENTICATIONFAILED] Authentication failed\r\n"}
    # After the first four (an address without failures may have four checks at once),
    # each check waited the capped penalty after the one before it ended: a lower bound
    # on the time taken (a penalty never ends early).
    waits = [float(w) for w in re.findall(
        rf"login delayed id=\S+ client={re.escape(source)} user=<{user}> "
        r"waited=([0-9.]+)s", proxy.log())]
    assert len(waits) >= 25
    assert elapsed >= (30 - 4 - 3) * MAX_DELAY
    # The right password still works, from another address and from the same one.
    assert_serves(proxy, user=user, source="127.0.0.8")
    assert_serves(proxy, user=user, source=source)

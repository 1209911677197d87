"""ALPN and cross-protocol attacks (ALPACA) against the real proxy in front of Dovecot.

Clients on modern TLS stacks offer ALPN: `imap` on the IMAP listeners and `pop3` on the
POP3 ones is selected and the session goes on to the backend; ALPN without the
listener's protocol (a browser's h2/http/1.1) is refused with no_application_protocol
(RFC 7301 section 3.2); no ALPN at all is served as before. And an HTTP request sent to
any listener is closed at once, with nothing of it echoed.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import ProxyProcess

HOST = "127.0.0.1"


@dataclass
class Listeners:
    process: ProxyProcess
    imap: int
    imaps: int
    starttls: int
    pop3: int
    pop3s: int
    stls: int


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, store1: Dovecot,
          test_ca: object) -> Iterator[Listeners]:
    cert = test_ca.issue("localhost")  # type: ignore[attr-defined]
    ports = [free_port() for _ in range(6)]
    kinds = [("imap", "none"), ("imap", "implicit"), ("imap", "starttls"),
             ("pop3", "none"), ("pop3", "implicit"), ("pop3", "starttls")]
    listen = "".join(f'[[listen]]\nprotocol = "{protocol}"\naddress = "{HOST}:{port}"\n'
                     f'tls = "{tls}"\n\n'
                     for (protocol, tls), port in zip(kinds, ports, strict=True))
    config = f"""{listen}
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
login_delay = 0.01
login_delay_max = 0.05
"""
    process = ProxyProcess(tmp_path_factory.mktemp("alpaca"), config, ports,
                           {"users.map": "*  127.0.0.1\n"})
    process.start()
    yield Listeners(process, *ports)
    process.stop()
    assert "Traceback" not in process.log()


@pytest.fixture
def alice(mail_users: list[MailUser]) -> MailUser:
    return mail_users[0]


def tls_context(test_ca: object, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(test_ca.ca_path))  # type: ignore[attr-defined]
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def logged(proxy: Listeners, text: str) -> int:
    """How many lines of the proxy's log hold ``text``."""
    return sum(text in line for line in proxy.process.log().splitlines())


def wait_for_log(proxy: Listeners, text: str, count: int) -> None:
    """Until ``count`` lines hold ``text`` (5 s at most: the session-end line is written
    just after the client saw the connection close)."""
    deadline = time.monotonic() + 5
    while logged(proxy, text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proxy.process.log()}"
        time.sleep(0.05)


# -- ALPN with Python's ssl ------------------------------------------------------------------


@pytest.mark.parametrize("alpn", [["imap"], ["h2", "imap"], None])
def test_imaps_and_starttls_serve_a_client_offering_imap(
        proxy: Listeners, alice: MailUser, test_ca: object, alpn: list[str] | None) -> None:
    context = tls_context(test_ca, alpn)
    with imaplib.IMAP4_SSL(HOST, proxy.imaps, ssl_context=context, timeout=10) as client:
        assert client.sock.selected_alpn_protocol() == (alpn and "imap")
        client.login(alice.name, alice.password)
        assert client.select("INBOX")[0] == "OK"
    with imaplib.IMAP4(HOST, proxy.starttls, timeout=10) as client:
        client.starttls(ssl_context=context)
        assert client.sock.selected_alpn_protocol() == (alpn and "imap")
        client.login(alice.name, alice.password)
        assert client.select("INBOX")[0] == "OK"


@pytest.mark.parametrize("alpn", [["pop3"], ["http/1.1", "pop3"], None])
def test_pop3s_and_stls_serve_a_client_offering_pop3(
        proxy: Listeners, alice: MailUser, test_ca: object, alpn: list[str] | None) -> None:
    context = tls_context(test_ca, alpn)
    client = poplib.POP3_SSL(HOST, proxy.pop3s, context=context, timeout=10)
    assert client.sock.selected_alpn_protocol() == (alpn and "pop3")
    client.user(alice.name)
    client.pass_(alice.password)
    assert client.stat()[0] >= 0
    client.quit()
    client = poplib.POP3(HOST, proxy.stls, timeout=10)
    client.stls(context=context)
    assert client.sock.selected_alpn_protocol() == (alpn and "pop3")
    client.user(alice.name)
    client.pass_(alice.password)
    client.quit()


@pytest.mark.parametrize(("listener", "alpn"), [
    ("imaps", ["h2", "http/1.1"]), ("imaps", ["pop3"]), ("pop3s", ["imap"]),
    ("pop3s", ["http/1.1"]),
])
def test_alpn_without_the_listener_protocol_is_refused(
        proxy: Listeners, test_ca: object, listener: str, alpn: list[str]) -> None:
    context = tls_context(test_ca, alpn)
    before = logged(proxy, "reason=TLS: no application protocol")
    with socket.create_connection((HOST, getattr(proxy, listener)), timeout=10) as sock, \
            pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        context.wrap_socket(sock, server_hostname="localhost")
    wait_for_log(proxy, "reason=TLS: no application protocol", before + 1)


def test_starttls_and_stls_with_a_browser_alpn_are_refused(proxy: Listeners,
                                                          test_ca: object) -> None:
    context = tls_context(test_ca, ["http/1.1"])
    before = logged(proxy, "reason=TLS: no application protocol")
    client = imaplib.IMAP4(HOST, proxy.starttls, timeout=10)
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        client.starttls(ssl_context=context)
    pop = poplib.POP3(HOST, proxy.stls, timeout=10)
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        pop.stls(context=context)
    # (The failed handshake closed both sockets.)
    wait_for_log(proxy, "reason=TLS: no application protocol", before + 2)


# -- ALPN with openssl s_client --------------------------------------------------------------


def s_client(test_ca: object, port: int, alpn: str, commands: bytes,
             starttls: str | None = None) -> subprocess.CompletedProcess[bytes]:
    command = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost",
               "-CAfile", str(test_ca.ca_path), "-verify_return_error",  # type: ignore[attr-defined]
               "-alpn", alpn, "-ign_eof"]
    if starttls is not None:
        command += ["-starttls", starttls]
    return subprocess.run(command, input=commands, capture_output=True, timeout=30)


@pytest.mark.parametrize("listener", ["imaps", "starttls"])
def test_openssl_s_client_alpn_imap(proxy: Listeners, alice: MailUser, test_ca: object,
                                    listener: str) -> None:
    done = s_client(test_ca, getattr(proxy, listener), "imap",
                    f"a LOGIN {alice.name} {alice.password}\r\nb LOGOUT\r\n".encode(),
                    starttls="imap" if listener == "starttls" else None)
    assert b"ALPN protocol: imap" in done.stdout, done.stdout + done.stderr
    assert b"a OK" in done.stdout and b"b OK" in done.stdout, done.stdout


def test_openssl_s_client_alpn_pop3(proxy: Listeners, alice: MailUser,
                                    test_ca: object) -> None:
    done = s_client(test_ca, proxy.pop3s, "pop3",
                    f"USER {alice.name}\r\nPASS {alice.password}\r\nQUIT\r\n".encode())
    assert b"ALPN protocol: pop3" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count(b"+OK") >= 4, done.stdout  # greeting, USER, PASS, QUIT


def test_openssl_s_client_alpn_http_is_refused(proxy: Listeners, test_ca: object) -> None:
    done = s_client(test_ca, proxy.imaps, "http/1.1", b"a LOGOUT\r\n")
    assert done.returncode != 0
    assert b"no application protocol" in done.stderr, done.stderr
    assert b"* OK" not in done.stdout


# -- HTTP requests -------------------------------------------------------------------------

HTTP_REQUEST = (b"GET /<script>alert(1)</script> HTTP/1.1\r\nHost: mail.example.org\r\n"
                b"Accept: */*\r\n\r\n<script>alert(document.cookie)</script>\r\n")


def read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("listener", ["imap", "imaps", "starttls", "pop3", "pop3s", "stls"])
def test_http_request_is_closed_at_once_without_echo(proxy: Listeners, test_ca: object,
                                                     listener: str) -> None:
    before = logged(proxy, "reason=HTTP request")
    sock: socket.socket | ssl.SSLSocket = socket.create_connection(
        (HOST, getattr(proxy, listener)), timeout=10)
    with sock:
        if listener in ("imaps", "pop3s"):
            # As a client that offers no ALPN (a browser would be refused before this).
            sock = tls_context(test_ca, None).wrap_socket(sock, server_hostname="localhost")
        greeting = sock.recv(65536)
        assert greeting.startswith((b"* OK", b"+OK"))
        sock.sendall(HTTP_REQUEST)
        started = time.monotonic()
        rest = read_all(sock)
        assert time.monotonic() - started < 2  # closed at once, not at the pre-auth timeout
    assert rest == b""
    wait_for_log(proxy, "reason=HTTP request", before + 1)
    assert "<script" not in proxy.process.log()  # nothing of the request in the log either

"""The POP3 proxy end to end: real Dovecot POP3 behind, poplib and raw sockets in front.

Message counts are always relative, and every message a test delivers it also deletes,
so the shared stores stay as the IMAP tests expect them.
"""

from __future__ import annotations

import base64
import poplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from rig.certs import TestCA
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess

HOST = "127.0.0.1"
WRONG_PASSWORD = "not-the-password-xyzzy"


def pop3_map(store1: Dovecot, store2: Dovecot, mail_users: list[MailUser], down_port: int,
             port_of: str = "pop3_port") -> str:
    """alice, carol, erin on store1, the others on store2; ghost's backend is down."""
    lines = [f"ghost  127.0.0.1:{down_port}"]
    for user in mail_users:
        store = store1 if user.name in ("alice", "carol", "erin") else store2
        lines.append(f"{user.name}  127.0.0.1:{getattr(store, port_of)}")
    return "\n".join(lines) + "\n"


def listen(port: int, tls: str) -> str:
    return f'[[listen]]\nprotocol = "pop3"\naddress = "127.0.0.1:{port}"\ntls = "{tls}"\n\n'


@dataclass(frozen=True)
class TlsProxy:
    process: ProxyProcess
    plain: int
    starttls: int
    implicit: int

    def log(self) -> str:
        return self.process.log()


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory: pytest.TempPathFactory, store1: Dovecot, store2: Dovecot,
              mail_users: list[MailUser], test_ca: TestCA) -> Iterator[TlsProxy]:
    """plaintext_auth = false; listeners without TLS, with STLS and POP3S; the proxy talks
    STLS to the backends (exercising the backend dialogue's STLS against Dovecot)."""
    cert = test_ca.issue("localhost")
    plain, starttls, implicit = free_port(), free_port(), free_port()
    config = (
        listen(plain, "none") + listen(starttls, "starttls") + listen(implicit, "implicit")
        + f'[tls]\ncertificate = "{cert.chain_path}"\nkey = "{cert.key_path}"\n'
        + "plaintext_auth = false\n\n"
        + '[directory]\ntype = "static"\nmap = "users.map"\n\n'
        + f'[backend]\ntls = "starttls"\nca_file = "{test_ca.ca_path}"\n'
        + "connect_timeout = 3\n\n" + RIG_LIMITS
    )
    routes = pop3_map(store1, store2, mail_users, free_port())
    process = ProxyProcess(tmp_path_factory.mktemp("pop3tls"), config,
                           [plain, starttls, implicit], {"users.map": routes})
    process.start()
    yield TlsProxy(process, plain, starttls, implicit)
    process.stop()


@pytest.fixture(scope="module")
def plain_proxy(tmp_path_factory: pytest.TempPathFactory, store1: Dovecot, store2: Dovecot,
                mail_users: list[MailUser]) -> Iterator[ProxyProcess]:
    """A proxy that allows plaintext login (a lab setup), for the bulk of the tests."""
    port = free_port()
    config = (listen(port, "none") + "[tls]\nplaintext_auth = true\n\n"
              + '[directory]\ntype = "static"\nmap = "users.map"\n\n'
              + "[backend]\nconnect_timeout = 3\n\n" + RIG_LIMITS)
    routes = pop3_map(store1, store2, mail_users, free_port())
    process = ProxyProcess(tmp_path_factory.mktemp("pop3plain"), config, [port],
                           {"users.map": routes})
    process.start()
    yield process
    process.stop()


def users(mail_users: list[MailUser]) -> dict[str, MailUser]:
    return {u.name: u for u in mail_users}


class RawPop3:
    """Exact bytes out, lines and multi-line replies in."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=10)
        self.sock: socket.socket = (tls.wrap_socket(sock, server_hostname="localhost")
                                    if tls else sock)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed; buffered {self.buffer[:200]!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def multiline(self) -> bytes:
        """The body of a multi-line reply, as on the wire (still dot-stuffed), without ".\\r\\n"."""
        while True:
            end = self.buffer.find(b"\r\n.\r\n")
            if end >= 0 or self.buffer.startswith(b".\r\n"):
                break
            self._fill()
        if self.buffer.startswith(b".\r\n"):
            self.buffer = self.buffer[3:]
            return b""
        body, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
        return body

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def at_eof(self) -> bool:
        return not self.buffer and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


# poplib has no AUTH; these reach its internals, the documented way to send other commands.
def shortcmd(client: poplib.POP3, line: str) -> bytes:
    """Send a command, return its +OK line (error_proto on -ERR)."""
    return client._shortcmd(line)  # type: ignore[attr-defined,no-any-return]


def putcmd(client: poplib.POP3, line: str) -> None:
    client._putcmd(line)  # type: ignore[attr-defined]


def getline(client: poplib.POP3) -> bytes:
    return client._getline()[0]  # type: ignore[attr-defined,no-any-return]


def plain_token(user: MailUser) -> bytes:
    return base64.b64encode(b"\0" + user.name.encode() + b"\0" + user.password.encode())


# -- TLS: STLS, POP3S, plaintext refused ------------------------------------------------------


def test_stls_then_login(tls_proxy: TlsProxy, mail_users: list[MailUser],
                         client_tls: ssl.SSLContext) -> None:
    alice = users(mail_users)["alice"]
    client = poplib.POP3(HOST, tls_proxy.starttls)
    caps = client.capa()
    assert "STLS" in caps and "PIPELINING" in caps and "RESP-CODES" in caps
    assert "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] TLS required"):
        client.user(alice.name)
    client.stls(context=client_tls)
    caps = client.capa()
    assert caps["SASL"] == ["PLAIN", "LOGIN"] and "USER" in caps and "STLS" not in caps
    client.user(alice.name)
    assert client.pass_(alice.password).startswith(b"+OK")
    count, _ = client.stat()
    assert count >= 0
    assert client.quit().startswith(b"+OK")


def test_pop3s_implicit_tls(tls_proxy: TlsProxy, mail_users: list[MailUser],
                            client_tls: ssl.SSLContext) -> None:
    bob = users(mail_users)["bob"]  # a password with spaces, quotes and a backslash
    client = poplib.POP3_SSL(HOST, tls_proxy.implicit, context=client_tls)
    assert "USER" in client.capa()
    client.user(bob.name)
    assert client.pass_(bob.password).startswith(b"+OK")
    client.stat()
    client.quit()


def test_plaintext_login_refused_without_tls(tls_proxy: TlsProxy,
                                            mail_users: list[MailUser]) -> None:
    alice = users(mail_users)["alice"]
    raw = RawPop3(tls_proxy.plain)
    token = plain_token(alice)
    raw.send(b"USER alice\r\nPASS " + alice.password.encode() + b"\r\nAUTH PLAIN " + token
             + b"\r\nSTLS\r\nQUIT\r\n")
    assert raw.line() == b"-ERR [AUTH] TLS required"
    assert raw.line() == b"-ERR [AUTH] TLS required"
    assert raw.line() == b"-ERR [AUTH] TLS required"
    assert raw.line() == b"-ERR STLS not available"
    assert raw.line().startswith(b"+OK")
    assert raw.at_eof()


def test_stls_discards_pipelined_plaintext(tls_proxy: TlsProxy, mail_users: list[MailUser],
                                           client_tls: ssl.SSLContext) -> None:
    alice = users(mail_users)["alice"]
    raw = RawPop3(tls_proxy.starttls)
    # RFC 2595 section 4: the USER/PASS behind STLS in the same packet must be dropped.
    raw.send(b"STLS\r\nUSER alice\r\nPASS " + alice.password.encode() + b"\r\n")
    assert raw.line().startswith(b"+OK")
    raw.starttls(client_tls)
    raw.send(b"PASS " + alice.password.encode() + b"\r\n")
    assert raw.line() == b"-ERR Send USER first"  # the plaintext USER never happened
    raw.close()


# -- USER/PASS, AUTH PLAIN, failures ----------------------------------------------------------


def test_auth_plain_with_and_without_initial_response(plain_proxy: ProxyProcess,
                                                      mail_users: list[MailUser]) -> None:
    carol = users(mail_users)["carol"]  # a non-ASCII password
    token = base64.b64encode(b"\0carol\0" + carol.password.encode("utf-8"))
    client = poplib.POP3(HOST, plain_proxy.port)
    assert shortcmd(client, "AUTH PLAIN " + token.decode()).startswith(b"+OK")
    client.stat()
    client.quit()

    client = poplib.POP3(HOST, plain_proxy.port)
    putcmd(client, "AUTH PLAIN")
    assert getline(client) == b"+ "
    assert shortcmd(client, token.decode()).startswith(b"+OK")
    client.stat()
    client.quit()


def test_auth_cancel_then_user_pass(plain_proxy: ProxyProcess,
                                    mail_users: list[MailUser]) -> None:
    dave = users(mail_users)["dave"]
    client = poplib.POP3(HOST, plain_proxy.port)
    putcmd(client, "AUTH PLAIN")
    assert getline(client) == b"+ "
    with pytest.raises(poplib.error_proto, match="cancelled"):
        shortcmd(client, "*")
    client.user(dave.name)
    assert client.pass_(dave.password).startswith(b"+OK")
    client.quit()


def test_wrong_password_then_retry_on_same_connection(plain_proxy: ProxyProcess,
                                                      mail_users: list[MailUser]) -> None:
    alice = users(mail_users)["alice"]
    client = poplib.POP3(HOST, plain_proxy.port)
    client.user(alice.name)
    with pytest.raises(poplib.error_proto) as wrong:
        client.pass_(WRONG_PASSWORD)
    client.user("nosuchuser")
    with pytest.raises(poplib.error_proto) as unknown:
        client.pass_(WRONG_PASSWORD)
    # No user enumeration: an unknown user gets the very same answer.
    assert wrong.value.args[0] == unknown.value.args[0] == b"-ERR [AUTH] Authentication failed"
    client.user(alice.name)
    assert client.pass_(alice.password) == b"+OK Logged in"
    client.stat()
    client.quit()


def test_backend_down_then_another_user(plain_proxy: ProxyProcess,
                                        mail_users: list[MailUser]) -> None:
    alice = users(mail_users)["alice"]
    client = poplib.POP3(HOST, plain_proxy.port)
    client.user("ghost")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]"):
        client.pass_("whatever")
    client.user(alice.name)
    assert client.pass_(alice.password).startswith(b"+OK")
    client.quit()


def test_preauth_errors(plain_proxy: ProxyProcess) -> None:
    raw = RawPop3(plain_proxy.port)
    assert raw.greeting.startswith(b"+OK")
    raw.send(b"STAT\r\nFROB\r\nAPOP alice 0123\r\nQUIT\r\n")
    assert raw.line() == b"-ERR Log in first"
    assert raw.line() == b"-ERR Unknown command"
    assert raw.line().startswith(b"-ERR APOP is not supported")
    assert raw.line().startswith(b"+OK")
    assert raw.at_eof()


# -- the transaction state, relayed ---------------------------------------------------------


def test_stat_list_uidl_retr_top_dele_quit(plain_proxy: ProxyProcess, store1: Dovecot,
                                           mail_users: list[MailUser]) -> None:
    erin = users(mail_users)["erin"]
    marker = f"pop3-{time.monotonic_ns()}"
    message = (f"From: a@example.org\r\nSubject: {marker}\r\n\r\nline one\r\n"
               ".starts with a dot\r\nline three\r\n").encode()
    store1.deliver("erin", message)
    before = store1.message_count("erin")

    client = poplib.POP3(HOST, plain_proxy.port)
    client.user(erin.name)
    client.pass_(erin.password)
    count, size = client.stat()
    assert count == before and size > 0
    listing = client.list()[1]
    assert len(listing) == count and listing[-1].startswith(b"%d " % count)
    uidls = client.uidl()[1]
    assert len(uidls) == count and len({u.split()[1] for u in uidls}) == count
    lines = client.retr(count)[1]
    assert f"Subject: {marker}".encode() in lines
    assert lines[-3:] == [b"line one", b".starts with a dot", b"line three"]  # unstuffed
    top = client.top(count, 1)[1]
    assert f"Subject: {marker}".encode() in top and b"line one" in top
    assert b"line three" not in top
    assert client.dele(count).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    assert store1.message_count("erin") == before - 1


def test_multi_megabyte_retr_byte_identical(plain_proxy: ProxyProcess, store2: Dovecot,
                                            mail_users: list[MailUser]) -> None:
    dave = users(mail_users)["dave"]
    body = b"".join(b"line %07d " % i + bytes(range(33, 127)) + b"\r\n" for i in range(50000))
    body += b".a line that needs dot-stuffing\r\n.\r\n..\r\n"
    store2.deliver("dave", b"From: a@example.org\r\nSubject: big pop3\r\n\r\n" + body)

    def fetch(port: int, delete: bool) -> bytes:
        raw = RawPop3(port)
        raw.send(b"USER dave\r\nPASS " + dave.password.encode() + b"\r\nSTAT\r\n")
        assert raw.line().startswith(b"+OK")
        assert raw.line().startswith(b"+OK")
        count = int(raw.line().split()[1])
        raw.send(b"RETR %d\r\n" % count)
        assert raw.line().startswith(b"+OK")
        wire = raw.multiline()
        raw.send((b"DELE %d\r\n" % count if delete else b"NOOP\r\n") + b"QUIT\r\n")
        assert raw.line().startswith(b"+OK")
        assert raw.line().startswith(b"+OK")
        raw.close()
        return wire

    direct = fetch(store2.pop3_port, delete=False)
    proxied = fetch(plain_proxy.port, delete=True)
    assert len(proxied) > 5_000_000
    assert proxied == direct  # byte for byte, dot-stuffing and all
    assert proxied.endswith(b"..a line that needs dot-stuffing\r\n..\r\n...\r\n")


def test_pipelined_commands_answered_in_order(plain_proxy: ProxyProcess,
                                              mail_users: list[MailUser]) -> None:
    frank = users(mail_users)["frank"]
    raw = RawPop3(plain_proxy.port)
    # RFC 2449 section 6.6: everything in one write; the part after PASS is relayed.
    raw.send(b"CAPA\r\nUSER frank\r\nPASS " + frank.password.encode()
             + b"\r\nSTAT\r\nLIST\r\nCAPA\r\nNOOP\r\nQUIT\r\n")
    assert raw.line().startswith(b"+OK")
    assert b"IMPLEMENTATION imapproxy" in raw.multiline()
    assert raw.line() == b"+OK Send PASS"
    assert raw.line() == b"+OK Logged in"
    count = int(raw.line().split()[1])
    assert raw.line().startswith(b"+OK")
    assert raw.multiline().count(b"\r\n") == count
    assert raw.line().startswith(b"+OK")
    backend_caps = raw.multiline()
    assert b"UIDL" in backend_caps and b"imapproxy" not in backend_caps  # Dovecot's own
    assert raw.line().startswith(b"+OK")  # NOOP
    assert raw.line().startswith(b"+OK")  # QUIT
    assert raw.at_eof()


# -- backend over implicit TLS, logs ---------------------------------------------------------


def test_backend_pop3s(start_proxy: Callable[..., ProxyProcess], store1: Dovecot,
                       store2: Dovecot, mail_users: list[MailUser], test_ca: TestCA) -> None:
    port = free_port()
    config = (listen(port, "none") + "[tls]\nplaintext_auth = true\n\n"
              + '[directory]\ntype = "static"\nmap = "users.map"\n\n'
              + f'[backend]\ntls = "implicit"\nca_file = "{test_ca.ca_path}"\n')
    routes = pop3_map(store1, store2, mail_users, free_port(), port_of="pop3s_port")
    start_proxy(config, [port], {"users.map": routes})
    carol = users(mail_users)["carol"]
    client = poplib.POP3(HOST, port)
    client.user(carol.name)
    assert client.pass_(carol.password).startswith(b"+OK")
    client.stat()
    client.quit()


def log_line(proxy: ProxyProcess, *parts: str) -> str:
    """The last log line holding all ``parts``, waiting up to 5 s for it to appear."""
    deadline = time.monotonic() + 5
    while True:
        lines = [x for x in proxy.log().splitlines() if all(p in x for p in parts)]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line with {parts}"
            return lines[-1]
        time.sleep(0.05)


def test_session_end_line(plain_proxy: ProxyProcess, store2: Dovecot,
                          mail_users: list[MailUser]) -> None:
    bob = users(mail_users)["bob"]
    client = poplib.POP3(HOST, plain_proxy.port)
    client.user(bob.name)
    client.pass_(bob.password)
    client.quit()
    line = log_line(plain_proxy, "session end", "user=<bob>")
    for field in ("client=127.0.0.1:", f"backend=127.0.0.1:{store2.pop3_port}", "duration=",
                  "in=", "out=", "reason="):
        assert field in line


def test_password_never_logged(plain_proxy: ProxyProcess, tls_proxy: TlsProxy,
                               mail_users: list[MailUser]) -> None:
    text = plain_proxy.log() + tls_proxy.log()
    assert "login id=" in text and "login failed" in text  # the log is really there
    assert WRONG_PASSWORD not in text
    for user in mail_users:
        assert user.password not in text
        assert plain_token(user).decode() not in text

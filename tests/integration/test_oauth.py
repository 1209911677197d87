"""OAuth 2.0 logins (OAUTHBEARER, XOAUTH2) and SASL LOGIN through the proxy (issue 16).

Two real Dovecots ("store1", "store2") check tokens with an oauth2 passdb that asks a
small introspection endpoint (tests/rig/oauth.py) the test owns; passwords stay in their
passwd-file passdb. The proxy only routes by the user the client's message names and
replays the exchange: Dovecot's log says who logged in where, and with what.
Real clients: curl --oauth2-bearer (IMAP, POP3; plain and TLS), imaplib's authenticate,
and raw sockets for the exact bytes of the failures, and for ManageSieve (sieve-connect
has no OAuth).
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rig.certs import CertPair, TestCA
from rig.dovecot import Dovecot, MailUser
from rig.oauth import TokenIntrospection
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess

HOST = "127.0.0.1"
TESTS = Path(__file__).resolve().parents[1]
#: token -> user; opaque strings of RFC 6750 b64token characters, as providers issue
TOKENS = {
    "ya29.alice-Tok3n_valid~1": "alice",  # store1
    "ya29.carol-Tok3n_valid~2": "carol",  # store1
    "ya29.bob-Tok3n_valid~3": "bob",  # store2
    "ya29.dave-Tok3n_valid~4": "dave",  # store2
}
TOKEN_OF = {user: token for token, user in TOKENS.items()}
#: no longer in the endpoint's table: introspection says {"active": false}
EXPIRED = "ya29.alice-Tok3n_expired~0"
STORE1_USERS = ("alice", "carol", "erin")
CLIENT_TIMEOUT = 20


@dataclass
class Rig:
    introspection: TokenIntrospection
    stores: dict[str, Dovecot]
    #: "imap", "pop3" -> the proxy for that protocol (one map each: the ports differ)
    proxies: dict[str, ProxyProcess]
    #: "imap" (STARTTLS offered), "imaps", "pop3" (STLS offered), "pop3s", and with
    #: Pigeonhole "managesieve" (STARTTLS offered), "managesieves" -> its port
    ports: dict[str, int]
    cert: CertPair
    users: list[MailUser]

    def store_of(self, user: str) -> Dovecot:
        return self.stores["store1" if user in STORE1_USERS else "store2"]

    def backend_logins(self, store: Dovecot) -> list[str]:
        """Dovecot's "Login:" lines: who logged in there, and by which mechanism."""
        return [line for line in store.log_path.read_text(errors="replace").splitlines()
                if "-login: Info: Login: " in line]

    def proxy_logs(self) -> list[str]:
        """Every line the proxies logged, debug events included."""
        lines: list[str] = []
        for proxy in self.proxies.values():
            lines += proxy.log().splitlines()
            events = proxy.workdir / "events.log"
            if events.exists():
                lines += events.read_text(encoding="utf-8", errors="replace").splitlines()
        return lines


ALL_MECHANISMS = '["PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"]'


def _proxy(workdir: Path, protocol: str, ports: dict[str, int], cert: CertPair,
           stores: dict[str, Dovecot], users: list[MailUser],
           mechanisms: str = ALL_MECHANISMS) -> ProxyProcess:
    """One protocol's proxy: a STARTTLS/STLS and an implicit TLS listener, plaintext
    logins allowed too (curl's plain case), every mechanism on, every event logged."""
    listeners = "".join(
        f'[[listen]]\nprotocol = "{protocol}"\naddress = "{HOST}:{ports[name]}"\n'
        f'tls = "{mode}"\n\n'
        for name, mode in ((protocol, "starttls"), (protocol + "s", "implicit")))
    config = (listeners
              + f'[tls]\ncertificate = "{cert.chain_path}"\nkey = "{cert.key_path}"\n'
              + "plaintext_auth = true\n\n"
              + f"[auth]\nmechanisms = {mechanisms}\n\n"
              + '[directory]\ntype = "static"\nmap = "users.map"\n\n'
              + '[backend]\nconnect_timeout = 3\n\n[log]\nlevel = "debug"\n\n' + RIG_LIMITS)
    port_of = {"imap": "imap_port", "pop3": "pop3_port", "managesieve": "sieve_port"}[protocol]
    routes = "".join(
        f"{u.name}  127.0.0.1:"
        f"{getattr(stores['store1' if u.name in STORE1_USERS else 'store2'], port_of)}\n"
        for u in users)
    env = dict(os.environ, IMAPPROXY_EVENT_LOG=str(workdir / "events.log"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS),
                                                        os.environ.get("PYTHONPATH")])))
    proxy = ProxyProcess(workdir, config, [ports[protocol], ports[protocol + "s"]],
                         {"users.map": routes}, extra_args=["--logger=rig.debuglog.observer"],
                         env=env)
    return proxy.start()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, mail_users: list[MailUser],
        server_cert: CertPair, test_ca: TestCA) -> Iterator[Rig]:
    introspection = TokenIntrospection(TOKENS)
    stores: dict[str, Dovecot] = {}
    proxies: dict[str, ProxyProcess] = {}
    try:
        for name in ("store1", "store2"):
            stores[name] = Dovecot(tmp_path_factory.mktemp(f"oauth-{name}"), mail_users,
                                   name=name, cert=server_cert,
                                   oauth2_introspection_url=introspection.url)
            stores[name].start()
        protocols = ["imap", "pop3"]
        if stores["store1"].sieve_port is not None:
            protocols.append("managesieve")
        ports = {name: free_port() for p in protocols for name in (p, p + "s")}
        cert = test_ca.issue("localhost", "127.0.0.1")
        for protocol in protocols:
            proxies[protocol] = _proxy(tmp_path_factory.mktemp(f"oauth-{protocol}-proxy"),
                                       protocol, ports, cert, stores, mail_users)
        yield Rig(introspection, stores, proxies, ports, cert, mail_users)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for store in stores.values():
            store.close()
        introspection.close()


# -- clients ---------------------------------------------------------------------------------

#: every base64 blob a test sent that holds a token, for the log check at the end
SENT: list[bytes] = []


def oauthbearer(user: str, token: str) -> bytes:
    """RFC 7628 section 3.1, as Thunderbird sends it: the user as authzid, host and port."""
    return (b"n,a=" + user.encode() + b",\x01host=localhost\x01port=993\x01auth=Bearer "
            + token.encode() + b"\x01\x01")


def xoauth2(user: str, token: str) -> bytes:
    return b"user=" + user.encode() + b"\x01auth=Bearer " + token.encode() + b"\x01\x01"


def b64(message: bytes) -> bytes:
    blob = base64.b64encode(message)
    SENT.append(blob)
    return blob


class Line:
    """Exact bytes out, CRLF lines in (IMAP or POP3, plain or TLS)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buffer[:200]!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def ask(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.line()

    def closed_within(self, seconds: float) -> bool:
        """True when the peer closes (after whatever it still sends) within ``seconds``."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(seconds)
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (TimeoutError, ConnectionResetError):
            return False
        return False

    def close(self) -> None:
        self.sock.close()


def curl(rig: Rig, test_ca: TestCA, scheme: str, user: str, *options: str,
         expect: int = 0) -> subprocess.CompletedProcess[str]:
    """curl LIST (IMAP: mailboxes; POP3: messages); it must exit by itself with ``expect``."""
    argv = ["curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT),
            "--cacert", str(test_ca.ca_path), "--user", user, *options,
            f"{scheme}://{HOST}:{rig.ports[scheme]}/"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 10,
                            check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == expect, (argv, result.stdout, result.stderr,
                                         "\n".join(rig.proxy_logs()[-20:]))
    return result


def new_lines(before: list[str], after: list[str]) -> list[str]:
    return after[len(before):]


# -- valid tokens, users on two stores --------------------------------------------------------


@pytest.mark.parametrize("scheme", ["imap", "imaps", "pop3", "pop3s"])
@pytest.mark.parametrize("user", ["alice", "bob"])
def test_curl_oauthbearer_reaches_the_users_store(rig: Rig, test_ca: TestCA, scheme: str,
                                                  user: str) -> None:
    # curl picks OAUTHBEARER when it is offered, with the user as authzid.
    store = rig.store_of(user)
    other = rig.stores["store2" if store.name == "store1" else "store1"]
    before, before_other = rig.backend_logins(store), rig.backend_logins(other)
    result = curl(rig, test_ca, scheme, user, "--oauth2-bearer", TOKEN_OF[user])
    assert ("INBOX" in result.stdout) if scheme.startswith("imap") else True
    logins = new_lines(before, rig.backend_logins(store))
    assert len(logins) == 1 and f"user=<{user}>, method=OAUTHBEARER" in logins[0], logins
    assert rig.backend_logins(other) == before_other
    assert any("login id=" in line and f"user=<{user}>" in line and "mechanism=OAUTHBEARER"
               in line for line in rig.proxy_logs())


@pytest.mark.parametrize("scheme", ["imaps", "pop3"])
def test_curl_xoauth2_from_a_proxy_that_offers_only_that(
        rig: Rig, test_ca: TestCA, scheme: str, tmp_path: Path) -> None:
    # curl 7.88 takes OAUTHBEARER whenever it is offered, whatever --login-options say;
    # [auth] mechanisms = ["XOAUTH2"] leaves it XOAUTH2 (and nothing else: checked too).
    protocol = scheme.rstrip("s")
    ports = {protocol: free_port(), protocol + "s": free_port()}
    proxy = _proxy(tmp_path, protocol, ports, rig.cert, rig.stores, rig.users, '["XOAUTH2"]')
    try:
        before = rig.backend_logins(rig.store_of("carol"))
        port_rig = Rig(rig.introspection, rig.stores, {protocol: proxy}, ports, rig.cert,
                       rig.users)
        curl(port_rig, test_ca, scheme, "carol", "--oauth2-bearer", TOKEN_OF["carol"])
        logins = new_lines(before, rig.backend_logins(rig.store_of("carol")))
        assert len(logins) == 1 and "user=<carol>, method=XOAUTH2" in logins[0], logins
        client = Line(ports[protocol])
        if protocol == "imap":
            assert b"AUTH=XOAUTH2]" in client.greeting and b"AUTH=PLAIN" not in client.greeting
            assert client.ask(b"a AUTHENTICATE PLAIN\r\n") == (
                b"a NO Unsupported authentication mechanism")
        else:
            assert client.ask(b"AUTH LOGIN\r\n") == b"-ERR Unsupported authentication mechanism"
        client.close()
    finally:
        proxy.stop()


def test_imaplib_xoauth2(rig: Rig, client_tls: ssl.SSLContext) -> None:
    before = rig.backend_logins(rig.store_of("dave"))
    with imaplib.IMAP4_SSL(HOST, rig.ports["imaps"], ssl_context=client_tls,
                           timeout=CLIENT_TIMEOUT) as client:
        message = xoauth2("dave", TOKEN_OF["dave"])
        SENT.append(base64.b64encode(message))
        status, _ = client.authenticate("XOAUTH2", lambda _challenge: message)
        assert status == "OK"
        status, data = client.select("INBOX")
        assert status == "OK" and int(data[0]) >= 0
        client.logout()
    logins = new_lines(before, rig.backend_logins(rig.store_of("dave")))
    assert len(logins) == 1 and "user=<dave>, method=XOAUTH2" in logins[0], logins


def test_imaplib_oauthbearer_after_starttls(rig: Rig, client_tls: ssl.SSLContext) -> None:
    before = rig.backend_logins(rig.store_of("alice"))
    with imaplib.IMAP4(HOST, rig.ports["imap"], timeout=CLIENT_TIMEOUT) as client:
        client.starttls(client_tls)
        message = oauthbearer("alice", TOKEN_OF["alice"])
        SENT.append(base64.b64encode(message))
        status, _ = client.authenticate("OAUTHBEARER", lambda _challenge: message)
        assert status == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()
    logins = new_lines(before, rig.backend_logins(rig.store_of("alice")))
    assert len(logins) == 1 and "user=<alice>, method=OAUTHBEARER" in logins[0], logins


# -- refused tokens ---------------------------------------------------------------------------


def test_expired_token_imap_shows_the_json_error_then_no(rig: Rig) -> None:
    client = Line(rig.ports["imap"])
    challenge = client.ask(b"a AUTHENTICATE OAUTHBEARER " + b64(oauthbearer("alice", EXPIRED))
                           + b"\r\n")
    # RFC 7628 section 3.2.2: "+" and the base64 of a JSON error from the server.
    assert challenge.startswith(b"+ ")
    assert json.loads(base64.b64decode(challenge[2:]))["status"] == "invalid_token"
    assert client.ask(b"AQ==\r\n") == b"a NO [AUTHENTICATIONFAILED] Authentication failed"
    # The session goes on: a good token next.
    reply = client.ask(b"b AUTHENTICATE OAUTHBEARER " + b64(oauthbearer("alice",
                                                                       TOKEN_OF["alice"]))
                       + b"\r\n")
    assert reply.startswith(b"b OK ")
    client.close()
    assert EXPIRED in rig.introspection.asked


def test_expired_token_imaplib_xoauth2(rig: Rig, client_tls: ssl.SSLContext) -> None:
    challenges: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        challenges.append(challenge)
        # Google's XOAUTH2: an empty response to the error challenge.
        return xoauth2("alice", EXPIRED) if len(challenges) == 1 else b""

    with imaplib.IMAP4_SSL(HOST, rig.ports["imaps"], ssl_context=client_tls,
                           timeout=CLIENT_TIMEOUT) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.authenticate("XOAUTH2", respond)
        client.logout()
    assert challenges[0] == b""
    assert json.loads(challenges[1])["status"] == "401"  # Dovecot's XOAUTH2 wording


def test_expired_token_pop3(rig: Rig, client_tls: ssl.SSLContext) -> None:
    client = Line(rig.ports["pop3s"], client_tls)
    assert client.ask(b"AUTH XOAUTH2\r\n") == b"+ "
    challenge = client.ask(b64(xoauth2("alice", EXPIRED)) + b"\r\n")
    assert json.loads(base64.b64decode(challenge[2:]))["status"] == "401"
    assert client.ask(b"\r\n") == b"-ERR [AUTH] Authentication failed"
    assert client.ask(b"QUIT\r\n").startswith(b"+OK")
    client.close()


def test_authzid_naming_another_user_goes_where_the_message_says(rig: Rig) -> None:
    """bob's token with a=alice: routed by the message to alice's store, whose Dovecot
    finds that the token is bob's and refuses; bob's store hears nothing."""
    store1, store2 = rig.stores["store1"], rig.stores["store2"]
    log1 = store1.log_path.read_text(errors="replace")
    logins2 = rig.backend_logins(store2)
    client = Line(rig.ports["imap"])
    challenge = client.ask(b"a AUTHENTICATE OAUTHBEARER "
                           + b64(oauthbearer("alice", TOKEN_OF["bob"])) + b"\r\n")
    assert challenge.startswith(b"+ ")
    assert client.ask(b"AQ==\r\n").startswith(b"a NO [AUTHENTICATIONFAILED]")
    client.close()
    added = store1.log_path.read_text(errors="replace")[len(log1):]
    assert "Username 'alice' did not match 'bob'" in added, added
    assert rig.backend_logins(store2) == logins2


def test_garbage_base64_is_refused_before_any_lookup(rig: Rig, client_tls: ssl.SSLContext) -> None:
    asked = len(rig.introspection.asked)
    client = Line(rig.ports["imap"])
    assert client.ask(b"a AUTHENTICATE XOAUTH2 Zm9v!!\r\n") == (
        b"a BAD AUTHENTICATE: Invalid base64 in SASL response")
    assert client.ask(b"b AUTHENTICATE OAUTHBEARER\r\n") == b"+ "
    assert client.ask(b"@@@@\r\n") == b"b BAD AUTHENTICATE: Invalid base64 in SASL response"
    client.close()
    pop = Line(rig.ports["pop3s"], client_tls)
    assert pop.ask(b"AUTH OAUTHBEARER Zm9v!!\r\n") == b"-ERR AUTH: Invalid base64 in SASL response"
    pop.close()
    assert len(rig.introspection.asked) == asked


def test_a_64k_token_is_refused_by_the_limits_before_any_lookup(
        rig: Rig, client_tls: ssl.SSLContext) -> None:
    asked = len(rig.introspection.asked)
    lines = len(rig.proxy_logs())
    big = "t" * 65536
    client = Line(rig.ports["imaps"], client_tls)
    # The proxy says BYE and closes while the line still comes in: the client may see
    # the BYE, or only a reset; either way the connection ends at once.
    try:
        client.sock.sendall(b"a AUTHENTICATE OAUTHBEARER " + b64(oauthbearer("alice", big))
                            + b"\r\n")
        line = client.line()
        assert line.startswith(b"* BYE "), line
        assert client.closed_within(5)
    except (ConnectionError, ssl.SSLError):
        pass
    client.close()
    pop = Line(rig.ports["pop3"])
    assert pop.ask(b"AUTH XOAUTH2\r\n") == b"+ "
    assert pop.ask(b64(xoauth2("alice", big)) + b"\r\n").startswith(b"-ERR ")
    assert pop.ask(b"QUIT\r\n").startswith(b"+OK")
    pop.close()
    assert len(rig.introspection.asked) == asked
    assert not [line for line in rig.proxy_logs()[lines:] if "login" in line and "user=" in line]


# -- SASL LOGIN --------------------------------------------------------------------------------


def test_imap_authenticate_login(rig: Rig, mail_users: list[MailUser],
                                 client_tls: ssl.SSLContext) -> None:
    erin = next(u for u in mail_users if u.name == "erin")
    prompts: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        prompts.append(challenge)
        return erin.name.encode() if len(prompts) == 1 else erin.password.encode()

    before = rig.backend_logins(rig.store_of("erin"))
    with imaplib.IMAP4_SSL(HOST, rig.ports["imaps"], ssl_context=client_tls,
                           timeout=CLIENT_TIMEOUT) as client:
        assert "AUTH=LOGIN" in client.capabilities
        assert client.authenticate("LOGIN", respond)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()
    assert prompts == [b"Username:", b"Password:"]
    logins = new_lines(before, rig.backend_logins(rig.store_of("erin")))
    assert len(logins) == 1 and "user=<erin>" in logins[0], logins
    # With an initial response (RFC 4959), on a raw line.
    client = Line(rig.ports["imap"])
    assert client.ask(b"a AUTHENTICATE LOGIN " + base64.b64encode(b"erin") + b"\r\n") == (
        b"+ UGFzc3dvcmQ6")
    assert client.ask(base64.b64encode(erin.password.encode()) + b"\r\n").startswith(b"a OK ")
    client.close()


@pytest.mark.parametrize("scheme", ["pop3", "pop3s"])
def test_pop3_auth_login(rig: Rig, test_ca: TestCA, mail_users: list[MailUser],
                         scheme: str) -> None:
    frank = next(u for u in mail_users if u.name == "frank")
    before = rig.backend_logins(rig.store_of("frank"))
    curl(rig, test_ca, scheme, f"{frank.name}:{frank.password}", "--login-options",
         "AUTH=LOGIN")
    logins = new_lines(before, rig.backend_logins(rig.store_of("frank")))
    assert len(logins) == 1 and "user=<frank>" in logins[0], logins
    assert any("user=<frank>" in line and "mechanism=LOGIN" in line
               for line in rig.proxy_logs())


# -- ManageSieve (RFC 5804): the same mechanisms -------------------------------------------


class Sieve(Line):
    """A raw ManageSieve client: the greeting is a capability list up to its OK."""

    def __init__(self, rig: Rig) -> None:
        if "managesieve" not in rig.ports:
            pytest.skip("Pigeonhole's managesieve not installed: scripts/install-deps")
        #: the greeting's capability lines (RFC 5804 section 1.7)
        self.capabilities: list[bytes] = []
        super().__init__(rig.ports["managesieve"])
        while not self.greeting.startswith(b"OK"):
            self.capabilities.append(self.greeting)
            self.greeting = self.line()


def test_managesieve_tokens_reach_the_users_store(rig: Rig) -> None:
    for user, mechanism, message, store in (
            ("alice", b"OAUTHBEARER", oauthbearer, "store1"),
            ("bob", b"XOAUTH2", xoauth2, "store2")):
        before = rig.backend_logins(rig.stores[store])
        client = Sieve(rig)
        assert b'"SASL" "PLAIN LOGIN OAUTHBEARER XOAUTH2"' in client.capabilities
        blob = b64(message(user, TOKEN_OF[user]))
        assert client.ask(b'AUTHENTICATE "' + mechanism + b'" "' + blob + b'"\r\n') == (
            b'OK "Logged in"')
        # The backend's session: its script list (empty), and the login in its log.
        assert client.ask(b"LISTSCRIPTS\r\n").startswith(b"OK")
        client.sock.sendall(b"LOGOUT\r\n")
        assert client.closed_within(5)
        logins = new_lines(before, rig.backend_logins(rig.stores[store]))
        assert len(logins) == 1, logins
        assert "managesieve-login: Info: Login: " in logins[0]
        assert f"user=<{user}>, method={mechanism.decode()}" in logins[0], logins


def test_managesieve_token_after_a_continuation(rig: Rig) -> None:
    client = Sieve(rig)
    # RFC 5804 section 2.1: the (empty) challenge is a string; the response too.
    assert client.ask(b'AUTHENTICATE "XOAUTH2"\r\n') == b'""'
    blob = b64(xoauth2("dave", TOKEN_OF["dave"]))
    assert client.ask(b'"' + blob + b'"\r\n') == b'OK "Logged in"'
    assert client.ask(b"LISTSCRIPTS\r\n").startswith(b"OK")
    client.close()


@pytest.mark.parametrize(("mechanism", "dummy", "status"), [
    ("OAUTHBEARER", b'"AQ=="', "invalid_token"),
    ("XOAUTH2", b'""', "401"),  # Dovecot's XOAUTH2 wording
])
def test_expired_token_managesieve_shows_the_json_error_then_no(rig: Rig, mechanism: str,
                                                                dummy: bytes, status: str) -> None:
    before = rig.backend_logins(rig.stores["store1"])
    client = Sieve(rig)
    message = oauthbearer if mechanism == "OAUTHBEARER" else xoauth2
    challenge = client.ask(b'AUTHENTICATE "' + mechanism.encode() + b'" "'
                           + b64(message("alice", EXPIRED)) + b'"\r\n')
    # RFC 7628 section 3.2.2, in RFC 5804's form: a string holding base64 JSON.
    assert challenge.startswith(b'"') and challenge.endswith(b'"'), challenge
    assert json.loads(base64.b64decode(challenge[1:-1]))["status"] == status
    assert client.ask(dummy + b"\r\n") == b'NO "Authentication failed"'
    # The session goes on: a good token next.
    assert client.ask(b'AUTHENTICATE "OAUTHBEARER" "'
                      + b64(oauthbearer("alice", TOKEN_OF["alice"])) + b'"\r\n') == (
        b'OK "Logged in"')
    assert client.ask(b"LISTSCRIPTS\r\n").startswith(b"OK")
    client.close()
    logins = new_lines(before, rig.backend_logins(rig.stores["store1"]))
    assert len(logins) == 1 and "user=<alice>, method=OAUTHBEARER" in logins[0], logins
    assert EXPIRED in rig.introspection.asked


def test_managesieve_authenticate_login(rig: Rig, mail_users: list[MailUser]) -> None:
    erin = next(u for u in mail_users if u.name == "erin")
    before = rig.backend_logins(rig.store_of("erin"))
    client = Sieve(rig)
    assert client.ask(b'AUTHENTICATE "LOGIN"\r\n') == b'"VXNlcm5hbWU6"'  # "Username:"
    assert client.ask(b'"' + base64.b64encode(b"erin") + b'"\r\n') == (
        b'"UGFzc3dvcmQ6"')  # "Password:"
    password = base64.b64encode(erin.password.encode())
    # the password as a literal this time (RFC 5804 section 4, {n+})
    assert client.ask(b"{%d+}\r\n" % len(password) + password + b"\r\n") == (
        b'OK "Logged in"')
    assert client.ask(b"LISTSCRIPTS\r\n").startswith(b"OK")
    client.close()
    logins = new_lines(before, rig.backend_logins(rig.store_of("erin")))
    # the password goes on to the backend as PLAIN, as for IMAP and POP3
    assert len(logins) == 1 and "user=<erin>, method=PLAIN" in logins[0], logins
    assert any("user=<erin>" in line and "mechanism=LOGIN" in line
               for line in rig.proxy_logs())


# -- secrets -------------------------------------------------------------------------------------


def test_no_token_in_any_log_line_at_debug_level(rig: Rig) -> None:
    """Runs last: every token above, in every form it travelled in, is in no log line."""
    lines = rig.proxy_logs()
    assert any(line.startswith("debug ") for line in lines)
    assert sum("mechanism=OAUTHBEARER" in line for line in lines) >= 8
    for token in [*TOKENS, EXPIRED]:
        forms = {token, base64.b64encode(token.encode()).decode()}
        forms |= {blob.decode() for blob in SENT if token.encode() in base64.b64decode(blob)}
        for form in forms:
            leaks = [line for line in lines if form in line]
            assert not leaks, (token, form, leaks[:3])
    big = "t" * 1000
    assert not [line for line in lines if big in line]

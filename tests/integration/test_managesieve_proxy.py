"""ManageSieve (RFC 5804) through the proxy to the real Dovecot (Pigeonhole), issue 15.

sieve-connect (a real client) uploads, lists, activates, downloads and deletes a
script over STARTTLS for users on two stores, and the backend's own files say what
is active. Raw sockets bring the hostile input (long lines, huge literals, bad
base64, NUL in credentials, commands pipelined behind STARTTLS). Every way a
session ends (LOGOUT, a kick, a drain, the backend going away, too many bad
commands) closes the client's connection at once (rig/endclient.py measures it).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from rig.endclient import EndClient
from rig.ports import free_port
from rig.proxy import ADMIN_TOKEN, admin_token_file, imap_config

from imapproxy import admincli

pytestmark = pytest.mark.skipif(shutil.which("sieve-connect") is None,
                                reason="sieve-connect not installed: scripts/install-deps")

#: the bound of issue 11: EOF within a second of the last byte
PROMPT = 1.0
SIEVE_CONNECT = "sieve-connect"


def sieve_map(store1, store2, mail_users) -> str:
    """alice, carol, erin on store1; the others on store2 (their ManageSieve ports)."""
    lines = []
    for user in mail_users:
        store = store1 if user.name in ("alice", "carol", "erin") else store2
        lines.append(f"{user.name}  127.0.0.1:{store.sieve_port}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def sieve_proxy(start_proxy, store1, store2, mail_users, server_cert, test_ca, tmp_path):
    """A twistd proxy with a ManageSieve STARTTLS listener and an implicit TLS one."""
    if store1.sieve_port is None:
        pytest.skip("Pigeonhole's managesieve not installed: scripts/install-deps")
    port, implicit, admin = free_port(), free_port(), free_port()
    workdir = tmp_path / "proxy0"
    admin_token_file(workdir)
    extra = f"""
[[listen]]
protocol = "managesieve"
address = "127.0.0.1:{implicit}"
tls = "implicit"

[backend]
tls = "starttls"
ca_file = "{test_ca.ca_path}"

[admin]
address = "127.0.0.1:{admin}"
token_file = "admin.token"

[limits]
login_delay = 0
max_bad_commands = 3
max_line = 1024
max_preauth_literal = 4096
"""
    config = imap_config(port, tls="starttls", plaintext_auth=False,
                         cert=(str(server_cert.chain_path), str(server_cert.key_path)),
                         extra=extra, protocol="managesieve")
    proxy = start_proxy(config, [port, implicit],
                        {"users.map": sieve_map(store1, store2, mail_users)})
    proxy.admin = f"127.0.0.1:{admin}"  # type: ignore[attr-defined]
    proxy.implicit = implicit  # type: ignore[attr-defined]
    return proxy


def sieve_connect(port: int, user, ca: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run sieve-connect against the proxy; the password goes through fd 3."""
    read, write = os.pipe()
    os.write(write, user.password.encode() + b"\n")
    os.close(write)
    try:
        return subprocess.run(
            [SIEVE_CONNECT, "--server", "127.0.0.1", "--port", str(port), "--user", user.name,
             "--passwordfd", str(read), "--tlscafile", str(ca), "--tlshostname", "localhost",
             "--authmech", "PLAIN", *args],
            pass_fds=(read,), capture_output=True, text=True, timeout=30, check=False)
    finally:
        os.close(read)


# -- a real client ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "bob"])  # store1, store2 (bob's password: awkward)
def test_sieve_connect_round_trip_on_each_store(name, sieve_proxy, store1, store2, mail_users,
                                                test_ca, tmp_path):
    user = next(u for u in mail_users if u.name == name)
    store, other = (store1, store2) if name == "alice" else (store2, store1)
    script = tmp_path / "vacation.sieve"
    body = f'require ["fileinto"];\r\n# {name} via the proxy\r\nfileinto "Junk";\r\n'
    script.write_bytes(body.encode())
    ca, port = test_ca.ca_path, sieve_proxy.port

    def run(*args: str) -> str:
        done = sieve_connect(port, user, ca, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr, sieve_proxy.log())
        return done.stdout

    run("--upload", "--localsieve", str(script), "--remotesieve", "proxied")
    assert "proxied" in run("--list")
    assert store.sieve_scripts(name) == ["proxied"]
    assert "proxied" not in other.sieve_scripts(name)
    run("--activate", "--remotesieve", "proxied")
    # The backend's own file: the active script is the uploaded one.
    assert store.active_sieve(name) == body.encode()
    assert other.active_sieve(name) is None
    downloaded = tmp_path / "back.sieve"
    run("--download", "--remotesieve", "proxied", "--localsieve", str(downloaded))
    assert downloaded.read_bytes() == body.encode()
    run("--deactivate")
    assert store.active_sieve(name) is None
    run("--delete", "--remotesieve", "proxied")
    assert store.sieve_scripts(name) == []


def test_sieve_connect_over_implicit_tls_sees_the_backends_sieve_list(sieve_proxy, mail_users,
                                                                     test_ca, store1):
    """After one login the pre-login list repeats the backend's SIEVE extensions."""
    alice = next(u for u in mail_users if u.name == "alice")
    client = EndClient("sieves", sieve_proxy.implicit, str(test_ca.ca_path))
    try:
        client.login(alice.name, alice.password)
    finally:
        client.close()
    client = EndClient("sieves", sieve_proxy.implicit, str(test_ca.ca_path))
    try:
        assert b'"SIEVE" "fileinto reject envelope' in client.greeting, client.greeting
        assert b'"NOTIFY" "mailto"' in client.greeting
        assert b'"SASL" "PLAIN LOGIN"\r\n' in client.greeting
        assert b'"STARTTLS"' not in client.greeting  # already in TLS
    finally:
        client.close()


# -- hostile input ------------------------------------------------------------------------


class Raw:
    """A raw ManageSieve client: lines in, responses out."""

    def __init__(self, port: int, ca: Path) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ca = ca
        self.buffer = b""
        self.greeting = self.response()

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def response(self) -> bytes:
        lines = []
        while not (lines and lines[-1].split(b" ", 1)[0].strip() in (b"OK", b"NO", b"BYE")):
            lines.append(self.readline())
        return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def starttls(self) -> bytes:
        self.send(b"STARTTLS\r\n")
        assert self.response().startswith(b"OK")
        return self.handshake()

    def handshake(self) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca))
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        return self.response()

    def at_eof(self) -> bool:
        self.sock.settimeout(PROMPT + 1)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def test_before_tls_no_sasl_and_authenticate_is_refused(sieve_proxy, test_ca):
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        assert b'"SASL" ""' in raw.greeting and b'"STARTTLS"' in raw.greeting
        assert raw.greeting.endswith(b"OK \"ManageSieve proxy ready\"\r\n")
        raw.send(b'AUTHENTICATE "PLAIN" "' + plain("alice", "alice-secret") + b'"\r\n')
        assert raw.response().startswith(b"NO (ENCRYPT-NEEDED)")
        caps = raw.starttls()
        # RFC 5804 section 2.2: the capabilities again, now with SASL ([auth]
        # mechanisms), no STARTTLS.
        assert b'"SASL" "PLAIN LOGIN"\r\n' in caps and b'"STARTTLS"' not in caps, caps
    finally:
        raw.close()


def test_long_line_and_bad_base64_are_refused_and_the_session_goes_on(sieve_proxy, test_ca,
                                                                      mail_users):
    alice = next(u for u in mail_users if u.name == "alice")
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(b"NOOP " + b"x" * 5000 + b"\r\n")
        assert raw.response() == b'NO "Line too long"\r\n'
        raw.send(b'AUTHENTICATE "PLAIN" "!!not base64!!"\r\n')
        assert raw.response() == b'NO "AUTHENTICATE: Invalid base64 in SASL response"\r\n'
        raw.send(b'AUTHENTICATE "PLAIN" "' + plain(alice.name, alice.password) + b'"\r\n')
        assert raw.response() == b'OK "Logged in"\r\n'
    finally:
        raw.close()


@pytest.mark.parametrize("command", [
    # NUL inside the decoded credentials: no SASL PLAIN message (RFC 4616 section 2)
    b'AUTHENTICATE "PLAIN" "' + plain("alice", "alice\0secret") + b'"',
    # NUL inside a quoted string: no ManageSieve string at all (RFC 5804 section 4)
    b'AUTHENTICATE "PLAIN" "al\0ice"',
])
def test_nul_in_credentials_is_refused(command, sieve_proxy, test_ca):
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(command + b"\r\n")
        assert raw.response().startswith(b"NO")
        raw.send(b'NOOP "still"\r\n')
        assert raw.response() == b'OK (TAG "still") "Done"\r\n'
    finally:
        raw.close()


def test_huge_literal_ends_the_session_at_once(sieve_proxy, test_ca):
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(b'AUTHENTICATE "PLAIN" {999999999+}\r\n' + b"A" * 4096)
        assert raw.response() == b'BYE "Literal too large"\r\n'
        assert raw.at_eof()
    finally:
        raw.close()


def test_commands_pipelined_behind_starttls_are_not_acted_on(sieve_proxy, test_ca):
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.send(b"STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"" + plain("alice", "alice-secret")
                 + b"\"\r\nLOGOUT\r\n")
        assert raw.response().startswith(b"OK")
        caps = raw.handshake()
        assert caps.endswith(b'OK "TLS negotiation done"\r\n')
        raw.send(b'NOOP "after"\r\n')
        # The next answer is NOOP's: nothing of the plaintext login or LOGOUT ran.
        assert raw.response() == b'OK (TAG "after") "Done"\r\n'
    finally:
        raw.close()


def test_authenticate_with_a_continuation_and_literals_then_relay(sieve_proxy, test_ca,
                                                                  mail_users, store2):
    bob = next(u for u in mail_users if u.name == "bob")
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(b'AUTHENTICATE {5+}\r\nPLAIN\r\n')
        assert raw.readline() == b'""\r\n'  # the empty challenge (section 2.1)
        token = plain(bob.name, bob.password)
        raw.send(b"{%d+}\r\n" % len(token) + token + b"\r\n")
        assert raw.response() == b'OK "Logged in"\r\n'
        raw.send(b'PUTSCRIPT "lit" {12+}\r\nkeep;\r\nstop;\r\nLISTSCRIPTS\r\n')
        assert raw.response().startswith(b"OK")
        assert b'"lit"' in raw.response()
        assert "lit" in store2.sieve_scripts("bob")
        raw.send(b'DELETESCRIPT "lit"\r\n')
        assert raw.response().startswith(b"OK")
        raw.send(b"LOGOUT\r\n")
        assert raw.response().startswith(b"OK")
        assert raw.at_eof()
    finally:
        raw.close()


def test_wrong_password_is_no_and_a_down_backend_is_trylater(start_proxy, sieve_proxy, test_ca,
                                                             server_cert, mail_users, tmp_path):
    raw = Raw(sieve_proxy.port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(b'AUTHENTICATE "PLAIN" "' + plain("alice", "wrong") + b'"\r\n')
        assert raw.response() == b'NO "Authentication failed"\r\n'
    finally:
        raw.close()
    # A second proxy whose map sends everyone to a closed port.
    port = free_port()
    config = imap_config(port, tls="starttls", plaintext_auth=False,
                         cert=(str(server_cert.chain_path), str(server_cert.key_path)),
                         protocol="managesieve")
    start_proxy(config, [port], {"users.map": f"*  127.0.0.1:{free_port()}\n"}, name="down")
    raw = Raw(port, test_ca.ca_path)
    try:
        raw.starttls()
        raw.send(b'AUTHENTICATE "PLAIN" "' + plain("alice", "alice-secret") + b'"\r\n')
        assert raw.response().startswith(b"NO (TRYLATER)")
    finally:
        raw.close()


# -- every end closes the client at once --------------------------------------------------


def _logged_in(sieve_proxy, test_ca, user, mode="sieve-starttls") -> EndClient:
    port = sieve_proxy.port if mode == "sieve-starttls" else sieve_proxy.implicit
    client = EndClient(mode, port, str(test_ca.ca_path))
    client.login(user.name, user.password)
    client.mark()
    return client


@pytest.mark.parametrize("mode", ["sieve-starttls", "sieves"])
@pytest.mark.parametrize("how", ["logout", "kick", "drain", "backend-closes"])
def test_logged_in_session_ends_at_once(how, mode, sieve_proxy, test_ca, mail_users, store1):
    user = next(u for u in mail_users if u.name == "carol")  # store1
    client = _logged_in(sieve_proxy, test_ca, user, mode)
    try:
        if how == "logout":
            client.send(b"LOGOUT\r\n")
        elif how == "kick":
            admincli.request(sieve_proxy.admin, "POST", f"/kick?user={user.name}",
                             token=ADMIN_TOKEN.encode())
        elif how == "drain":
            admincli.request(sieve_proxy.admin, "POST", "/drain", token=ADMIN_TOKEN.encode())
        else:
            store1.doveadm("kick", user.name)
        ending = client.wait_end()
    finally:
        client.close()
    expected = {"logout": b"OK", "kick": b'BYE (TRYLATER) "Server shutting down"',
                "drain": b'BYE (TRYLATER) "Server shutting down"', "backend-closes": b"BYE"}
    assert expected[how] in ending.data, ending
    assert ending.eof_after_last_byte < PROMPT, ending
    assert ending.tcp_eof_after_last_byte < PROMPT, ending


def test_too_many_bad_commands_before_login_end_at_once(sieve_proxy, test_ca):
    client = EndClient("sieve-starttls", sieve_proxy.port, str(test_ca.ca_path))
    try:
        client.mark()
        for _ in range(3):
            client.send(b"BOGUS\r\n")
        ending = client.wait_end()
    finally:
        client.close()
    assert b'BYE "Unknown command; too many invalid commands"' in ending.data, ending
    assert ending.eof_after_last_byte < PROMPT, ending
    assert ending.tcp_eof_after_last_byte < PROMPT, ending


def test_log_lines_and_the_backend_learns_the_session(sieve_proxy, test_ca, mail_users, store1):
    alice = next(u for u in mail_users if u.name == "alice")
    client = _logged_in(sieve_proxy, test_ca, alice)
    try:
        client.send(b"LOGOUT\r\n")
        client.wait_end()
    finally:
        client.close()
    log = sieve_proxy.log()
    assert "login id=" in log and "user=<alice>" in log and "mechanism=PLAIN" in log, log
    assert "session end id=" in log
    assert "alice-secret" not in log
    # The backend learnt the client's session through XCLIENT ([backend] forward_client
    # = "id"): Dovecot logs the proxy's session id ("<pid>-<n>").
    session_id = f"{sieve_proxy.process.pid}-"
    logins = [line for line in store1.log_path.read_text().splitlines()
              if "managesieve-login" in line and "user=<alice>" in line and "Login:" in line]
    assert any(f"session=<{session_id}" in line for line in logins), logins


# -- routed by LDAP -----------------------------------------------------------------------


def test_ldap_routes_managesieve_by_its_port_attribute(start_proxy, slapd, store1, store2,
                                                       mail_users, server_cert, test_ca):
    """[directory.ldap] managesieve_port_attribute: each user's script lands on the store
    LDAP names (no port in mailHost, no [backend] default that could reach either)."""
    if store1.sieve_port is None:
        pytest.skip("Pigeonhole's managesieve not installed: scripts/install-deps")
    port = free_port()
    extra = f"""
[directory.ldap]
uris = ["{slapd.uri}"]
base = "{slapd.base}"
host_attribute = "mailHost"
managesieve_port_attribute = "mailSievePort"

[backend]
tls = "starttls"
ca_file = "{test_ca.ca_path}"
managesieve_port = {free_port()}
"""
    config = imap_config(port, tls="starttls", plaintext_auth=False,
                         cert=(str(server_cert.chain_path), str(server_cert.key_path)),
                         extra=extra, protocol="managesieve").replace(
        'type = "static"\nmap = "users.map"', 'type = "ldap"')
    start_proxy(config, [port], name="ldap")
    for name, store, other in (("carol", store1, store2), ("dave", store2, store1)):
        user = next(u for u in mail_users if u.name == name)
        client = EndClient("sieve-starttls", port, str(test_ca.ca_path))
        try:
            client.login(user.name, user.password)
            client.send(b'PUTSCRIPT "routed" {5+}\r\nkeep;\r\n')
            assert client.response()[-1].startswith(b"OK")
        finally:
            client.close()
        assert "routed" in store.sieve_scripts(name)
        assert "routed" not in other.sieve_scripts(name)

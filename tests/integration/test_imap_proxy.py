"""The IMAP proxy end to end: real Dovecot behind, real clients in front."""

from __future__ import annotations

import base64
import imaplib
import time

import imapclient
import pytest
from rig.imapraw import RawImap
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess, imap_config, store_map

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, store1, store2, mail_users, test_ca):
    """One proxy with three listeners: plain (plaintext allowed), STARTTLS-only, implicit TLS."""
    workdir = tmp_path_factory.mktemp("proxy")
    cert = test_ca.issue("localhost")
    plain, starttls, implicit = free_port(), free_port(), free_port()
    down_port = free_port()  # nothing listens there: a backend that is down
    config = f"""
[[listen]]
protocol = "imap"
address = "127.0.0.1:{plain}"
tls = "none"

[[listen]]
protocol = "imap"
address = "127.0.0.1:{starttls}"
tls = "starttls"

[[listen]]
protocol = "imap"
address = "127.0.0.1:{implicit}"
tls = "implicit"

[tls]
certificate = "{cert.chain_path}"
key = "{cert.key_path}"
plaintext_auth = false

[directory]
type = "static"
map = "users.map"

[backend]
connect_timeout = 3

{RIG_LIMITS}"""
    # plaintext_auth is global; the plain listener is still usable for tests that don't
    # need it because STARTTLS works there too. Tests of plaintext LOGIN use `plain_proxy`.
    routes = store_map(store1, store2, mail_users, f"ghost  127.0.0.1:{down_port}")
    process = ProxyProcess(workdir, config, [plain, starttls, implicit], {"users.map": routes})
    process.start()
    process.plain, process.starttls, process.implicit = plain, starttls, implicit
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain_proxy(tmp_path_factory, store1, store2, mail_users):
    """A proxy that allows plaintext login (a lab setup), for the bulk of the tests."""
    workdir = tmp_path_factory.mktemp("plainproxy")
    port = free_port()
    routes = store_map(store1, store2, mail_users, f"ghost  127.0.0.1:{free_port()}")
    process = ProxyProcess(workdir, imap_config(port), [port], {"users.map": routes})
    process.start()
    yield process
    process.stop()


def users(mail_users):
    return {u.name: u for u in mail_users}


def test_greeting_and_capabilities_on_starttls_listener(proxy):
    raw = RawImap(HOST, proxy.starttls)
    assert raw.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" in raw.greeting and b"LOGINDISABLED" in raw.greeting
    assert b"AUTH=PLAIN" not in raw.greeting
    lines = raw.command(b"a1", b"CAPABILITY")
    assert lines[0].startswith(b"* CAPABILITY ") and b"LOGINDISABLED" in lines[0]
    assert lines[-1].startswith(b"a1 OK")
    raw.close()


def test_logindisabled_before_starttls_then_login_after(proxy, mail_users, client_tls):
    alice = users(mail_users)["alice"]
    client = imaplib.IMAP4(HOST, proxy.starttls)
    assert "LOGINDISABLED" in client.capabilities
    typ, data = client._simple_command("LOGIN", alice.name, alice.password)
    assert typ == "NO" and data[0].startswith(b"[PRIVACYREQUIRED]")
    client.starttls(ssl_context=client_tls)
    assert "AUTH=PLAIN" in client.capabilities and "STARTTLS" not in client.capabilities
    typ, data = client.login(alice.name, alice.password)
    assert typ == "OK" and b"[CAPABILITY IMAP4rev1" in data[0]
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_implicit_tls(proxy, mail_users, client_tls):
    bob = users(mail_users)["bob"]
    client = imaplib.IMAP4_SSL(HOST, proxy.implicit, ssl_context=client_tls)
    assert "AUTH=PLAIN" in client.capabilities
    assert client.login(bob.name, bob.password)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_starttls_discards_pipelined_plaintext(proxy, mail_users, client_tls):
    alice = users(mail_users)["alice"]
    raw = RawImap(HOST, proxy.starttls)
    # The LOGIN after STARTTLS in the same packet is an injection attempt (RFC 3501 6.2.1).
    raw.send(b"s1 STARTTLS\r\ns2 LOGIN " + alice.name.encode() + b" "
             + alice.password.encode() + b"\r\n")
    assert raw.readline().startswith(b"s1 OK")
    raw.starttls(client_tls)
    lines = raw.command(b"s3", b"NOOP")
    assert lines == [b"s3 OK NOOP completed\r\n"], lines  # no s2 reply: it was dropped
    raw.close()


def test_login_atom_quoted_literal_and_nonascii(plain_proxy, mail_users):
    u = users(mail_users)
    raw = RawImap(HOST, plain_proxy.port)
    assert raw.command(b"a", b"LOGIN alice alice-secret")[-1].startswith(b"a OK")
    raw.close()
    # quoted string with escaped quotes and backslash
    raw = RawImap(HOST, plain_proxy.port)
    password = u["bob"].password.encode()
    escaped = b'"' + password.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    assert raw.command(b"b", b"LOGIN bob " + escaped)[-1].startswith(b"b OK")
    raw.close()
    # synchronising literal with a non-ASCII (UTF-8) password
    raw = RawImap(HOST, plain_proxy.port)
    password = u["carol"].password.encode("utf-8")
    raw.send(b"c LOGIN carol {%d}\r\n" % len(password))
    assert raw.readline().startswith(b"+")
    raw.send(password + b"\r\n")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK [CAPABILITY")
    raw.close()
    # non-synchronising literal (RFC 7888) for both arguments
    raw = RawImap(HOST, plain_proxy.port)
    raw.send(b"d LOGIN {5+}\r\ncarol {%d+}\r\n" % len(password) + password + b"\r\n")
    assert raw.until_tagged(b"d")[-1].startswith(b"d OK")
    raw.close()


def test_authenticate_plain_with_and_without_initial_response(plain_proxy, mail_users):
    carol = users(mail_users)["carol"]
    token = base64.b64encode(b"\0carol\0" + carol.password.encode("utf-8"))
    raw = RawImap(HOST, plain_proxy.port)
    assert raw.command(b"a", b"AUTHENTICATE PLAIN " + token)[-1].startswith(b"a OK [CAPABILITY")
    assert raw.command(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
    raw.close()
    client = imaplib.IMAP4(HOST, plain_proxy.port)
    typ, _ = client.authenticate("PLAIN", lambda _: b"\0carol\0" + carol.password.encode())
    assert typ == "OK"
    client.logout()


def test_authenticate_cancel(plain_proxy):
    raw = RawImap(HOST, plain_proxy.port)
    raw.send(b"a AUTHENTICATE PLAIN\r\n")
    assert raw.readline() == b"+ \r\n"
    raw.send(b"*\r\n")
    assert raw.readline().startswith(b"a BAD")
    assert raw.command(b"b", b"NOOP") == [b"b OK NOOP completed\r\n"]
    raw.close()


def test_wrong_password_then_success_on_same_connection(plain_proxy, mail_users):
    alice = users(mail_users)["alice"]
    client = imaplib.IMAP4(HOST, plain_proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(alice.name, "not-the-password")
    assert client.login(alice.name, alice.password)[0] == "OK"
    client.logout()


def test_unknown_user_answered_like_wrong_password(plain_proxy):
    raw = RawImap(HOST, plain_proxy.port)
    wrong = raw.command(b"a", b"LOGIN alice nope")[-1]
    unknown = raw.command(b"a", b"LOGIN nosuchuser nope")[-1]
    assert wrong == unknown == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    raw.close()


def test_backend_down_gives_unavailable_and_proxy_lives_on(plain_proxy, mail_users):
    raw = RawImap(HOST, plain_proxy.port)
    reply = raw.command(b"a", b"LOGIN ghost whatever")[-1]
    assert reply.startswith(b"a NO [UNAVAILABLE]")
    alice = users(mail_users)["alice"]
    assert raw.command(b"b", b"LOGIN alice " + alice.password.encode())[-1].startswith(b"b OK")
    raw.close()


def test_id_before_login_and_preauth_errors(plain_proxy):
    raw = RawImap(HOST, plain_proxy.port)
    lines = raw.command(b"a", b'ID ("name" "pytest" "version" "1")')
    assert lines[0].startswith(b"* ID (") and lines[-1].startswith(b"a OK")
    assert raw.command(b"b", b"SELECT INBOX")[-1].startswith(b"b BAD")
    assert raw.command(b"c", b"FROBNICATE")[-1].startswith(b"c BAD")
    assert raw.command(b"d", b"NOOP")[-1] == b"d OK NOOP completed\r\n"
    lines = raw.command(b"e", b"LOGOUT")
    assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"e OK")
    assert raw.at_eof()


def test_pipelined_commands_after_login_are_relayed_in_order(plain_proxy, mail_users):
    alice = users(mail_users)["alice"]
    raw = RawImap(HOST, plain_proxy.port)
    raw.send(b"a LOGIN alice " + alice.password.encode() + b"\r\nb SELECT INBOX\r\nc NOOP\r\n"
             b"d LOGOUT\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK")
    assert raw.until_tagged(b"d")[-1].startswith(b"d OK")
    assert raw.at_eof()


def test_append_select_fetch_multi_megabyte_byte_identical(plain_proxy, mail_users):
    dave = users(mail_users)["dave"]
    body = b"".join(b"line %07d " % i + bytes(range(33, 127)) + b"\r\n" for i in range(50000))
    message = b"From: a@example.org\r\nSubject: big\r\n\r\n" + body
    assert len(message) > 5_000_000
    client = imapclient.IMAPClient(HOST, port=plain_proxy.port, ssl=False)
    client.login(dave.name, dave.password)
    client.select_folder("INBOX")
    result = client.append("INBOX", message)
    uid = int(result.split(b"APPENDUID ")[1].split(b" ")[1].rstrip(b"]"))
    fetched = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert fetched == message
    client.logout()


def test_idle_receives_exists_after_delivery(plain_proxy, store2, mail_users):
    frank = users(mail_users)["frank"]
    client = imapclient.IMAPClient(HOST, port=plain_proxy.port, ssl=False)
    client.login(frank.name, frank.password)
    count = client.select_folder("INBOX")[b"EXISTS"]
    client.idle()
    store2.deliver("frank", b"From: x@example.org\r\nSubject: push\r\n\r\nhello\r\n")
    responses = client.idle_check(timeout=10)
    client.idle_done()
    assert (count + 1, b"EXISTS") in responses
    client.logout()


def test_password_never_logged(plain_proxy, proxy, mail_users):
    text = plain_proxy.log() + proxy.log()
    assert "login id=" in text  # the log is really there
    for user in mail_users:
        assert user.password not in text


def test_session_end_line(plain_proxy, mail_users):
    alice = users(mail_users)["alice"]
    client = imaplib.IMAP4(HOST, plain_proxy.port)
    client.login(alice.name, alice.password)
    client.logout()
    deadline = time.monotonic() + 5
    while "session end" not in plain_proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = [x for x in plain_proxy.log().splitlines() if "session end" in x and "alice" in x][-1]
    for field in ("client=127.0.0.1:", "user=<alice>", "backend=127.0.0.1:", "duration=",
                  "in=", "out=", "reason="):
        assert field in line


def test_client_gone_before_tls_handshake_ends_its_session_at_once(proxy):
    import socket as socketmodule

    ended = proxy.log().count("session end")
    socketmodule.create_connection((HOST, proxy.implicit)).close()
    deadline = time.monotonic() + 5  # the pre-auth timeout (60 s) must not be what ends it
    while proxy.log().count("session end") == ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.log().count("session end") > ended


def test_loop_between_two_proxies_is_refused_by_the_proxy_ttl(start_proxy):
    """A's map points at B and B's at A: x-proxy-ttl runs out and the client gets NO."""
    a_port, b_port = free_port(), free_port()
    a = start_proxy(imap_config(a_port), [a_port], {"users.map": f"*  127.0.0.1:{b_port}\n"},
                    name="a")
    b = start_proxy(imap_config(b_port), [b_port], {"users.map": f"*  127.0.0.1:{a_port}\n"},
                    name="b")
    raw = RawImap(HOST, a.port)
    reply = raw.command(b"l", b"LOGIN alice whatever")[-1]
    assert reply.startswith(b"l NO [UNAVAILABLE]"), reply
    raw.close()
    assert "reason=RoutingLoop" in a.log() + b.log()

"""TLS towards the backend: STARTTLS and implicit, certificates verified."""

from __future__ import annotations

import imaplib

import pytest
from rig.certs import TestCA
from rig.dovecot import Dovecot, MailUser
from rig.imapraw import RawImap
from rig.ports import free_port
from rig.proxy import imap_config

HOST = "127.0.0.1"


def _alice(mail_users):
    return next(u for u in mail_users if u.name == "alice")


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_backend_tls_verified(mode, start_proxy, store1, mail_users, test_ca):
    port = free_port()
    backend_port = store1.imap_port if mode == "starttls" else store1.imaps_port
    extra = f'[backend]\ntls = "{mode}"\nca_file = "{test_ca.ca_path}"\n'
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": f"*  localhost:{backend_port}\n"})
    alice = _alice(mail_users)
    client = imaplib.IMAP4(HOST, proxy.port)
    assert client.login(alice.name, alice.password)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_backend_certificate_from_unknown_ca_is_refused(mode, start_proxy, store1, mail_users,
                                                        tmp_path):
    other_ca = TestCA(tmp_path / "other-ca")
    port = free_port()
    backend_port = store1.imap_port if mode == "starttls" else store1.imaps_port
    extra = f'[backend]\ntls = "{mode}"\nca_file = "{other_ca.ca_path}"\n'
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": f"*  localhost:{backend_port}\n"})
    alice = _alice(mail_users)
    client = imaplib.IMAP4(HOST, proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(alice.name, alice.password)
    client.logout()
    assert alice.password not in proxy.log()


def test_non_ascii_login_name_over_backend_starttls(start_proxy, dovecot_factory, test_ca):
    """After STARTTLS the proxy asks for the capabilities again (RFC 3501 section 6.2.1):
    with LITERAL+ known over TLS, a non-ASCII name goes as a literal. It failed before,
    and the backend was marked down."""
    user = MailUser("jürgen", "jürgens-pw", 4300)
    dovecot = dovecot_factory(users=[user], name="utf8")
    port = free_port()
    extra = (f'[backend]\ntls = "starttls"\nca_file = "{test_ca.ca_path}"\n'
             f"imap_port = {dovecot.imap_port}\n")
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": "*  localhost\n"})
    for _ in range(2):  # the second login finds the backend up, not marked down
        client = RawImap(HOST, proxy.port)
        login = f'LOGIN "{user.name}" "{user.password}"'.encode()  # UTF-8, as clients send
        assert client.command(b"a", login)[-1].startswith(b"a OK"), login
        assert client.command(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
        assert client.command(b"c", b"LOGOUT")[-1].startswith(b"c OK")
        client.close()
    assert "login id=" in proxy.log() and "Traceback" not in proxy.log()
    assert "Logged out" in dovecot.log_path.read_text(errors="replace")


@pytest.mark.parametrize(("case", "reason"), [
    ("unknown-ca", "TLS: certificate not trusted"),
    ("wrong-name", "TLS: certificate name mismatch"),
    ("refused", "connection refused"),
    ("not-imap", "protocol error: not an IMAP greeting"),
])
def test_the_log_says_why_a_backend_could_not_be_used(case, reason, start_proxy, store1,
                                                      mail_users, test_ca, tmp_path, request):
    """Issue 12: not just the exception's class name."""
    port = free_port()
    ca = TestCA(tmp_path / "other-ca").ca_path if case == "unknown-ca" else test_ca.ca_path
    host, backend_port, tls = "localhost", store1.imaps_port, "implicit"
    if case == "wrong-name":  # a backend whose certificate names another host
        wrong = Dovecot(tmp_path / "wrong", mail_users, name="wrong",
                        cert=test_ca.issue("mail.example.net", None))
        wrong.start()
        request.addfinalizer(wrong.close)
        backend_port = wrong.imaps_port
    elif case == "refused":
        backend_port, tls = free_port(), "none"
    elif case == "not-imap":
        backend_port, tls = store1.pop3_port, "none"  # a POP3 greeting
    extra = f'[backend]\ntls = "{tls}"\nca_file = "{ca}"\n'
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": f"*  {host}:{backend_port}\n"})
    alice = _alice(mail_users)
    client = imaplib.IMAP4(HOST, proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(alice.name, alice.password)
    client.logout()
    lines = [line for line in proxy.log().splitlines() if "unavailable for <alice>" in line]
    assert lines and lines[0].endswith(f": {reason}"), proxy.log()

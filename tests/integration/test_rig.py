"""The rig itself, exercised with real clients: imaplib, poplib, raw sockets, ldap3."""

from __future__ import annotations

import imaplib
import ipaddress
import poplib
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import ldap3
import pytest
import rig.dovecot
import rig.slapd
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rig.certs import TestCA
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port, free_port_pair
from rig.slapd import ReplicatedSlapd, Slapd, absent, has

MESSAGE = b"From: rig@example.org\r\nTo: you@example.org\r\nSubject: rig test\r\n\r\nhello\r\n"


def _client_context(ca_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_path))


def _plain_auth(user: MailUser) -> Callable[[bytes], bytes]:
    return lambda _challenge: b"\0" + user.name.encode() + b"\0" + user.password.encode()


class RawImap:
    """A bare IMAP connection: send lines, read lines, no parsing beyond that."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.file = self.sock.makefile("rb")
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        return line

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _imap_login(store: Dovecot, user: MailUser) -> imaplib.IMAP4:
    client = imaplib.IMAP4(store.host, store.imap_port)
    if user.password.isascii():
        client.login(user.name, user.password)
    else:
        # imaplib encodes LOGIN arguments as ASCII; SASL PLAIN carries UTF-8.
        client.authenticate("PLAIN", _plain_auth(user))
    return client


# -- Dovecot ------------------------------------------------------------------


@pytest.mark.parametrize("store_name", ["store1", "store2"])
def test_imap_login_every_user(
    request: pytest.FixtureRequest, store_name: str, mail_users: list[MailUser]
) -> None:
    store: Dovecot = request.getfixturevalue(store_name)
    for user in mail_users:
        client = _imap_login(store, user)
        assert client.select("INBOX")[0] == "OK"
        client.logout()


@pytest.mark.parametrize("store_name", ["store1", "store2"])
def test_pop3_login_every_user(
    request: pytest.FixtureRequest, store_name: str, mail_users: list[MailUser]
) -> None:
    store: Dovecot = request.getfixturevalue(store_name)
    for user in mail_users:
        client = poplib.POP3(store.host, store.pop3_port, timeout=5)
        client.user(user.name)
        # POP3 PASS takes the rest of the line: spaces and quotes pass as they are.
        assert client.pass_(user.password).startswith(b"+OK")
        client.quit()


def test_greeting_names_the_store(store1: Dovecot, store2: Dovecot) -> None:
    for store in (store1, store2):
        client = RawImap(store.host, store.imap_port)
        assert client.greeting.startswith(b"* OK ")
        assert f"{store.name} ready.".encode() in client.greeting
        client.close()


def test_login_with_literals_and_utf8(store1: Dovecot, mail_users: list[MailUser]) -> None:
    """LOGIN with synchronizing literals carries quotes, backslashes and UTF-8 verbatim."""
    for user in mail_users:
        password = user.password.encode()
        client = RawImap(store1.host, store1.imap_port)
        client.send(b"a LOGIN " + user.name.encode() + b" {%d}\r\n" % len(password))
        assert client.readline().startswith(b"+")
        client.send(password + b"\r\n")
        assert client.until_tagged(b"a")[-1].startswith(b"a OK"), user.name
        client.close()


def test_quoted_login_with_escapes(store2: Dovecot, mail_users: list[MailUser]) -> None:
    bob = next(u for u in mail_users if u.name == "bob")
    client = RawImap(store2.host, store2.imap_port)
    client.send(b'a LOGIN bob "bob pass \\"quoted\\" \\\\ back"\r\n')
    assert bob.password == 'bob pass "quoted" \\ back'
    assert client.until_tagged(b"a")[-1].startswith(b"a OK")
    client.close()


def test_wrong_password_fails_fast_and_does_not_slow_later_logins(
    store1: Dovecot, mail_users: list[MailUser]
) -> None:
    started = time.monotonic()
    for _ in range(3):
        client = imaplib.IMAP4(store1.host, store1.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("alice", "wrong")
        client.shutdown()
    _imap_login(store1, mail_users[0]).logout()
    # Dovecot's anvil auth penalty would make this 2+4+8 s; the rig turns it off.
    assert time.monotonic() - started < 4


def test_starttls_and_stls_verify_against_test_ca(
    store1: Dovecot, test_ca: TestCA, mail_users: list[MailUser]
) -> None:
    context = _client_context(test_ca.ca_path)
    for host in ("localhost", "127.0.0.1"):
        client = imaplib.IMAP4(host, store1.imap_port)
        client.starttls(context)
        client.login("alice", "alice-secret")
        client.logout()
    pop = poplib.POP3(store1.host, store1.pop3_port, timeout=5)
    pop.stls(context)
    pop.user("carol")
    assert pop.pass_(mail_users[2].password).startswith(b"+OK")
    pop.quit()


def test_implicit_tls_ports(store2: Dovecot, test_ca: TestCA) -> None:
    assert store2.imaps_port is not None
    assert store2.pop3s_port is not None
    context = _client_context(test_ca.ca_path)
    client = imaplib.IMAP4_SSL("localhost", store2.imaps_port, ssl_context=context)
    client.login("dave", "dave-secret")
    client.logout()
    pop = poplib.POP3_SSL("127.0.0.1", store2.pop3s_port, context=context, timeout=5)
    pop.user("frank")
    pop.pass_("frank-secret")
    pop.quit()


def test_untrusted_ca_is_refused(store1: Dovecot, tmp_path: Path) -> None:
    other = TestCA(tmp_path / "other")
    assert store1.imaps_port is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(
            "localhost", store1.imaps_port, ssl_context=_client_context(other.ca_path)
        )


def test_issued_certificates_pass_a_strict_verifier(test_ca: TestCA) -> None:
    """cryptography's verifier applies the RFC 5280 / CA/B profile (as Python 3.13's ssl does)."""
    # cryptography >= 42 only; Debian 12's python3-cryptography (38) lacks the verifier.
    verification = pytest.importorskip("cryptography.x509.verification")
    PolicyBuilder, Store = verification.PolicyBuilder, verification.Store  # noqa: N806
    VerificationError = verification.VerificationError  # noqa: N806
    store = Store(x509.load_pem_x509_certificates(test_ca.ca_path.read_bytes()))
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    by_ip = (
        PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    trusted = test_ca.issue("localhost")
    leaf, ca = x509.load_pem_x509_certificates(trusted.chain_path.read_bytes())
    assert ca.public_bytes(serialization.Encoding.PEM) == test_ca.ca_path.read_bytes()
    verifier.verify(leaf, [])
    by_ip.verify(leaf, [])
    untrusted = test_ca.issue_untrusted("localhost")
    with pytest.raises(VerificationError):
        verifier.verify(x509.load_pem_x509_certificate(untrusted.cert_path.read_bytes()), [])


def test_id_forwarded_client_ip_is_trusted(store1: Dovecot) -> None:
    """login_trusted_networks covers 127.0.0.0/8, so a proxy may forward the client IP."""
    client = RawImap(store1.host, store1.imap_port)
    client.send(b'a ID ("x-originating-ip" "192.0.2.77" "x-originating-port" "4242")\r\n')
    assert client.until_tagged(b"a")[-1].startswith(b"a OK")
    client.send(b"b LOGIN erin erin-secret\r\n")
    assert client.until_tagged(b"b")[-1].startswith(b"b OK")
    client.send(b"c LOGOUT\r\n")
    client.until_tagged(b"c")
    client.close()
    login = re.compile(rb"Login: user=<erin>.*rip=192\.0\.2\.77")
    deadline = time.monotonic() + 5
    while not login.search(store1.log_path.read_bytes()):
        assert time.monotonic() < deadline, "forwarded IP not in the Dovecot log"
        time.sleep(0.05)


def test_deliver_raises_message_count(store2: Dovecot) -> None:
    before = store2.message_count("dave")
    store2.deliver("dave", MESSAGE)
    store2.deliver("dave", MESSAGE)
    assert store2.message_count("dave") == before + 2
    pop = poplib.POP3(store2.host, store2.pop3_port, timeout=5)
    pop.user("dave")
    pop.pass_("dave-secret")
    assert pop.stat()[0] == before + 2
    assert b"Subject: rig test" in pop.retr(before + 1)[1]
    pop.quit()


def test_idle_client_sees_delivery(store1: Dovecot) -> None:
    client = RawImap(store1.host, store1.imap_port)
    client.send(b"a LOGIN alice alice-secret\r\n")
    assert client.until_tagged(b"a")[-1].startswith(b"a OK")
    client.send(b"b SELECT INBOX\r\n")
    lines = client.until_tagged(b"b")
    exists = next(int(m[1]) for line in lines if (m := re.match(rb"\* (\d+) EXISTS", line)))
    client.send(b"c IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    delivered = time.monotonic()
    store1.deliver("alice", MESSAGE)
    expected = b"* %d EXISTS\r\n" % (exists + 1)
    while (line := client.readline()) != expected:
        assert time.monotonic() - delivered < 5, line
    assert time.monotonic() - delivered < 5
    client.send(b"DONE\r\n")
    assert client.until_tagged(b"c")[-1].startswith(b"c OK")
    client.close()


def test_populate_bulk_adds(dovecot_factory: Callable[..., Dovecot]) -> None:
    user = MailUser("bulk", "bulk-pw", 2100)
    store = dovecot_factory(users=[user], name="bulk", tls=False)
    messages = [MESSAGE.replace(b"hello", b"message %d" % i) for i in range(500)]
    store.populate("bulk", messages)
    assert store.message_count("bulk") == 500
    client = imaplib.IMAP4(store.host, store.imap_port)
    client.login("bulk", "bulk-pw")
    assert client.select("INBOX")[1] == [b"500"]
    unseen = client.search(None, "UNSEEN")[1][0]
    assert unseen is not None and len(unseen.split()) == 500
    fetched = client.fetch("500", "(BODY.PEEK[TEXT])")[1][0]
    assert isinstance(fetched, tuple) and b"message" in fetched[1]
    client.logout()
    assert (store.maildir("bulk") / "cur").stat().st_uid == 2100


def test_restart_on_same_ports(dovecot_factory: Callable[..., Dovecot]) -> None:
    store = dovecot_factory(name="flaky")
    ports = (store.imap_port, store.pop3_port, store.imaps_port, store.pop3s_port)
    store.deliver("alice", MESSAGE)
    store.stop()
    assert not store.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((store.host, store.imap_port), timeout=2)
    store.start()
    assert (store.imap_port, store.pop3_port, store.imaps_port, store.pop3s_port) == ports
    client = imaplib.IMAP4(store.host, store.imap_port)
    client.login("alice", "alice-secret")
    assert client.select("INBOX")[1] == [b"1"]
    client.logout()


def test_start_failure_reports_log(tmp_path: Path, mail_users: list[MailUser]) -> None:
    store = Dovecot(tmp_path / "busy", mail_users)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((store.host, store.imap_port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="(?s)exited.*Address already in use"):
            store.start()
    store.close()


def test_missing_binaries_are_an_error(
    tmp_path: Path, mail_users: list[MailUser], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rig.dovecot, "DOVECOT", tmp_path / "no-dovecot")
    monkeypatch.setattr(rig.slapd, "SLAPD", tmp_path / "no-slapd")
    with pytest.raises(RuntimeError, match="dovecot not installed: run scripts/install-deps"):
        Dovecot(tmp_path / "d", mail_users).start()
    with pytest.raises(RuntimeError, match="slapd not installed: run scripts/install-deps"):
        Slapd(tmp_path / "s").start()


def test_user_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="':'"):
        Dovecot(tmp_path / "a", [MailUser("x", "a:b", 2001)])
    with pytest.raises(ValueError, match="uid"):
        Dovecot(tmp_path / "b", [MailUser("x", "y", 0)])


# -- slapd --------------------------------------------------------------------


def test_slapd_has_an_entry_per_user(slapd: Slapd, user_stores: dict[str, Dovecot]) -> None:
    connection = ldap3.Connection(ldap3.Server(slapd.uri), auto_bind=True)  # anonymous
    connection.search(
        slapd.base,
        "(objectClass=imapProxyUser)",
        attributes=["uid", "mail", "mailHost", "mailImapPort", "mailPop3Port"],
    )
    found = {entry.uid.value: entry for entry in connection.entries}
    assert set(found) == set(user_stores)
    for uid, store in user_stores.items():
        entry = found[uid]
        assert entry.mail.value == f"{uid}@example.org"
        assert entry.mailHost.value == store.host
        assert entry.mailImapPort.value == store.imap_port
        assert entry.mailPop3Port.value == store.pop3_port
    connection.unbind()


def test_slapd_tls_verified_against_test_ca(slapd: Slapd, test_ca: TestCA, tmp_path: Path) -> None:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(test_ca.ca_path))
    assert slapd.ldaps_port is not None
    ldaps = ldap3.Connection(
        ldap3.Server("localhost", port=slapd.ldaps_port, use_ssl=True, tls=tls), auto_bind=True
    )
    assert ldaps.search(slapd.base, "(uid=bob)")
    ldaps.unbind()
    starttls = ldap3.Connection(
        ldap3.Server("127.0.0.1", port=slapd.port, tls=tls),
        auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND,
    )
    assert starttls.tls_started
    assert starttls.search(slapd.base, "(mail=carol@example.org)")
    starttls.unbind()
    other = TestCA(tmp_path / "other")
    untrusted = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(other.ca_path))
    with pytest.raises(ldap3.core.exceptions.LDAPSocketOpenError):
        ldap3.Connection(
            ldap3.Server("localhost", port=slapd.ldaps_port, use_ssl=True, tls=untrusted),
            auto_bind=True,
        )


def test_slapd_add_modify_delete(slapd: Slapd) -> None:
    slapd.add_user(
        "zed",
        mail="zed@example.org",
        mail_host="127.0.0.1",
        imap_port=1143,
        pop3_port=1110,
        login_name="Zed.Login",
    )
    try:
        anonymous = ldap3.Connection(ldap3.Server(slapd.uri), auto_bind=True)
        anonymous.search(slapd.base, "(mailLoginName=Zed.Login)", attributes=["*"])
        assert [e.uid.value for e in anonymous.entries] == ["zed"]
        slapd.modify_host("zed", "store9.example.org")
        slapd.modify_user("zed", imap_port=None)
        anonymous.search(slapd.base, "(uid=zed)", attributes=["*"])
        entry = anonymous.entries[0]
        assert entry.mailHost.value == "store9.example.org"
        assert "mailImapPort" not in entry
        with pytest.raises(RuntimeError, match="mailHost"):
            slapd.modify_host("zed", ["a.example.org", "b.example.org"])  # SINGLE-VALUE
    finally:
        slapd.delete_user("zed")
    assert anonymous.search(slapd.base, "(uid=zed)") is False
    anonymous.unbind()


def test_slapd_restart_keeps_data(slapd_factory: Callable[..., Slapd]) -> None:
    server = slapd_factory(tls=False)
    assert server.ldaps_uri is None
    server.add_user("yves", mail="yves@example.org")
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=2)
    server.start()
    connection = ldap3.Connection(ldap3.Server(server.uri), auto_bind=True)
    assert connection.search(server.base, "(mail=yves@example.org)")
    connection.unbind()


# -- slapd replication (syncrepl, RFC 4533) ------------------------------------------


def test_consumer_follows_adds_modifies_and_deletes(
        replicated_slapd: ReplicatedSlapd) -> None:
    pair = replicated_slapd
    pair.add_user("xavier", mail="xavier@example.org", mail_host="127.0.0.1",
                  imap_port=1143)  # returns once the consumer has it
    found = pair.consumer.user("xavier")
    assert found is not None and found["mail"] == ["xavier@example.org"]
    assert found["mailImapPort"] == ["1143"]

    pair.modify_user("xavier", mail_host="store2.example.org", imap_port=2143,
                     pop3_port=2110)
    pair.wait_replicated("xavier", has(mailHost="store2.example.org", mailImapPort=2143,
                                       mailPop3Port=2110))
    pair.modify_user("xavier", pop3_port=None)
    pair.wait_replicated("xavier", has(mailPop3Port=None, mailImapPort=2143))
    assert pair.provider.user("xavier") == pair.consumer.user("xavier")

    pair.delete_user("xavier")
    assert pair.wait_replicated("xavier", absent) is None
    with pytest.raises(RuntimeError, match="did not reach the expected state"):
        pair.wait_replicated("xavier", has(mail="x"), timeout=0.2)


def test_consumer_takes_no_writes(replicated_slapd: ReplicatedSlapd) -> None:
    pair = replicated_slapd
    pair.add_user("yolanda", mail_host="127.0.0.1")
    with pytest.raises(RuntimeError, match="read-only consumer"):
        pair.consumer.add_user("zoe")
    # Not as its rootdn either: a consumer has no rootpw, so nothing drifts.
    with pytest.raises(ldap3.core.exceptions.LDAPBindError):
        ldap3.Connection(ldap3.Server(pair.consumer.uri), user=pair.consumer.admin_dn,
                         password=pair.consumer.admin_password, auto_bind=True)
    anonymous = ldap3.Connection(ldap3.Server(pair.consumer.uri), auto_bind=True)
    assert not anonymous.modify(pair.consumer.dn("yolanda"),
                                {"mailHost": [(ldap3.MODIFY_REPLACE, ["elsewhere"])]})
    anonymous.unbind()
    assert pair.consumer.user("yolanda") == pair.provider.user("yolanda")
    with pytest.raises(ValueError, match="no provider"):
        Slapd(pair.consumer.workdir.parent / "third", provider=pair.consumer)


def test_consumer_serves_while_the_provider_is_away_and_catches_up(
        replicated_slapd: ReplicatedSlapd) -> None:
    pair = replicated_slapd
    pair.add_user("walter", mail_host="127.0.0.1", imap_port=1)
    for port, away, back in ((2, pair.provider.stop, pair.provider.start),
                             (3, pair.provider.kill, pair.provider.start),
                             (4, pair.provider.pause, pair.provider.resume)):
        away()
        # The replica answers on its own, with what it had.
        found = pair.consumer.user("walter")
        assert found is not None and found["mailImapPort"] == [str(port - 1)]
        back()
        # syncrepl reconnects (retry every SYNC_RETRY s) and gets the change.
        pair.modify_user("walter", imap_port=port)
        pair.wait_replicated("walter", has(mailImapPort=port))


def test_shared_files_leave_a_private_parent(tmp_path: Path, mail_users: list[MailUser]) -> None:
    """Under pytest's 0700 tmp dirs, what uid-switched processes need is relocated."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    store = Dovecot(private / "store", mail_users[:1], name="moved")
    try:
        assert store.mail_root.is_relative_to(rig.dovecot.SHARED_ROOT)
        assert (private / "store" / "shared").resolve() == store.mail_root.parent
        store.start()
        client = imaplib.IMAP4(store.host, store.imap_port)
        client.login("alice", "alice-secret")
        client.logout()
    finally:
        store.close()
    assert not store.mail_root.exists()


def test_free_ports_are_never_handed_out_twice() -> None:
    """The kernel may pick the same free port twice in a row (nothing binds it in
    between): a proxy with two listeners on one port once failed CI that way."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    pair = free_port_pair()
    later = {free_port() for _ in range(300)}
    assert pair not in later and pair + 1 not in later
    assert not set(ports) & later

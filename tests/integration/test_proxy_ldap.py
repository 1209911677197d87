"""The proxy end to end with [directory] type = "ldap": imaplib in front, slapd and
Dovecot behind (twistd child process, as in production)."""

from __future__ import annotations

import contextlib
import imaplib
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess
from rig.slapd import Slapd

HOST = "127.0.0.1"
ROBERT = "ldt-robert"  # an entry whose mailbox is bob's: mailLoginName = bob


def ldap_config(port: int, slapd: Slapd, cache: str = "", uri: str | None = None) -> str:
    return f"""
[[listen]]
protocol = "imap"
address = "{HOST}:{port}"
tls = "none"

[tls]
plaintext_auth = true

[directory]
type = "ldap"

[directory.ldap]
uris = ["{uri or slapd.uri}"]
base = "{slapd.base}"
filter = "(|(uid={{user}})(mail={{user}}))"
host_attribute = "mailHost"
imap_port_attribute = "mailImapPort"
pop3_port_attribute = "mailPop3Port"
login_attribute = "mailLoginName"
timeout = 2

{cache}

[backend]
connect_timeout = 3

{RIG_LIMITS}"""


def passwords(mail_users: list[MailUser]) -> dict[str, str]:
    return {u.name: u.password for u in mail_users}


def login(port: int, user: str, password: str) -> tuple[str, str]:
    """LOGIN (and SELECT INBOX when it worked); returns ("OK" or "NO", reply text)."""
    client = imaplib.IMAP4(HOST, port)
    try:
        try:
            # Always a quoted string: imaplib sends the user name as is, and "*" is
            # not an atom (RFC 3501 section 9, atom-specials).
            quoted = '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'
            typ, data = client.login(quoted, password)
        except imaplib.IMAP4.error as e:
            return "NO", str(e)
        assert client.select("INBOX")[0] == "OK"
        return typ, data[0].decode()
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


@pytest.fixture(scope="module")
def robert(slapd: Slapd, store2: Dovecot) -> Iterator[str]:
    slapd.add_user(ROBERT, mail="robert@example.org", mail_host=store2.host,
                   imap_port=store2.imap_port, pop3_port=store2.pop3_port, login_name="bob")
    yield ROBERT
    slapd.delete_user(ROBERT)


@pytest.fixture(scope="module")
def ldap_proxy(tmp_path_factory: pytest.TempPathFactory, slapd: Slapd,
               robert: str) -> Iterator[ProxyProcess]:
    port = free_port()
    # The usual form, with its trailing "/" (OpenLDAP's ldap.conf, RFC 4516), which
    # once made every lookup fail with "port must be an integer" (issue 13).
    config = ldap_config(port, slapd, uri=f"ldap://127.0.0.1:{slapd.port}/")
    process = ProxyProcess(tmp_path_factory.mktemp("ldapproxy"), config, [port])
    process.start()
    yield process
    process.stop()


def test_login_is_routed_by_ldap(ldap_proxy: ProxyProcess, store1: Dovecot, store2: Dovecot,
                                 mail_users: list[MailUser], slapd: Slapd) -> None:
    pw = passwords(mail_users)
    assert login(ldap_proxy.port, "alice", pw["alice"])[0] == "OK"
    assert login(ldap_proxy.port, "bob", pw["bob"])[0] == "OK"
    log = ldap_proxy.log()
    assert f"user=<alice> backend={store1.host}:{store1.imap_port}" in log
    assert f"user=<bob> backend={store2.host}:{store2.imap_port}" in log
    assert f"LDAP directory answers at ldap://127.0.0.1:{slapd.port}/" in log


def test_backend_login_uses_the_directory_login_name(
        ldap_proxy: ProxyProcess, store2: Dovecot, mail_users: list[MailUser]) -> None:
    # The client knows itself as ldt-robert (or robert@example.org); the store only
    # knows bob. The entry's mailLoginName bridges them.
    before = store2.log_path.read_text(errors="replace").count("user=<bob>")
    bob_password = passwords(mail_users)["bob"]
    assert login(ldap_proxy.port, ROBERT, bob_password)[0] == "OK"
    assert login(ldap_proxy.port, "robert@example.org", bob_password)[0] == "OK"
    after = store2.log_path.read_text(errors="replace").count("user=<bob>")
    assert after >= before + 2


def test_unknown_user_and_injection_get_authenticationfailed(ldap_proxy: ProxyProcess) -> None:
    for user in ("nobody", "*", "a*", "*)(uid=*"):
        typ, text = login(ldap_proxy.port, user, "whatever")
        assert typ == "NO" and "[AUTHENTICATIONFAILED]" in text, (user, text)


def test_ldap_down_gives_unavailable_and_cache_still_serves(
        slapd_factory: Callable[..., Slapd], tmp_path_factory: pytest.TempPathFactory,
        store1: Dovecot, mail_users: list[MailUser]) -> None:
    server = slapd_factory(tls=False)
    for name in ("alice", "erin"):
        server.add_user(name, mail_host=store1.host, imap_port=store1.imap_port)
    port = free_port()
    proxy = ProxyProcess(tmp_path_factory.mktemp("ldapdown"), ldap_config(port, server), [port])
    proxy.start()
    try:
        pw = passwords(mail_users)
        assert login(port, "alice", pw["alice"])[0] == "OK"
        server.stop()
        # alice's route is cached; erin's is not, and a wrong answer is never given.
        assert login(port, "alice", pw["alice"])[0] == "OK"
        typ, text = login(port, "erin", pw["erin"])
        assert typ == "NO" and "[UNAVAILABLE]" in text, text
        server.start()  # the proxy recovers by itself
        assert login(port, "erin", pw["erin"])[0] == "OK"
    finally:
        proxy.stop()


def wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in proxy.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{proxy.log()}"
        time.sleep(0.05)
    return proxy.log()


def test_proxy_starts_without_ldap_says_so_and_recovers_on_reload(
        slapd_factory: Callable[..., Slapd], tmp_path_factory: pytest.TempPathFactory,
        store1: Dovecot, mail_users: list[MailUser]) -> None:
    server = slapd_factory(tls=False)
    server.add_user("alice", mail_host=store1.host, imap_port=store1.imap_port)
    server.stop()  # its port is known, and dead
    uri = f"ldap://127.0.0.1:{server.port}/"
    port = free_port()
    proxy = ProxyProcess(tmp_path_factory.mktemp("ldapdead"), ldap_config(port, server, uri=uri),
                         [port])
    proxy.start()  # listens although the directory does not answer
    try:
        log = wait_for_log(proxy, "LDAP directory does not answer")
        line = next(x for x in log.splitlines() if "LDAP directory does not answer" in x)
        assert f"(every URI failed: {uri}: " in line
        assert line.endswith("); starting anyway: cached routes and a later recovery may serve")
        password = passwords(mail_users)["alice"]
        typ, text = login(port, "alice", password)
        assert typ == "NO" and "[UNAVAILABLE]" in text, text
        # A reload tries the directory again, and says it answers now.
        server.start()
        proxy.signal(signal.SIGHUP)
        wait_for_log(proxy, f"LDAP directory answers at {uri}")
        assert login(port, "alice", password)[0] == "OK"
    finally:
        proxy.stop()

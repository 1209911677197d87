"""The proxy on a replicated directory: a syncrepl provider and a read-only consumer
(tests/rig/slapd.py ReplicatedSlapd), real Dovecot stores, the proxy as twistd.

- Failover: with ``uris = [provider, consumer]``, logins go on from the consumer when
  the provider stops (SIGTERM), crashes (SIGKILL) or hangs (SIGSTOP: it still accepts
  TCP connections and answers nothing, so the LDAP timeout decides), and after it
  comes back.
- A moved user: the proxy reads from the consumer only, the user's entry is changed
  on the provider; once the change has replicated and the cached route has expired,
  a kick sends the client back, and it lands on the new store.

The figures (time of the first logins after the failure, replication lag) are
printed; run with ``-s`` to see them. Only generous bounds are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.imapraw import RawImap
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess, admin_token_file
from rig.slapd import ReplicatedSlapd, has

from imapproxy.ldapdirectory import URI_COOLDOWN

HOST = "127.0.0.1"
#: [directory.ldap] timeout of the test proxies: seconds a hung server may cost
LDAP_TIMEOUT = 1.0
#: [directory.cache] positive_ttl of the moved-user test
ROUTE_TTL = 2.0
#: A login after the provider failed takes at most this long: one LDAP timeout for the
#: hung server (the pooled connection's read; no second try on a fresh one), plus a
#: wide margin for a loaded machine.
FAILOVER_BOUND = LDAP_TIMEOUT + 5.0


def config(port: int, uris: list[str], cache: str, extra: str = "") -> str:
    listed = ", ".join(json.dumps(uri) for uri in uris)
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
uris = [{listed}]
base = "ou=people,dc=example,dc=org"
filter = "(uid={{user}})"
host_attribute = "mailHost"
imap_port_attribute = "mailImapPort"
timeout = {LDAP_TIMEOUT}

[directory.cache]
{cache}

[backend]
connect_timeout = 3

{extra}
{RIG_LIMITS}"""


def account(mail_users: list[MailUser], name: str) -> MailUser:
    return next(u for u in mail_users if u.name == name)


def login(port: int, user: MailUser) -> RawImap:
    """LOGIN and SELECT INBOX through the proxy; AssertionError unless both are OK."""
    client = RawImap(HOST, port)
    password = user.password.encode()
    # A LITERAL+ literal carries any password as it is (the proxy offers LITERAL+).
    reply = client.command(b"l", b"LOGIN " + user.name.encode()
                           + b" {%d+}\r\n" % len(password) + password)
    assert reply[-1].startswith(b"l OK"), reply
    assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    return client


def timed_login(port: int, user: MailUser) -> float:
    """Seconds from connect to the SELECT's OK; the session is logged out."""
    started = time.monotonic()
    client = login(port, user)
    elapsed = time.monotonic() - started
    client.command(b"o", b"LOGOUT")
    client.close()
    return elapsed


def admin(proxy: ProxyProcess, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "imapproxy.admincli", "--config", str(proxy.config_path),
         *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def backend_of(proxy: ProxyProcess, user: str) -> str:
    sessions = [json.loads(line) for line in admin(proxy, "sessions", "--json").splitlines()]
    backends = [s["backend"] for s in sessions if s["user"] == user]
    assert len(backends) == 1, sessions
    return str(backends[0])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logins_at(store: Dovecot, user: str) -> int:
    """How many logins of ``user`` the store's log shows."""
    return store.log_path.read_text(errors="replace").count(f"Login: user=<{user}>")


# -- failover ------------------------------------------------------------------------

#: how the provider fails, and how it comes back
FAILURES: dict[str, tuple[Callable[[ReplicatedSlapd], None],
                          Callable[[ReplicatedSlapd], None]]] = {
    "SIGTERM": (lambda pair: pair.provider.stop(), lambda pair: pair.provider.start()),
    "SIGKILL": (lambda pair: pair.provider.kill(), lambda pair: pair.provider.start()),
    "SIGSTOP": (lambda pair: pair.provider.pause(), lambda pair: pair.provider.resume()),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_logins_go_on_from_the_consumer_when_the_provider_fails(
        failure: str, replicated_slapd: ReplicatedSlapd, store1: Dovecot,
        mail_users: list[MailUser], start_proxy: Callable[..., ProxyProcess]) -> None:
    pair = replicated_slapd
    alice = account(mail_users, "alice")
    pair.add_user("alice", mail_host=store1.host, imap_port=store1.imap_port)
    port = free_port()
    # positive_ttl = 0: every login asks the directory, none is served from the cache.
    proxy = start_proxy(config(port, pair.uris, "positive_ttl = 0"), [port])
    # Four logins: each of the four pooled LDAP connections is opened to the provider,
    # so the failure is met on a pooled connection, as in production.
    for _ in range(4):
        timed_login(port, alice)
    assert "failed" not in proxy.log()

    fail, recover = FAILURES[failure]
    fail(pair)
    failed_at = time.monotonic()
    times = [timed_login(port, alice) for _ in range(6)]
    within_cooldown = time.monotonic() - failed_at < URI_COOLDOWN
    print(f"\n[{failure}] logins after the provider failed: "
          + ", ".join(f"{t:.3f}s" for t in times))
    assert max(times) < FAILOVER_BOUND, times
    assert f"LDAP server {pair.provider.uri} failed" in proxy.log()
    if within_cooldown:
        # Only the first login met the failure: the provider is tried last from then
        # on, for URI_COOLDOWN seconds, so no second failure is logged.
        assert proxy.log().count(f"LDAP server {pair.provider.uri} failed") == 1, proxy.log()

    recover(pair)
    pair.modify_user("alice", mail="alice@example.org")  # the provider takes writes again
    pair.wait_replicated("alice", has(mail="alice@example.org"))
    times = [timed_login(port, alice) for _ in range(3)]
    print(f"[{failure}] logins after the provider came back: "
          + ", ".join(f"{t:.3f}s" for t in times))
    assert max(times) < FAILOVER_BOUND, times


# -- a moved user ----------------------------------------------------------------------


def test_a_moved_user_lands_on_the_new_store_after_replication_ttl_and_kick(
        replicated_slapd: ReplicatedSlapd, store1: Dovecot, store2: Dovecot,
        mail_users: list[MailUser], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    pair = replicated_slapd
    erin = account(mail_users, "erin")
    pair.add_user("erin", mail_host=store1.host, imap_port=store1.imap_port)
    # A message only the new store has: the client sees it once it lands there.
    marker = f"moved-{uuid.uuid4().hex}"
    store2.deliver("erin", f"Subject: {marker}\r\n\r\nonly on store2\r\n".encode())
    port, admin_port = free_port(), free_port()
    token = admin_token_file(tmp_path)
    admin_table = f'[admin]\naddress = "{HOST}:{admin_port}"\ntoken_file = "{token}"\n'
    # The consumer only: the change must travel provider -> consumer -> proxy.
    proxy = start_proxy(config(port, [pair.consumer.uri], f"positive_ttl = {ROUTE_TTL}",
                               admin_table), [port, admin_port])

    client = login(port, erin)
    cached_until = time.monotonic() + ROUTE_TTL  # the route was cached before this
    assert client.command(b"f", f"SEARCH SUBJECT {marker}".encode())[0] == b"* SEARCH\r\n"
    client.send(b"i IDLE\r\n")
    assert client.readline().startswith(b"+")
    assert backend_of(proxy, "erin") == f"{store1.host}:{store1.imap_port}"

    changed = time.monotonic()
    pair.modify_user("erin", mail_host=store2.host, imap_port=store2.imap_port)
    pair.wait_replicated("erin", has(mailHost=store2.host, mailImapPort=store2.imap_port))
    print(f"\nreplication lag (modify on the provider -> read on the consumer): "
          f"{time.monotonic() - changed:.3f}s")
    # Until the cached route expires, a new login would still go to store1.
    time.sleep(max(0.0, cached_until - time.monotonic()) + 0.2)

    before = logins_at(store2, "erin")
    assert admin(proxy, "kick", "--user", "erin") == "kicked 1 session (user erin)\n"
    assert client.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert client.at_eof()
    client.close()

    # The client comes back, as a phone does after BYE.
    client = login(port, erin)
    found = client.command(b"f", f"SEARCH SUBJECT {marker}".encode())
    assert found[0].startswith(b"* SEARCH ") and found[0].split()[2:], found
    assert backend_of(proxy, "erin") == f"{store2.host}:{store2.imap_port}"
    # Dovecot's log process writes the line a moment after the login itself.
    wait_for(lambda: logins_at(store2, "erin") > before, "erin's login in store2's log")
    client.command(b"o", b"LOGOUT")
    client.close()

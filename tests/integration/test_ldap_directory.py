"""LdapDirectory against a real slapd: search, mapping, failover, cache, TLS.

Read-only tests use the shared session ``slapd`` and add their own uniquely named
entries (removed again at module end). Tests that stop, restart or break a server
start a private one. Time for TTLs is a ``Clock``; the thread pool reports back
through the real reactor (pytest-twisted).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from rig.certs import CertPair, TestCA
from rig.dovecot import Dovecot
from rig.ports import free_port
from rig.slapd import Slapd
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from imapproxy.config import load as load_config
from imapproxy.directory import Route, Server, rendezvous_order
from imapproxy.errors import DirectoryUnavailable, UserNotFound
from imapproxy.ldapdirectory import LdapDirectory
from imapproxy.ldapentry import BadEntry

PREFIX = "ldt-"  # every entry this module adds, so cleanup cannot touch others'


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_directory(
    tmp_path: Path,
    uris: list[str],
    *,
    clock: Clock | None = None,
    cache: str = "",
    **ldap: Any,
) -> LdapDirectory:
    """An LdapDirectory built by from_config from a real config file."""
    from twisted.internet import reactor

    settings = {
        "base": "ou=people,dc=example,dc=org",
        "host_attribute": "mailHost",
        "imap_port_attribute": "mailImapPort",
        "pop3_port_attribute": "mailPop3Port",
        "timeout": 2,
        **ldap,
    }
    lines = [f"uris = [{', '.join(toml_string(u) for u in uris)}]"]
    for key, value in settings.items():
        if value is None:  # left out, e.g. base = None: the URIs' DN part is the base
            continue
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {toml_string(str(value))}")
    path = tmp_path / f"proxy-{time.monotonic_ns()}.toml"
    path.write_text(
        '[[listen]]\nprotocol = "imap"\naddress = "127.0.0.1:1143"\ntls = "none"\n'
        '[directory]\ntype = "ldap"\n[directory.ldap]\n' + "\n".join(lines) + "\n"
        + (f"[directory.cache]\n{cache}\n" if cache else "")
    )
    return LdapDirectory.from_config(load_config(path), reactor, clock=clock)


@pytest.fixture
def directories() -> Iterator[Callable[..., LdapDirectory]]:
    """Start each directory's thread pool; stop it after the test."""
    made: list[LdapDirectory] = []

    def start(tmp_path: Path, uris: list[str], **kwargs: Any) -> LdapDirectory:
        directory = make_directory(tmp_path, uris, **kwargs)
        directory.service.startService()
        made.append(directory)
        return directory

    yield start
    for directory in made:
        directory.service.stopService()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def log_text(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


async def outcome(d: Deferred[Route]) -> Route | BaseException:
    try:
        return await d
    except Exception as e:  # noqa: BLE001 - the tests inspect it
        return e


@pytest.fixture(scope="module")
def entries(slapd: Slapd) -> Iterator[Slapd]:
    """This module's entries in the shared slapd (removed afterwards)."""
    added: list[str] = []

    def add(uid: str, **kwargs: Any) -> None:
        slapd.add_user(uid, **kwargs)
        added.append(uid)

    add(f"{PREFIX}nohost", mail=f"{PREFIX}nohost@example.org")
    add(f"{PREFIX}dup1", mail="ldt-dup@example.org", mail_host="127.0.0.1")
    add(f"{PREFIX}dup2", mail="ldt-dup@example.org", mail_host="127.0.0.1")
    add(f"{PREFIX}login", mail_host="127.0.0.1:2143", login_name="real.login@store")
    add(f"{PREFIX}we*rd(1)\\", mail_host="127.0.0.2")
    add(f"{PREFIX}jörg", mail_host="127.0.0.3")
    # misc.schema makes mailHost SINGLE-VALUE; a pool of equivalent stores needs a
    # multi-valued attribute, here cosine's "host" (allowed via extensibleObject).
    pool = f"uid={PREFIX}pool,{slapd.base}"
    conn = slapd.admin_connection()
    try:
        assert conn.add(pool, attributes={
            "objectClass": ["inetOrgPerson", "extensibleObject"], "uid": f"{PREFIX}pool",
            "cn": "pool", "sn": "pool",
            "host": ["10.0.0.1:143", "10.0.0.2:143", "10.0.0.3", "10.0.0.4:10143"],
        }), conn.result
    finally:
        conn.unbind()
    added.append(f"{PREFIX}pool")
    yield slapd
    for uid in added:
        slapd.delete_user(uid)


# --- lookups against the shared slapd --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookup_by_uid(tmp_path: Path, entries: Slapd, store1: Dovecot,
                             directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri])
    route = await directory.lookup("alice", "imap")
    assert route == Route("alice", (Server(store1.host, store1.imap_port),))
    route = await directory.lookup("alice", "pop3", "alice@example.org")
    assert route == Route("alice@example.org", (Server(store1.host, store1.pop3_port),))


@pytest_twisted.ensureDeferred
async def test_lookup_by_mail_address(tmp_path: Path, entries: Slapd, store2: Dovecot,
                                      directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], filter="(mail={user})")
    route = await directory.lookup("bob@example.org", "imap", "bob")
    assert route == Route("bob", (Server(store2.host, store2.imap_port),))
    assert isinstance(await outcome(directory.lookup("bob", "imap")), UserNotFound)


@pytest_twisted.ensureDeferred
async def test_local_and_domain_placeholders(tmp_path: Path, entries: Slapd, store2: Dovecot,
                                             directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri],
                            filter="(&(uid={local})(mail={local}@{domain}))")
    route = await directory.lookup("dave@example.org", "imap")
    assert route.servers == (Server(store2.host, store2.imap_port),)
    assert isinstance(await outcome(directory.lookup("dave@example.net", "imap")), UserNotFound)


@pytest_twisted.ensureDeferred
async def test_multi_valued_host_is_ordered_by_rendezvous_hash(
        tmp_path: Path, entries: Slapd, directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], host_attribute="host",
                            imap_port_attribute="", pop3_port_attribute="",
                            filter="(|(uid={user})(mail={user}))")
    route = await directory.lookup(f"{PREFIX}pool", "imap")
    pool = [Server("10.0.0.1", 143), Server("10.0.0.2", 143), Server("10.0.0.3"),
            Server("10.0.0.4", 10143)]
    dn = f"uid={PREFIX}pool,{entries.base}".lower()
    assert list(route.servers) == rendezvous_order(dn, pool)


@pytest_twisted.ensureDeferred
async def test_several_entries_fail_and_are_logged(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], filter="(mail={user})")
    result = await outcome(directory.lookup("ldt-dup@example.org", "imap"))
    assert isinstance(result, BadEntry)
    assert "matched several entries" in log_text(logged)


@pytest_twisted.ensureDeferred
async def test_entry_without_host_fails_and_is_logged(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri])
    assert isinstance(await outcome(directory.lookup(f"{PREFIX}nohost", "imap")), BadEntry)
    assert "no mailHost" in log_text(logged)
    result = await outcome(directory.lookup(f"{PREFIX}absent", "imap"))
    assert isinstance(result, UserNotFound) and not isinstance(result, BadEntry)


@pytest_twisted.ensureDeferred
async def test_login_attribute(tmp_path: Path, entries: Slapd,
                               directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], login_attribute="mailLoginName")
    route = await directory.lookup(f"{PREFIX}login", "imap", "typed@example.org")
    assert route == Route("real.login@store", (Server("127.0.0.1", 2143),))
    route = await directory.lookup("alice", "imap", "alice@example.org")
    assert route.login == "alice@example.org"  # no mailLoginName: the rewritten name


@pytest.mark.parametrize("login", [
    "*", "al*", "*)(uid=*", "alice)(uid=*", "alice)(|(uid=*", "*)(|(objectClass=*)",
    "alice\x00", "\\2a", "\\", "ldt-we*", "(", ")", "ldt-we\\2ard\\281\\29\\5c",
])
@pytest_twisted.ensureDeferred
async def test_injection_attempts_find_nothing(
        login: str, tmp_path: Path, entries: Slapd,
        directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], filter="(|(uid={user})(mail={user}))")
    result = await outcome(directory.lookup(login, "imap"))
    assert isinstance(result, UserNotFound) and not isinstance(result, BadEntry), result


@pytest_twisted.ensureDeferred
async def test_special_and_non_ascii_names_match_exactly(
        tmp_path: Path, entries: Slapd, directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri])
    route = await directory.lookup(f"{PREFIX}we*rd(1)\\", "imap")
    assert route.servers == (Server("127.0.0.2"),)
    route = await directory.lookup(f"{PREFIX}jörg", "imap")
    assert route.servers == (Server("127.0.0.3"),)


@pytest_twisted.ensureDeferred
async def test_bind_dn_and_wrong_password_is_not_logged(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    good = directories(tmp_path, [entries.uri], bind_dn=entries.admin_dn,
                       bind_password=entries.admin_password)
    assert (await good.lookup("alice", "imap")).login == "alice"
    secret = "wrong-Pa55-do-not-log"
    bad = directories(tmp_path, [entries.uri], bind_dn=entries.admin_dn, bind_password=secret)
    assert isinstance(await outcome(bad.lookup("alice", "imap")), DirectoryUnavailable)
    text = log_text(logged)
    assert "invalidCredentials" in text
    assert secret not in text and entries.admin_password not in text
    assert all(secret not in repr(e) for e in logged)


# --- failover, restarts, stale cache (private servers) ---------------------------------


@pytest_twisted.ensureDeferred
async def test_second_uri_takes_over_when_the_first_is_down(
        tmp_path: Path, entries: Slapd, store1: Dovecot, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    directory = directories(tmp_path, [dead, entries.uri], cache="max_entries = 0")
    await directory.service.probed  # it finds the dead URI too, and logs it
    logged.clear()
    route = await directory.lookup("alice", "imap")
    assert route.servers == (Server(store1.host, store1.imap_port),)
    assert f"{dead} failed" in log_text(logged)
    assert directory.uri_health.is_down(dead)
    # During its cooldown the dead URI is tried last: no second failure logged.
    logged.clear()
    await directory.lookup("bob", "imap")
    assert dead not in log_text(logged)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"ldap://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest_twisted.ensureDeferred
async def test_failover_on_timeout(tmp_path: Path, entries: Slapd, black_hole: str,
                                   logged: list[LogEvent],
                                   directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [black_hole, entries.uri], timeout=0.5)
    started = time.monotonic()
    route = await directory.lookup("alice", "imap")
    elapsed = time.monotonic() - started
    assert route.login == "alice"
    assert 0.4 < elapsed < 3.0
    assert f"{black_hole} failed" in log_text(logged)


@pytest_twisted.ensureDeferred
async def test_stale_cache_then_unavailable_then_recovery(
        tmp_path: Path, slapd_factory: Callable[..., Slapd], logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    server = slapd_factory(tls=False)
    server.add_user("amy", mail_host="127.0.0.1:1143")
    server.add_user("ben", mail_host="127.0.0.1:2143")
    clock = Clock()
    directory = directories(
        tmp_path, [server.uri], clock=clock,
        cache="positive_ttl = 10\nnegative_ttl = 5\nstale_ttl = 100")
    fresh = await directory.lookup("amy", "imap")

    server.stop()
    clock.advance(10)  # no longer fresh: the directory is asked, and is down
    assert await directory.lookup("amy", "imap") == fresh
    assert "serving stale cached route for <amy> (10s old)" in log_text(logged)
    # Nothing cached for ben: a temporary failure, never a guess.
    assert isinstance(await outcome(directory.lookup("ben", "imap")), DirectoryUnavailable)
    clock.advance(90)  # stale_ttl reached
    assert isinstance(await outcome(directory.lookup("amy", "imap")), DirectoryUnavailable)

    server.start()  # same directory object, same pooled connections: no restart
    assert await outcome(directory.lookup("amy", "imap")) == fresh, log_text(logged)
    assert (await directory.lookup("ben", "imap")).servers == (Server("127.0.0.1", 2143),)


@pytest_twisted.ensureDeferred
async def test_pooled_connection_recovers_after_server_restart(
        tmp_path: Path, slapd_factory: Callable[..., Slapd], logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    server = slapd_factory(tls=False)
    server.add_user("amy", mail_host="127.0.0.1:1143")
    # One pooled connection, no cache: the second lookup must reuse the first's
    # connection, find it dead, and reconnect on its own.
    directory = directories(tmp_path, [server.uri], pool_size=1, cache="max_entries = 0")
    assert (await directory.lookup("amy", "imap")).login == "amy"
    server.stop()
    server.start()
    assert (await directory.lookup("amy", "imap")).login == "amy"
    assert "failed" not in log_text(logged)


# --- TLS ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ldaps_with_verification(tmp_path: Path, entries: Slapd, test_ca: TestCA,
                                       directories: Callable[..., LdapDirectory]) -> None:
    assert entries.ldaps_uri is not None
    directory = directories(tmp_path, [entries.ldaps_uri], ca_file=str(test_ca.ca_path))
    assert (await directory.lookup("alice", "imap")).login == "alice"


@pytest_twisted.ensureDeferred
async def test_starttls_with_verification(tmp_path: Path, entries: Slapd, test_ca: TestCA,
                                          directories: Callable[..., LdapDirectory]) -> None:
    directory = directories(tmp_path, [entries.uri], starttls=True, ca_file=str(test_ca.ca_path))
    before = entries.log_path.read_text(errors="replace").count("1.3.6.1.4.1.1466.20037")
    assert (await directory.lookup("alice", "imap")).login == "alice"
    after = entries.log_path.read_text(errors="replace").count("1.3.6.1.4.1.1466.20037")
    assert after > before  # slapd saw the StartTLS extended operation (RFC 4511 4.14)


@pytest_twisted.ensureDeferred
async def test_system_trust_store_does_not_trust_the_test_ca(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    assert entries.ldaps_uri is not None
    directory = directories(tmp_path, [entries.ldaps_uri])  # no ca_file
    assert isinstance(await outcome(directory.lookup("alice", "imap")), DirectoryUnavailable)
    assert "CERTIFICATE_VERIFY_FAILED" in log_text(logged)


@pytest.fixture
def wrong_cert_slapd(tmp_path: Path, test_ca: TestCA,
                     request: pytest.FixtureRequest) -> Iterator[Slapd]:
    """A private slapd whose certificate must be refused (param: "untrusted" or "name")."""
    cert: CertPair
    if request.param == "untrusted":
        cert = test_ca.issue_untrusted("localhost")
    else:
        cert = test_ca.issue("ldap.other.example", ip=None)
    server = Slapd(tmp_path / "wrong-cert-slapd", cert=cert)
    server.start()
    server.add_user("amy", mail_host="127.0.0.1")
    yield server
    server.stop()


@pytest.mark.parametrize("wrong_cert_slapd", ["untrusted", "name"], indirect=True)
@pytest.mark.parametrize("mode", ["ldaps", "starttls"])
@pytest_twisted.ensureDeferred
async def test_wrong_certificate_is_refused(
        mode: str, wrong_cert_slapd: Slapd, tmp_path: Path, test_ca: TestCA,
        logged: list[LogEvent], directories: Callable[..., LdapDirectory]) -> None:
    server = wrong_cert_slapd
    if mode == "ldaps":
        assert server.ldaps_uri is not None
        directory = directories(tmp_path, [server.ldaps_uri], ca_file=str(test_ca.ca_path))
    else:
        directory = directories(tmp_path, [server.uri], starttls=True,
                                ca_file=str(test_ca.ca_path))
    assert isinstance(await outcome(directory.lookup("amy", "imap")), DirectoryUnavailable)
    text = log_text(logged).lower()
    assert "certificate" in text or "verify" in text, text


# --- every URI form (RFC 4516 section 2, and ldapi), and the start-up probe ------------


def uri_form(slapd: Slapd, form: str) -> str:
    port = slapd.port
    forms = {
        "host:port": f"ldap://127.0.0.1:{port}",
        "host:port/": f"ldap://127.0.0.1:{port}/",
        "host:port/dn": f"ldap://127.0.0.1:{port}/{slapd.base.replace(',', '%2C')}",
        "upper-case scheme": f"LDAP://127.0.0.1:{port}/",
        "ldaps by name": f"ldaps://localhost:{slapd.ldaps_port}/",
        "ldapi": slapd.ldapi_uri or "",
    }
    assert forms[form], f"{slapd} has no {form} listener"
    return forms[form]


@pytest.mark.parametrize("form", ["host:port", "host:port/", "host:port/dn", "upper-case scheme",
                                  "ldaps by name", "ldapi"])
@pytest_twisted.ensureDeferred
async def test_every_uri_form_finds_the_route(
        form: str, tmp_path: Path, entries: Slapd, store1: Dovecot, test_ca: TestCA,
        logged: list[LogEvent], directories: Callable[..., LdapDirectory]) -> None:
    uri = uri_form(entries, form)
    directory = directories(tmp_path, [uri], ca_file=str(test_ca.ca_path))
    route = await directory.lookup("alice", "imap")
    assert route == Route("alice", (Server(store1.host, store1.imap_port),)), log_text(logged)
    assert await directory.service.probed is True
    assert f"LDAP directory answers at {uri}" in log_text(logged)


@pytest_twisted.ensureDeferred
async def test_ldapi_connects_over_the_socket(
        tmp_path: Path, entries: Slapd, directories: Callable[..., LdapDirectory]) -> None:
    assert entries.ldapi_uri is not None
    directory = directories(tmp_path, [entries.ldapi_uri], cache="max_entries = 0")
    before = entries.log_path.read_text(errors="replace").count("PATH=" + str(entries.ldapi_path))
    assert (await directory.lookup("bob", "imap")).login == "bob"
    after = entries.log_path.read_text(errors="replace").count("PATH=" + str(entries.ldapi_path))
    assert after > before  # slapd logged the connection as one on its ldapi socket


@pytest_twisted.ensureDeferred
async def test_the_dn_part_is_the_search_base(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    good = directories(tmp_path, [f"ldap://127.0.0.1:{entries.port}/{entries.suffix}"],
                       base=None)
    assert good.cfg.base == entries.suffix
    assert (await good.lookup("alice", "imap")).login == "alice"
    # A base that is not there finds no one; the probe says why.
    missing = f"ldap://127.0.0.1:{entries.port}/ou=nowhere,{entries.suffix}"
    bad = directories(tmp_path, [missing], base=None)
    assert isinstance(await outcome(bad.lookup("alice", "imap")), UserNotFound)
    assert await bad.service.probed is True
    assert f"LDAP directory answers at {missing}, but has no entry ou=nowhere" in log_text(logged)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
@pytest_twisted.ensureDeferred
async def test_ipv6_literal_in_brackets(
        tmp_path: Path, slapd_factory: Callable[..., Slapd],
        directories: Callable[..., LdapDirectory]) -> None:
    server = slapd_factory(tls=False, ipv6=True)
    server.add_user("amy", mail_host="127.0.0.1:1143")
    assert server.ipv6_uri is not None
    directory = directories(tmp_path, [server.ipv6_uri], cache="max_entries = 0")
    assert (await directory.lookup("amy", "imap")).servers == (Server("127.0.0.1", 1143),)
    assert await directory.service.probed is True
    assert "IP=[::1]" in server.log_path.read_text(errors="replace")


@pytest_twisted.ensureDeferred
async def test_probe_logs_a_directory_that_does_not_answer(
        tmp_path: Path, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    dead = [f"ldap://127.0.0.1:{free_port()}/", f"ldaps://localhost:{free_port()}"]
    directory = directories(tmp_path, dead)
    assert await directory.service.probed is False
    errors = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"LDAP directory does not answer (every URI failed: {dead[0]}: ")
    assert f"; {dead[1]}: " in errors[0]
    assert errors[0].endswith("); starting anyway: cached routes and a later recovery may serve")
    # The probe leaves the URIs' health to the lookups.
    assert not any(directory.uri_health.is_down(uri) for uri in dead)


@pytest_twisted.ensureDeferred
async def test_probe_names_the_uri_that_answers_after_one_that_failed(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}/"
    directory = directories(tmp_path, [dead, entries.uri])
    assert await directory.service.probed is True
    text = log_text(logged)
    assert f"LDAP server {dead} failed" in text
    assert f"LDAP directory answers at {entries.uri}" in text


@pytest_twisted.ensureDeferred
async def test_probe_with_a_wrong_password_does_not_log_it(
        tmp_path: Path, entries: Slapd, logged: list[LogEvent],
        directories: Callable[..., LdapDirectory]) -> None:
    secret = "probe-Pa55-do-not-log"
    directory = directories(tmp_path, [entries.uri], bind_dn=entries.admin_dn,
                            bind_password=secret)
    assert await directory.service.probed is False
    text = log_text(logged)
    assert f"every URI failed: {entries.uri}: bind as {entries.admin_dn} failed: " \
           "invalidCredentials" in text
    assert secret not in text and all(secret not in repr(e) for e in logged)

"""Unit tests for imapproxy.ldapdirectory: mapping, cache and failover, no LDAP server.

The blocking search is replaced by a scripted fake and the thread pool by a
synchronous (or manually fired) runner; time is a twisted.internet.task.Clock.
Everything that talks LDAP is in tests/integration/test_ldap_directory.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from imapproxy.config import CacheConfig, Config, ConfigError, LdapConfig
from imapproxy.config import load as load_config
from imapproxy.directory import Route, Server, rendezvous_order
from imapproxy.errors import DirectoryUnavailable, UserNotFound
from imapproxy.ldapdirectory import (
    BadEntry,
    Entry,
    LdapDirectory,
    LdapPoolService,
    LdapSearcher,
    RouteCache,
    SearchResult,
    parse_entry,
    route_for,
    select_entry,
)

CFG = LdapConfig(
    uris=("ldap://one", "ldap://two"),
    base="ou=people,dc=example,dc=org",
    host_attribute="mailHost",
    imap_port_attribute="mailImapPort",
    pop3_port_attribute="mailPop3Port",
    managesieve_port_attribute="mailSievePort",
    login_attribute="mailLoginName",
)
DN = "uid=alice,ou=people,dc=example,dc=org"


# --- parse_entry -----------------------------------------------------------------------


def test_single_host() -> None:
    entry = parse_entry(DN, {"mailHost": [b"store1"]}, CFG)
    assert entry == Entry(DN, (Server("store1"),))


def test_host_with_port_and_ipv6() -> None:
    entry = parse_entry(DN, {"mailHost": [b"store1:1143", b"[::1]:2143"]}, CFG)
    assert entry.servers == (Server("store1", 1143), Server("::1", 2143))


def test_attribute_names_are_case_insensitive() -> None:
    # RFC 4512 section 2.5; the server answers with the schema's spelling.
    entry = parse_entry(DN, {"MAILHOST": [b"s"], "mailimapport": [b"993"]}, CFG)
    assert entry.servers == (Server("s"),) and entry.imap_port == 993


def test_duplicate_hosts_collapse() -> None:
    assert parse_entry(DN, {"mailHost": [b"a", b"a", b"b"]}, CFG).servers == (
        Server("a"), Server("b"))


def test_missing_host_is_bad_entry() -> None:
    with pytest.raises(BadEntry, match="no mailHost"):
        parse_entry(DN, {"mailLoginName": [b"alice"]}, CFG)


@pytest.mark.parametrize("value", [b"", b"host:99999", b"host:port", b"[::1"])
def test_unparsable_host_is_bad_entry(value: bytes) -> None:
    with pytest.raises(BadEntry):
        parse_entry(DN, {"mailHost": [b"good", value]}, CFG)


def test_non_utf8_is_bad_entry() -> None:
    with pytest.raises(BadEntry, match="UTF-8"):
        parse_entry(DN, {"mailHost": [b"\xff"]}, CFG)


def test_ports_and_login() -> None:
    entry = parse_entry(DN, {"mailHost": [b"s"], "mailImapPort": [b"1143"],
                             "mailPop3Port": [b"1110"], "mailLoginName": [b"alice.real"]}, CFG)
    assert (entry.imap_port, entry.pop3_port, entry.login) == (1143, 1110, "alice.real")
    assert entry.managesieve_port is None
    entry = parse_entry(DN, {"mailHost": [b"s"], "mailsieveport": [b"14190"]}, CFG)
    assert entry.managesieve_port == 14190


@pytest.mark.parametrize("value", [[b"0"], [b"65536"], [b"x"], [b"-1"], [b"143", b"993"]])
def test_bad_port_is_bad_entry(value: list[bytes]) -> None:
    with pytest.raises(BadEntry):
        parse_entry(DN, {"mailHost": [b"s"], "mailImapPort": value}, CFG)


def test_several_login_names_is_bad_entry() -> None:
    # Which one would we log in as? Never a guess.
    with pytest.raises(BadEntry, match="2 values"):
        parse_entry(DN, {"mailHost": [b"s"], "mailLoginName": [b"a", b"b"]}, CFG)


def test_empty_login_name_is_bad_entry() -> None:
    with pytest.raises(BadEntry, match="empty"):
        parse_entry(DN, {"mailHost": [b"s"], "mailLoginName": [b""]}, CFG)


def test_unconfigured_attributes_are_ignored() -> None:
    cfg = LdapConfig(base="dc=x", host_attribute="mailHost")
    entry = parse_entry(DN, {"mailHost": [b"s"], "mailImapPort": [b"bad"],
                             "mailLoginName": [b"a", b"b"]}, cfg)
    assert entry == Entry(DN, (Server("s"),))


# --- select_entry ----------------------------------------------------------------------


def test_no_entry_is_user_not_found() -> None:
    with pytest.raises(UserNotFound) as info:
        select_entry("alice", [])
    assert not isinstance(info.value, BadEntry)


def test_several_entries_is_bad_entry() -> None:
    with pytest.raises(BadEntry, match="several entries"):
        select_entry("*", [("uid=a", {}), ("uid=b", {})])


def test_one_entry() -> None:
    assert select_entry("alice", [(DN, {"mailHost": [b"s"]})]) == (DN, {"mailHost": [b"s"]})


# --- route_for -------------------------------------------------------------------------

POOL = (Server("a"), Server("b", 1143), Server("c"))


def test_route_orders_by_rendezvous_on_dn() -> None:
    route = route_for(Entry(DN, POOL), "imap", "alice")
    assert route == Route("alice", tuple(rendezvous_order(DN.lower(), POOL)))


def test_route_is_the_same_for_every_login_name_of_an_entry() -> None:
    entry = Entry(DN, POOL)
    assert route_for(entry, "imap", "alice").servers == route_for(
        entry, "imap", "alice@example.org").servers


def test_protocol_picks_the_port_attribute() -> None:
    entry = Entry(DN, (Server("a"), Server("b", 1143)), imap_port=993, pop3_port=995)
    assert {s.port for s in route_for(entry, "imap", "x").servers} == {993}
    assert {s.port for s in route_for(entry, "pop3", "x").servers} == {995}


def test_managesieve_has_its_own_port_attribute() -> None:
    entry = Entry(DN, (Server("a"), Server("b", 1143)), imap_port=993, managesieve_port=4190)
    assert {s.port for s in route_for(entry, "managesieve", "x").servers} == {4190}
    entry = Entry(DN, (Server("a"), Server("b", 1143)), imap_port=993)
    assert set(route_for(entry, "managesieve", "x").servers) == {Server("a"), Server("b", 1143)}


def test_without_port_attribute_host_port_or_default() -> None:
    entry = Entry(DN, (Server("a"), Server("b", 1143)), imap_port=993)
    assert set(route_for(entry, "pop3", "x").servers) == {Server("a"), Server("b", 1143)}


def test_port_attribute_collapses_duplicates() -> None:
    entry = Entry(DN, (Server("a", 1), Server("a", 2)), imap_port=993)
    assert route_for(entry, "imap", "x").servers == (Server("a", 993),)


def test_entry_login_wins() -> None:
    assert route_for(Entry(DN, POOL, login="real"), "imap", "alice").login == "real"


def test_unknown_protocol() -> None:
    with pytest.raises(ValueError):
        route_for(Entry(DN, POOL), "smtp", "alice")


# --- RouteCache ------------------------------------------------------------------------

E = Entry(DN, (Server("s"),))


def cache(**kwargs: Any) -> tuple[Clock, RouteCache]:
    clock = Clock()
    return clock, RouteCache(CacheConfig(**kwargs), clock)


def test_cache_positive_ttl() -> None:
    clock, c = cache(positive_ttl=10, stale_ttl=100)
    c.put("alice", E)
    clock.advance(9.9)
    assert c.fresh("alice") is not None
    clock.advance(0.1)
    assert c.fresh("alice") is None
    assert c.stale("alice") == (E, 10.0)  # still there for an outage


def test_cache_stale_expires() -> None:
    clock, c = cache(positive_ttl=10, stale_ttl=100)
    c.put("alice", E)
    clock.advance(100)
    assert c.stale("alice") is None
    assert len(c) == 0


def test_cache_negative_ttl_and_never_stale() -> None:
    clock, c = cache(negative_ttl=5, stale_ttl=100)
    c.put("nobody", None, "no entry")
    cached = c.fresh("nobody")
    assert cached is not None and cached.entry is None and cached.reason == "no entry"
    assert c.stale("nobody") is None
    clock.advance(5)
    assert c.fresh("nobody") is None
    assert len(c) == 0


def test_cache_lru_bound() -> None:
    _, c = cache(max_entries=2)
    c.put("a", E)
    c.put("b", E)
    assert c.fresh("a") is not None  # a is now the most recently used
    c.put("c", E)
    assert c.fresh("b") is None
    assert c.fresh("a") is not None and c.fresh("c") is not None
    assert len(c) == 2


def test_cache_size_zero_disables() -> None:
    _, c = cache(max_entries=0)
    c.put("a", E)
    assert c.fresh("a") is None


def test_cache_clear() -> None:
    _, c = cache()
    c.put("a", E)
    c.clear()
    assert c.fresh("a") is None and c.stale("a") is None


# --- LdapDirectory with a scripted search ---------------------------------------------

HOSTS = {"mailHost": [b"store1", b"store2:1143"]}


class FakeSearch:
    """Plays back SearchResults (or exceptions) and records what was asked."""

    def __init__(self, *results: SearchResult | Exception) -> None:
        self.results = list(results)
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, uris: Sequence[str], search_filter: str) -> SearchResult:
        self.calls.append((list(uris), search_filter))
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result


def found(*entries: tuple[str, dict[str, list[bytes]]], uri: str = "ldap://one") -> SearchResult:
    return SearchResult(list(entries), uri, [])


DOWN = SearchResult(None, None, [("ldap://one", "refused"), ("ldap://two", "timed out")])


def make(search: FakeSearch, runner: Callable[[Callable[[], SearchResult]],
         Deferred[SearchResult]] | None = None, **cache_kwargs: Any
         ) -> tuple[Clock, LdapDirectory]:
    clock = Clock()
    directory = LdapDirectory(
        CFG, CacheConfig(**cache_kwargs), clock=clock,
        run_in_thread=runner or (lambda f: maybeDeferred(f)), search=search,
    )
    return clock, directory


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


@pytest.fixture
def logged() -> Any:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def test_lookup_maps_and_filters() -> None:
    search = FakeSearch(found((DN, HOSTS)))
    _, directory = make(search)
    route = result_of(directory.lookup("alice", "imap"))
    assert route == Route("alice", tuple(rendezvous_order(
        DN.lower(), [Server("store1"), Server("store2", 1143)])))
    assert search.calls == [(["ldap://one", "ldap://two"], "(uid=alice)")]


def test_lookup_escapes_the_filter() -> None:
    search = FakeSearch(found())
    _, directory = make(search)
    failure = result_of(directory.lookup("*)(uid=*", "imap"))
    assert failure.check(UserNotFound)
    assert search.calls[0][1] == r"(uid=\2a\29\28uid=\2a)"


def test_backend_login_is_used_unless_the_entry_has_one() -> None:
    search = FakeSearch(found((DN, HOSTS)), found((DN, {**HOSTS, "mailLoginName": [b"real"]})))
    _, directory = make(search, max_entries=0)
    assert result_of(directory.lookup("alice", "imap", "alice@example.org")).login == (
        "alice@example.org")
    assert result_of(directory.lookup("alice", "imap", "alice@example.org")).login == "real"


def test_cache_hit_does_not_search_again() -> None:
    search = FakeSearch(found((DN, HOSTS)))
    clock, directory = make(search, positive_ttl=60)
    result_of(directory.lookup("alice", "imap"))
    result_of(directory.lookup("alice", "pop3"))
    assert len(search.calls) == 1
    clock.advance(60)
    result_of(directory.lookup("alice", "imap"))
    assert len(search.calls) == 2


def test_negative_answers_are_cached(logged: list[LogEvent]) -> None:
    search = FakeSearch(found())
    clock, directory = make(search, negative_ttl=30)
    for _ in range(3):
        assert result_of(directory.lookup("nobody", "imap")).check(UserNotFound)
    assert len(search.calls) == 1
    clock.advance(30)
    result_of(directory.lookup("nobody", "imap"))
    assert len(search.calls) == 2
    assert any("no route for <nobody>" in t for t in texts(logged))


def test_several_entries_fail_and_are_logged(logged: list[LogEvent]) -> None:
    search = FakeSearch(found(("uid=a,dc=x", HOSTS), ("uid=b,dc=x", HOSTS)))
    _, directory = make(search)
    failure = result_of(directory.lookup("a", "imap"))
    assert failure.check(BadEntry)
    assert isinstance(failure.value, UserNotFound)  # the client sees "auth failed"
    assert any("several entries" in t for t in texts(logged))


def test_entry_without_host_fails() -> None:
    _, directory = make(FakeSearch(found((DN, {"mailLoginName": [b"x"]}))))
    assert result_of(directory.lookup("alice", "imap")).check(BadEntry)


def test_directory_down_without_cache_is_unavailable(logged: list[LogEvent]) -> None:
    _, directory = make(FakeSearch(DOWN))
    assert result_of(directory.lookup("alice", "imap")).check(DirectoryUnavailable)
    log = "\n".join(texts(logged))
    assert "ldap://one failed: refused" in log and "ldap://two failed: timed out" in log


def test_stale_entry_served_while_down_then_unavailable(logged: list[LogEvent]) -> None:
    search = FakeSearch(found((DN, HOSTS)), DOWN)
    clock, directory = make(search, positive_ttl=10, stale_ttl=100)
    fresh = result_of(directory.lookup("alice", "imap"))
    clock.advance(50)
    assert result_of(directory.lookup("alice", "imap")) == fresh
    assert any("serving stale cached route for <alice> (50s old)" in t for t in texts(logged))
    clock.advance(50)
    assert result_of(directory.lookup("alice", "imap")).check(DirectoryUnavailable)


def test_negative_answers_are_not_served_stale() -> None:
    search = FakeSearch(found(), DOWN)
    clock, directory = make(search, negative_ttl=10, stale_ttl=100)
    result_of(directory.lookup("nobody", "imap"))
    clock.advance(10)
    assert result_of(directory.lookup("nobody", "imap")).check(DirectoryUnavailable)


def test_recovers_when_the_directory_is_back() -> None:
    search = FakeSearch(DOWN, found((DN, HOSTS)))
    clock, directory = make(search)
    assert result_of(directory.lookup("alice", "imap")).check(DirectoryUnavailable)
    assert isinstance(result_of(directory.lookup("alice", "imap")), Route)


def test_failed_uri_is_tried_last_during_its_cooldown() -> None:
    search = FakeSearch(
        SearchResult([(DN, HOSTS)], "ldap://two", [("ldap://one", "refused")]),
        found(uri="ldap://two"),
    )
    clock, directory = make(search, max_entries=0)
    result_of(directory.lookup("alice", "imap"))
    result_of(directory.lookup("bob", "imap"))
    assert search.calls[1][0] == ["ldap://two", "ldap://one"]
    clock.advance(directory.uri_health.cooldown)
    result_of(directory.lookup("carol", "imap"))
    assert search.calls[2][0] == ["ldap://one", "ldap://two"]


def test_all_uris_down_serves_stale_without_waiting_on_ldap_again() -> None:
    search = FakeSearch(found((DN, HOSTS)), DOWN)
    clock, directory = make(search, positive_ttl=10, stale_ttl=100)
    result_of(directory.lookup("alice", "imap"))
    clock.advance(10)
    assert isinstance(result_of(directory.lookup("alice", "imap")), Route)  # searched: DOWN
    assert isinstance(result_of(directory.lookup("alice", "imap")), Route)  # not searched
    assert len(search.calls) == 2
    # A user with nothing cached still gets a real try.
    assert result_of(directory.lookup("bob", "imap")).check(DirectoryUnavailable)
    assert len(search.calls) == 3


def test_concurrent_lookups_share_one_search() -> None:
    pending: list[tuple[Deferred[SearchResult], Callable[[], SearchResult]]] = []

    def runner(f: Callable[[], SearchResult]) -> Deferred[SearchResult]:
        d: Deferred[SearchResult] = Deferred()
        pending.append((d, f))
        return d

    search = FakeSearch(found((DN, HOSTS)))
    _, directory = make(search, runner)
    first = directory.lookup("alice", "imap")
    second = directory.lookup("alice", "pop3", "alice@example.org")
    assert len(pending) == 1
    d, f = pending.pop()
    d.callback(f())
    assert result_of(first).login == "alice"
    assert result_of(second).login == "alice@example.org"
    assert len(search.calls) == 1


def test_concurrent_failures_reach_every_waiter() -> None:
    pending: list[Deferred[SearchResult]] = []

    def runner(f: Callable[[], SearchResult]) -> Deferred[SearchResult]:
        d: Deferred[SearchResult] = Deferred()
        pending.append(d)
        return d

    _, directory = make(FakeSearch(DOWN), runner)
    lookups = [directory.lookup("alice", "imap") for _ in range(3)]
    pending[0].callback(DOWN)
    assert all(result_of(d).check(DirectoryUnavailable) for d in lookups)


def test_a_crashing_search_is_logged_not_raised(logged: list[LogEvent]) -> None:
    _, directory = make(FakeSearch(RuntimeError("boom")))
    assert result_of(directory.lookup("alice", "imap")).check(DirectoryUnavailable)
    assert any(e.get("log_failure") is not None for e in logged)


def test_undecodable_name_is_not_searched() -> None:
    search = FakeSearch(found((DN, HOSTS)))
    _, directory = make(search)
    assert result_of(directory.lookup("bad\udcff", "imap")).check(UserNotFound)
    assert search.calls == []


def test_unknown_protocol_fails() -> None:
    _, directory = make(FakeSearch(found((DN, HOSTS))))
    failure = result_of(directory.lookup("alice", "smtp"))
    assert isinstance(failure, Failure) and failure.check(ValueError)


def test_clear_cache_forgets_answers_and_uri_health() -> None:
    search = FakeSearch(SearchResult([(DN, HOSTS)], "ldap://two", [("ldap://one", "x")]))
    _, directory = make(search)
    result_of(directory.lookup("alice", "imap"))
    directory.clear_cache()
    result_of(directory.lookup("alice", "imap"))
    assert len(search.calls) == 2
    assert search.calls[1][0] == ["ldap://one", "ldap://two"]


def test_default_service_is_an_iservice() -> None:
    _, directory = make(FakeSearch(found()))
    assert IService.providedBy(directory.service)


# --- from_config -----------------------------------------------------------------------


def write_config(tmp_path: Path, ldap_lines: str) -> Config:
    (tmp_path / "proxy.toml").write_text(
        '[[listen]]\nprotocol = "imap"\naddress = "127.0.0.1:1143"\ntls = "none"\n'
        '[directory]\ntype = "ldap"\n[directory.ldap]\nbase = "dc=example,dc=org"\n'
        + ldap_lines
    )
    return load_config(tmp_path / "proxy.toml")


def test_from_config_builds_a_pool_service(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'pool_size = 3\nbind_dn = "cn=x"\nbind_password = "s3cret"\n')
    directory = LdapDirectory.from_config(config, Clock())
    assert IService.providedBy(directory.service)
    pool = directory.service.pool  # type: ignore[attr-defined,unused-ignore]
    assert pool.max == 3 and not pool.started
    assert "s3cret" not in repr(directory.cfg)


def test_from_config_rejects_an_unparsable_filter(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'filter = "(&(uid={user})(mail=x)"\n')
    with pytest.raises(ConfigError, match="filter"):
        LdapDirectory.from_config(config, Clock())


# --- how ldap3 is told where to go (no connection is made) -------------------------------


@pytest.mark.parametrize(("uri", "host", "port", "ssl"), [
    ("ldap://ldap.example.org:389/", "ldap.example.org", 389, False),  # ldap3 alone fails here
    ("ldap://ldap.example.org/", "ldap.example.org", 389, False),
    ("ldaps://ldap.example.org", "ldap.example.org", 636, True),
    ("LDAPS://LDAP.example.org:10636/dc=example,dc=org", "ldap.example.org", 10636, True),
    ("ldap://[2001:db8::1]:3389/", "2001:db8::1", 3389, False),
    ("ldap://127.0.0.1", "127.0.0.1", 389, False),
])
def test_server_is_built_from_the_parsed_uri(uri: str, host: str, port: int, ssl: bool) -> None:
    searcher = LdapSearcher(LdapConfig(uris=(uri,), base="dc=x"), slots=1)
    server = searcher._server(uri)
    assert (server.host, server.port, server.ssl, server.ipc) == (host, port, ssl, False)
    if ssl:
        assert server.tls.sni == (None if ":" in host or host[0].isdigit() else host)


def test_ldapi_server_gets_the_socket_path() -> None:
    uri = "ldapi://%2Frun%2Fslap%20d%2Fldapi/"
    searcher = LdapSearcher(LdapConfig(uris=(uri,), base="dc=x", starttls=True), slots=1)
    server = searcher._server(uri)
    assert server.ipc and server.host == "/run/slap d/ldapi"
    assert server.tls is None  # no StartTLS over a local socket


def test_starttls_applies_to_ldap_uris_only() -> None:
    cfg = LdapConfig(uris=("ldap://h", "ldaps://h", "ldapi://%2Fs"), base="dc=x", starttls=True)
    searcher = LdapSearcher(cfg, slots=1)
    assert [searcher._starttls(searcher._target(uri)) for uri in cfg.uris] == [
        True, False, False]
    assert searcher._server("ldap://h").tls.sni == "h"


# --- the start-up and reload probe ----------------------------------------------------------


class FakeProbe:
    def __init__(self, result: SearchResult | Exception) -> None:
        self.result = result
        self.calls: list[list[str]] = []

    def __call__(self, uris: Sequence[str]) -> SearchResult:
        self.calls.append(list(uris))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def probing(result: SearchResult | Exception) -> tuple[FakeProbe, LdapDirectory]:
    probe = FakeProbe(result)
    directory = LdapDirectory(CFG, CacheConfig(), clock=Clock(),
                              run_in_thread=lambda f: maybeDeferred(f),
                              search=FakeSearch(found()), probe_search=probe)
    return probe, directory


def test_probe_logs_the_uri_that_answers(logged: list[LogEvent]) -> None:
    probe, directory = probing(SearchResult([(CFG.base, {})], "ldap://two",
                                            [("ldap://one", "refused")]))
    assert result_of(directory.probe()) is True
    assert probe.calls == [["ldap://one", "ldap://two"]]  # every URI, in the configured order
    assert texts(logged) == ["LDAP server ldap://one failed: refused",
                             "LDAP directory answers at ldap://two"]
    assert not directory.uri_health.is_down("ldap://one")  # lookups judge the URIs


def test_probe_logs_one_error_line_when_nothing_answers(logged: list[LogEvent]) -> None:
    _, directory = probing(DOWN)
    assert result_of(directory.probe()) is False
    assert texts(logged) == [
        "LDAP directory does not answer (every URI failed: ldap://one: refused; "
        "ldap://two: timed out); starting anyway: cached routes and a later recovery may serve"]
    logged.clear()
    assert result_of(directory.probe("reload")) is False
    assert "); reloaded anyway: cached routes" in texts(logged)[0]


def test_probe_warns_when_the_base_is_not_there(logged: list[LogEvent]) -> None:
    _, directory = probing(SearchResult([], "ldap://one", []))
    assert result_of(directory.probe()) is True
    assert texts(logged) == ["LDAP directory answers at ldap://one, but has no entry "
                             "ou=people,dc=example,dc=org (noSuchObject): check "
                             "[directory.ldap] base"]


def test_a_crashing_probe_is_logged_not_raised(logged: list[LogEvent]) -> None:
    _, directory = probing(RuntimeError("bug"))
    assert result_of(directory.probe()) is False
    assert any(e.get("log_failure") is not None for e in logged)


def test_without_a_probe_search_the_probe_does_nothing(logged: list[LogEvent]) -> None:
    _, directory = make(FakeSearch(found()))
    assert result_of(directory.probe()) is True
    assert logged == []


def test_the_pool_service_probes_once_started(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    directory = LdapDirectory.from_config(config, Clock())
    service = directory.service
    assert isinstance(service, LdapPoolService)
    assert service.probe == directory.probe and service.probed is None
    probed: list[str] = []
    service.probe = lambda: probed.append("probed") or Deferred()
    service.startService()
    try:
        assert probed == ["probed"] and service.probed is not None
    finally:
        service.stopService()

"""Unit tests for imapproxy.ldapdirectory: lookups, caching and failover, no LDAP server.

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
from imapproxy.ldapdirectory import LdapDirectory, LdapPoolService
from imapproxy.ldapentry import BadEntry
from imapproxy.ldapsearch import SearchResult

CFG = LdapConfig(
    uris=("ldap://one", "ldap://two"),
    base="ou=people,dc=example,dc=org",
    host_attribute="mailHost",
    imap_port_attribute="mailImapPort",
    pop3_port_attribute="mailPop3Port",
    login_attribute="mailLoginName",
)
DN = "uid=alice,ou=people,dc=example,dc=org"


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

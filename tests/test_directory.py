"""Tests for imapproxy.directory: the static map, rendezvous hashing and StaticDirectory."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.config import ConfigError
from imapproxy.directory import (
    Route,
    Server,
    StaticDirectory,
    parse_map,
    parse_server,
    parse_servers,
    rendezvous_order,
)
from imapproxy.errors import AuthenticationFailed, UserNotFound

MAP = """\
# Static routing map: PATTERN  HOST[:PORT][,HOST[:PORT]...]
alice@example.org     store1.example.org:1143   # alice is special
*@example.org         store2.example.org,store3.example.org:143
*@v6.example.org      [2001:db8::1]:1143,[::1]:143
*@bare6.example.org   2001:db8::2

   *@shared.example.org   a.example.org,b.example.org,c.example.org
user?@example.net     one.example.net
[ab]*@example.com     bracket.example.com
*                     fallback.example.org
"""


def directory(text: str = MAP) -> StaticDirectory:
    return StaticDirectory(parse_map(text))


# -- map parsing ----------------------------------------------------------------------------


def test_parse_map_with_comments_ports_ipv6_and_several_servers() -> None:
    assert parse_map(MAP) == [
        ("alice@example.org", (Server("store1.example.org", 1143),)),
        ("*@example.org", (Server("store2.example.org"), Server("store3.example.org", 143))),
        ("*@v6.example.org", (Server("2001:db8::1", 1143), Server("::1", 143))),
        ("*@bare6.example.org", (Server("2001:db8::2"),)),
        ("*@shared.example.org", (Server("a.example.org"), Server("b.example.org"),
                                  Server("c.example.org"))),
        ("user?@example.net", (Server("one.example.net"),)),
        ("[ab]*@example.com", (Server("bracket.example.com"),)),
        ("*", (Server("fallback.example.org"),)),
    ]


def test_empty_map() -> None:
    assert parse_map("") == []
    assert parse_map("# only comments\n\n   \n") == []
    with pytest.raises(UserNotFound):
        directory("").lookup("bob", "imap")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("alice\n", "line 1", "expected 'PATTERN"),
        ("ok host\nalice a b\n", "line 2", "expected 'PATTERN"),
        ("alice a, b\n", "line 1", "expected 'PATTERN"),
        ("alice a,,b\n", "line 1", "empty host"),
        ("alice a:0\n", "line 1", "port must be"),
        ("alice a:http\n", "line 1", "port must be"),
        ("alice [::1]\n", "line 1", "[addr]:port"),
        ("\n\n# c\nalice :143\n", "line 4", "missing host"),
    ],
)
def test_map_errors_name_the_file_and_line(text: str, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_map(text, "/etc/imapproxy/users.map")
    assert info.value.path == "/etc/imapproxy/users.map"
    assert info.value.key == line
    assert message in info.value.message
    assert str(info.value).startswith(f"/etc/imapproxy/users.map: {line}: ")


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    path.write_text(MAP, encoding="utf-8")
    assert StaticDirectory.from_file(path).rules == directory().rules


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read map") as info:
        StaticDirectory.from_file(tmp_path / "missing.map")
    assert info.value.path == str(tmp_path / "missing.map")
    bad = tmp_path / "bad.map"
    bad.write_bytes(b"\xff\xfe *\n")
    with pytest.raises(ConfigError, match="cannot read map"):
        StaticDirectory.from_file(bad)
    broken = tmp_path / "broken.map"
    broken.write_text("x\n")
    with pytest.raises(ConfigError) as info:
        StaticDirectory.from_file(broken)
    assert info.value.path == str(broken)
    assert info.value.key == "line 1"


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("host", Server("host")),
        ("  host  ", Server("host")),
        ("host:1143", Server("host", 1143)),
        ("10.0.0.1:143", Server("10.0.0.1", 143)),
        ("[::1]:143", Server("::1", 143)),
        ("::1", Server("::1")),
        ("fe80::1%eth0", Server("fe80::1%eth0")),
    ],
)
def test_parse_server(text: str, server: Server) -> None:
    assert parse_server(text) == server


@pytest.mark.parametrize("text", ["", "  ", "host:", "host:99999", "[::1]", "[::1]:x"])
def test_parse_server_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


def test_parse_servers() -> None:
    assert parse_servers("a,b:2") == (Server("a"), Server("b", 2))
    with pytest.raises(ValueError):
        parse_servers("a,")


@pytest.mark.parametrize(
    ("server", "text"),
    [
        (Server("host"), "host"),
        (Server("host", 143), "host:143"),
        (Server("::1"), "[::1]"),
        (Server("::1", 143), "[::1]:143"),
    ],
)
def test_server_str(server: Server, text: str) -> None:
    assert str(server) == text


def test_server_str_round_trips_through_parse_server_with_a_port() -> None:
    for server in (Server("host", 1), Server("2001:db8::1", 993)):
        assert parse_server(str(server)) == server


# -- lookups --------------------------------------------------------------------------------


def test_first_match_wins() -> None:
    routes = directory()
    assert routes.lookup("alice@example.org", "imap") == Route(
        "alice@example.org", (Server("store1.example.org", 1143),)
    )
    assert set(routes.lookup("bob@example.org", "imap").servers) == {
        Server("store2.example.org"), Server("store3.example.org", 143)
    }
    assert routes.lookup("someone@else.net", "imap").servers == (Server("fallback.example.org"),)


def test_later_rules_do_not_override_earlier_ones() -> None:
    routes = directory("*@example.org a\nalice@example.org b\n")
    assert routes.lookup("alice@example.org", "imap").servers == (Server("a"),)


def test_fnmatch_patterns() -> None:
    routes = directory("user?@example.net one\n[ab]*@example.com two\n*.sub.* three\n")
    assert routes.lookup("user1@example.net", "imap").servers == (Server("one"),)
    assert routes.lookup("anne@example.com", "imap").servers == (Server("two"),)
    assert routes.lookup("x@a.sub.b", "imap").servers == (Server("three"),)
    for name in ("user12@example.net", "carl@example.com", "user@example.net"):
        with pytest.raises(UserNotFound):
            routes.lookup(name, "imap")


def test_matching_ignores_case_but_keeps_the_login() -> None:
    routes = directory("Alice@Example.ORG store1\n")
    route = routes.lookup("ALICE@example.org", "imap")
    assert route.servers == (Server("store1"),)
    assert route.login == "ALICE@example.org"


def test_backend_login_is_used_when_given() -> None:
    route = directory().lookup("alice@example.org", "imap", backend_login="alice")
    assert route.login == "alice"


def test_fnmatch_never_reaches_the_file_system() -> None:
    # fnmatchcase: no os.path.normcase, so "/" and "\\" are ordinary characters.
    routes = directory("a/b one\n")
    assert routes.lookup("a/b", "imap").servers == (Server("one"),)
    with pytest.raises(UserNotFound):
        routes.lookup("a\\b", "imap")


def test_unknown_user_is_an_authentication_failure() -> None:
    routes = directory("*@example.org store\n")
    with pytest.raises(UserNotFound) as info:
        routes.lookup("mallory@evil.example", "imap")
    # Answered exactly like a wrong password: no user enumeration.
    assert isinstance(info.value, AuthenticationFailed)
    assert info.value.imap_code == AuthenticationFailed.imap_code
    assert info.value.client_text() == AuthenticationFailed().client_text()


def test_protocol_does_not_change_the_route() -> None:
    routes = directory()
    assert routes.lookup("x@shared.example.org", "imap") == routes.lookup(
        "x@shared.example.org", "pop3"
    )


# -- rendezvous hashing ---------------------------------------------------------------------

SERVERS = [Server("a.example.org"), Server("b.example.org"), Server("c.example.org")]
USERS = [f"user{i}@example.org" for i in range(3000)]


def first_choice(user: str, servers: list[Server]) -> Server:
    return rendezvous_order(user, servers)[0]


def test_order_is_a_permutation() -> None:
    for user in USERS[:50]:
        order = rendezvous_order(user, SERVERS)
        assert sorted(order, key=str) == sorted(SERVERS, key=str)


def test_order_is_stable_per_user_and_independent_of_listing_order() -> None:
    for user in USERS[:200]:
        order = rendezvous_order(user, SERVERS)
        assert rendezvous_order(user, SERVERS) == order
        assert rendezvous_order(user, list(reversed(SERVERS))) == order
        assert rendezvous_order(user, iter(SERVERS)) == order


def test_order_is_stable_across_processes() -> None:
    # blake2b, not hash(): the same user lands on the same server after a restart and
    # on every proxy in a cluster (PYTHONHASHSEED would otherwise shuffle it).
    assert [str(s) for s in rendezvous_order("alice@example.org", SERVERS)] == [
        str(s) for s in rendezvous_order("alice@example.org", list(SERVERS))
    ]
    code = ("from imapproxy.directory import Server, rendezvous_order;"
            "print([str(s) for s in rendezvous_order('alice@example.org', "
            "[Server('a.example.org'), Server('b.example.org'), Server('c.example.org')])])")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed}, cwd=Path(__file__).parents[1]).stdout
        for seed in ("1", "2")
    }
    assert outputs == {str([str(s) for s in rendezvous_order("alice@example.org", SERVERS)]) + "\n"}


def test_users_are_spread_across_servers() -> None:
    counts = Counter(first_choice(user, SERVERS) for user in USERS)
    assert set(counts) == set(SERVERS)
    for server in SERVERS:
        # 1000 expected each; 3000 fair draws stay well within 800..1200.
        assert 800 <= counts[server] <= 1200, counts


def test_failover_order_is_spread_too() -> None:
    # When a's users fail over, they must not all pile onto the same second server.
    seconds = Counter(
        rendezvous_order(user, SERVERS)[1] for user in USERS
        if first_choice(user, SERVERS) == SERVERS[0]
    )
    assert set(seconds) == {SERVERS[1], SERVERS[2]}
    assert min(seconds.values()) > 0.35 * sum(seconds.values())


def test_adding_a_server_moves_only_a_minority_of_users() -> None:
    new = Server("d.example.org")
    before = {user: first_choice(user, SERVERS) for user in USERS}
    after = {user: first_choice(user, [*SERVERS, new]) for user in USERS}
    moved = [user for user in USERS if before[user] != after[user]]
    # About 1/4 should move, and only to the new server.
    assert 0.18 * len(USERS) < len(moved) < 0.32 * len(USERS)
    assert all(after[user] == new for user in moved)


def test_removing_a_server_moves_only_its_users() -> None:
    before = {user: rendezvous_order(user, SERVERS) for user in USERS}
    remaining = SERVERS[1:]
    for user in USERS:
        after = rendezvous_order(user, remaining)
        # The relative order of the surviving servers does not change.
        assert after == [s for s in before[user] if s != SERVERS[0]]


def test_ports_are_part_of_the_identity() -> None:
    same_host = [Server("store", 143), Server("store", 1143)]
    counts = Counter(first_choice(user, same_host) for user in USERS[:1000])
    assert len(counts) == 2


def test_static_lookup_uses_the_rendezvous_order_of_the_lowercased_name() -> None:
    routes = directory("*@shared.example.org a.example.org,b.example.org,c.example.org\n")
    for user in ("Bob@Shared.Example.org", "carol@shared.example.org"):
        assert list(routes.lookup(user, "imap").servers) == rendezvous_order(user.lower(), SERVERS)
    firsts = Counter(routes.lookup(f"u{i}@shared.example.org", "imap").servers[0]
                     for i in range(600))
    assert len(firsts) == 3


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=6,
                                      unique=True))
def test_rendezvous_any_key(key: str, hosts: list[str]) -> None:
    servers = [Server(h) for h in hosts]
    order = rendezvous_order(key, servers)
    assert len(order) == len(servers)
    assert set(order) == set(servers)
    assert rendezvous_order(key, list(reversed(servers))) == order

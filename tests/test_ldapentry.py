"""Tests for imapproxy.ldapentry: search results -> Entry -> Route, no LDAP server."""

from __future__ import annotations

import pytest

from imapproxy.config import LdapConfig
from imapproxy.directory import Route, Server, rendezvous_order
from imapproxy.errors import UserNotFound
from imapproxy.ldapentry import BadEntry, Entry, parse_entry, route_for, select_entry

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

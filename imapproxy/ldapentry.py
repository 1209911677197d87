# -*- test-case-name: tests.test_ldapentry -*-
"""What an LDAP search found, read as a route: entries -> ``Entry`` -> ``Route``.

Pure: the raw attributes of the entries a search returned (attribute name -> list of
values, as ldap3 gives them in ``raw_attributes``) go in, and a ``Route`` or an error
comes out; nothing here talks to a server or imports Twisted.

What Perdition's LDAP map got wrong, and what this module does instead (see
shared/reference/perdition.md): a search matching several entries is a refused
login (``BadEntry``), not a crash and not a guess; a value that cannot be read makes
the whole entry unusable, so a typo in the directory shows in the log rather than as
a half-working route.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import LdapConfig
from .directory import Route, Server, parse_server, rendezvous_order
from .errors import UserNotFound

#: Two entries are enough to know a search is ambiguous; asking for no more also
#: bounds what a hostile filter value could pull out of the directory.
SIZE_LIMIT = 2

Attributes = Mapping[str, Sequence[bytes]]
RawEntry = tuple[str, Attributes]


class BadEntry(UserNotFound):
    """The directory answered, but not with exactly one usable entry for the user.

    The client sees the same answer as for an unknown user; the operator sees the
    reason in the log, because this is a data problem worth fixing.
    """


@dataclass(frozen=True, slots=True)
class Entry:
    """What the directory says about one user, before the protocol is known."""

    dn: str
    servers: tuple[Server, ...]
    imap_port: int | None = None
    pop3_port: int | None = None
    managesieve_port: int | None = None
    #: the login name the entry gives for the backend (login_attribute), if any
    login: str | None = None


def _values(attributes: Attributes, name: str) -> list[bytes]:
    # Attribute descriptions are case-insensitive (RFC 4512 section 2.5), and the
    # server answers with the schema's spelling, not necessarily the config's.
    wanted = name.lower()
    return [v for key, values in attributes.items() if key.lower() == wanted for v in values]


def _text(dn: str, name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEntry(f"{dn}: {name} is not UTF-8") from None


def _single(dn: str, attributes: Attributes, name: str) -> str | None:
    if not name:
        return None
    values = _values(attributes, name)
    if not values:
        return None
    if len(values) > 1:
        raise BadEntry(f"{dn}: {name} has {len(values)} values, expected one")
    return _text(dn, name, values[0]).strip()


def _port(dn: str, attributes: Attributes, name: str) -> int | None:
    text = _single(dn, attributes, name)
    if text is None:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadEntry(f"{dn}: {name} {text!r} is not a port number")
    return int(text)


def parse_entry(dn: str, attributes: Attributes, cfg: LdapConfig) -> Entry:
    """Map one entry's raw attributes to an Entry; raises BadEntry.

    Strict on purpose: a value we cannot read makes the whole entry unusable, so a
    typo in the directory shows up in the log rather than as a half-working route.
    """
    hosts = _values(attributes, cfg.host_attribute)
    if not hosts:
        raise BadEntry(f"{dn}: no {cfg.host_attribute}")
    servers: list[Server] = []
    for raw in hosts:
        text = _text(dn, cfg.host_attribute, raw)
        try:
            server = parse_server(text)
        except ValueError as e:
            raise BadEntry(f"{dn}: {cfg.host_attribute} {text!r}: {e}") from None
        if server not in servers:
            servers.append(server)
    login = _single(dn, attributes, cfg.login_attribute)
    if login == "":
        raise BadEntry(f"{dn}: {cfg.login_attribute} is empty")
    return Entry(
        dn=dn,
        servers=tuple(servers),
        imap_port=_port(dn, attributes, cfg.imap_port_attribute),
        pop3_port=_port(dn, attributes, cfg.pop3_port_attribute),
        managesieve_port=_port(dn, attributes, cfg.managesieve_port_attribute),
        login=login,
    )


def select_entry(user: str, entries: Sequence[RawEntry]) -> RawEntry:
    """The one entry a search found; raises UserNotFound or BadEntry (ambiguous)."""
    if not entries:
        raise UserNotFound(f"no entry for {user!r}")
    if len(entries) > 1:
        # Never a guess: Perdition meant to take the first and crashed instead.
        dns = ", ".join(dn for dn, _ in entries[:SIZE_LIMIT])
        raise BadEntry(f"search for {user!r} matched several entries ({dns}, ...)")
    return entries[0]


def route_for(entry: Entry, protocol: str, login: str) -> Route:
    """The route for one protocol: port attribute, else host's port, else [backend]'s.

    Equivalent servers are ordered by rendezvous hashing on the entry's DN rather
    than on the login name: a user who logs in as "alice" from one device and as
    "alice@example.org" from another (a filter matching uid or mail) reaches the
    same entry, so all of that mailbox's sessions land on the same server.
    """
    if protocol == "imap":
        port = entry.imap_port
    elif protocol == "pop3":
        port = entry.pop3_port
    elif protocol == "managesieve":
        port = entry.managesieve_port
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    servers = entry.servers
    if port is not None:
        servers = tuple(dict.fromkeys(Server(s.host, port) for s in servers))
    ordered = rendezvous_order(entry.dn.lower(), servers)
    return Route(entry.login or login, tuple(ordered))

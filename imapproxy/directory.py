"""Where a user's mailbox lives: routes, the Directory interface and the static map.

The static map is the embedded default: lines ``PATTERN  HOST[:PORT][,HOST[:PORT]...]``,
fnmatch patterns, first match wins, ``#`` starts a comment. Several hosts mean equivalent
servers over shared storage; each user is pinned to one of them by rendezvous hashing.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError, parse_address
from .errors import UserNotFound


@dataclass(frozen=True, slots=True)
class Server:
    """One backend server; port None means the protocol's default from [backend]."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """The answer of a lookup: whom to log in as, and where (in preference order)."""

    login: str
    servers: tuple[Server, ...]


class Directory(Protocol):
    """Looks up a user's route. May return a Route or a Deferred firing with one.

    Raises (or fails with) UserNotFound when there is no route, DirectoryUnavailable
    when the directory cannot be asked. ``username`` is the rewritten lookup name;
    the route's login is the directory's own login name if it has one, else
    ``backend_login``, else ``username``.
    """

    def lookup(self, username: str, protocol: str, backend_login: str | None = None) -> Any: ...


def parse_server(text: str) -> Server:
    """Parse "host", "host:port" or "[v6]:port"; raises ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("[") or text.count(":") == 1:
        host, port = parse_address(text)
        return Server(host, port)
    if text.count(":") > 1:  # a bare IPv6 address without port
        return Server(text)
    return Server(text)


def parse_servers(text: str) -> tuple[Server, ...]:
    """Parse a comma-separated server list."""
    return tuple(parse_server(part) for part in text.split(","))


def rendezvous_order(key: str, servers: Iterable[Server]) -> list[Server]:
    """Order servers by highest random weight for this key (rendezvous hashing).

    The first server is stable for a user, and adding a server only moves the users
    that now rank it first; the rest of the order is the failover sequence.
    """
    def weight(server: Server) -> bytes:
        return hashlib.blake2b(f"{key}\x00{server}".encode(), digest_size=8).digest()

    return sorted(servers, key=weight, reverse=True)


class StaticDirectory:
    """Routes from a map file held in memory."""

    def __init__(self, rules: Sequence[tuple[str, tuple[Server, ...]]]) -> None:
        self.rules = [(pattern.lower(), servers) for pattern, servers in rules]

    @classmethod
    def from_file(cls, path: Path) -> StaticDirectory:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(path, "", f"cannot read map: {e}") from None
        return cls(parse_map(text, path))

    def lookup(self, username: str, protocol: str, backend_login: str | None = None) -> Route:
        name = username.lower()
        for pattern, servers in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return Route(backend_login or username, tuple(rendezvous_order(name, servers)))
        raise UserNotFound()


def parse_map(text: str, path: Path | str = "<map>") -> list[tuple[str, tuple[Server, ...]]]:
    """Parse map lines; errors name the file and the line."""
    rules = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(path, f"line {number}", "expected 'PATTERN  HOST[:PORT][,HOST...]'")
        try:
            servers = parse_servers(fields[1])
        except ValueError as e:
            raise ConfigError(path, f"line {number}", str(e)) from None
        rules.append((fields[0], servers))
    return rules

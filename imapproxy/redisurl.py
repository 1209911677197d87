# -*- test-case-name: tests.test_redisurl -*-
"""Redis URLs as operators write them in ``[shared] redis``, parsed once at start-up.

``parse_redis_url`` turns the text into a ``RedisUrl`` (scheme, host, port or socket
path, database number, user and password), or raises ValueError with a reason an
operator can act on. The reason never holds the password; ``redact`` masks it in the
URL itself for messages. Pure: no Twisted, no redis-py (redisstate.py builds the
client from the parsed value, so the config's check is the one parse).

Accepted forms (those of redis-py's ``from_url`` and of ``redis-cli -u``):

- ``redis://host``, ``redis://host:port``, ``redis://host:port/DB``: TCP; the port
  defaults to 6379 and the database to 0. The host is a DNS name, an IPv4 address or
  an IPv6 address in brackets.
- ``rediss://...``: the same over TLS (certificate and host name verified).
- ``redis://:PASSWORD@host`` (Redis' requirepass) and ``redis://USER:PASSWORD@host``
  (ACL users, Redis 6), percent-encoded; or the password in ``[shared] password_file``.
- ``unix:///path/to/redis.sock`` and ``unix:///path/to/redis.sock?db=DB``.

Refused, each with its reason: other schemes, an empty host, bad ports and database
numbers, whitespace and non-ASCII, query parameters other than a socket's ``db``, and
fragments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from .credentials import Secret

DEFAULT_PORT = 6379
#: Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
#: Redis' own limit is the "databases" setting (16 by default); any number it may be
#: configured with fits here.
MAX_DB = 1_000_000

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_DIGITS = re.compile(r"[0-9]+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """One parsed Redis URL; ``str()`` gives it with the password masked."""

    #: "redis", "rediss" (TLS) or "unix"
    scheme: str
    #: DNS name, IPv4 address, or IPv6 address without brackets; "" for unix
    host: str = ""
    port: int = DEFAULT_PORT
    #: the socket path, for unix only
    socket_path: str = ""
    db: int = 0
    #: an ACL user name (Redis 6), "" for the default user
    username: str = ""
    password: Secret | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.password is not None and self.username \
            else ":***@" if self.password is not None else ""
        if self.scheme == "unix":
            query = f"?db={self.db}" if self.db else ""
            return f"unix://{user}{self.socket_path}{query}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}"


def redact(text: str) -> str:
    """``text`` with any user information (``user:password@``) masked, for messages."""
    scheme, sep, rest = text.partition("://")
    end = min((i for i in (rest.find("/", 1 if scheme == "unix" else 0), rest.find("?"),
                            rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end if scheme != "unix" else len(rest))
    if not sep or at < 0:
        return text
    return f"{scheme}://***@{rest[at + 1:]}"


def parse_redis_url(text: str) -> RedisUrl:
    """Parse a Redis URL; raises ValueError (and nothing else) saying what is wrong."""
    if not text:
        raise ValueError("is empty")
    if not text.isascii() or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("contains whitespace, a control or a non-ASCII character; "
                         "percent-encode it")
    if _BAD_PERCENT.search(text):
        raise ValueError("has a % not followed by two hex digits")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected redis://host[:port][/db], rediss://... (TLS) or "
                         "unix:///path/to/redis.sock")
    if "#" in rest:
        raise ValueError("has a fragment (#...); percent-encode a # in a password as %23")
    if scheme == "unix":
        return _unix(rest)
    rest, question, _query = rest.partition("?")
    if question:
        raise ValueError("takes no ?parameters: the timeout and the rest are keys of [shared]")
    authority, slash, path = rest.partition("/")
    username, password, hostport = _userinfo(authority)
    host, port = _host_port(hostport)
    db = _db(path) if slash and path else 0
    return RedisUrl(scheme, host, port, "", db, username, password)


def _userinfo(authority: str) -> tuple[str, Secret | None, str]:
    at = authority.rfind("@")
    if at < 0:
        return "", None, authority
    userinfo, hostport = authority[:at], authority[at + 1:]
    user, colon, password = userinfo.partition(":")
    if not colon:
        # redis://secret@host: redis-py takes the lone part as the password; say so
        # rather than guess, and never repeat it.
        raise ValueError("has user information without a colon; write the password as "
                         "redis://:PASSWORD@host (or USER:PASSWORD@ for an ACL user)")
    if not password:
        raise ValueError("has an empty password after the colon")
    return unquote(user), Secret(unquote(password).encode("utf-8")), hostport


def _host_port(hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError("IPv6 addresses are written [addr] or [addr]:port")
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise ValueError(f"[{host}] is not an IPv6 address")
        port_text = after[1:] if after else ""
    else:
        host, _colon, port_text = hostport.partition(":")
        if ":" in port_text:
            raise ValueError("IPv6 addresses are written in brackets: redis://[::1]:6379")
        if not host:
            raise ValueError("has no host (redis://HOST:PORT/DB)")
        host = unquote(host)
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name or an IP address")
        host = host.lower()
    if not port_text:
        return host, DEFAULT_PORT
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > MAX_DB:
        raise ValueError(f"the database must be a number (redis://host:port/DB), "
                         f"not {text[:20]!r}")
    return int(text)


def _unix(rest: str) -> RedisUrl:
    path, _question, query = rest.partition("?")
    username, password = "", None
    if "@" in path:
        username, password, path = _userinfo(path)
    path = unquote(path)
    if not path.startswith("/"):
        raise ValueError("the socket path must be absolute: unix:///path/to/redis.sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"the socket path is longer than {MAX_SOCKET_PATH} bytes")
    db = 0
    if query:
        name, equals, value = query.partition("=")
        if name != "db" or not equals or "&" in value:
            raise ValueError("a socket URL takes one parameter, ?db=DB")
        db = _db(value)
    return RedisUrl("unix", "", DEFAULT_PORT, path, db, username, password)

"""Configuration: one frozen dataclass tree loaded from TOML and validated at start-up.

Every error names the file and the dotted key, so an operator can fix it from one line.
No Twisted import here: the config is plain data passed down to whoever needs it.

Each key is a dataclass field of the same name, and its default and rules (bounds,
choices) are written once, on that field (``_key``): the loaders read them from there, so
a plain section is read by one generic call (``_section``) and the others only add their
checks that span keys.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from .credentials import Secret
from .ldapurl import parse_ldap_uri, redact, same_dn
from .redisurl import RedisUrl, parse_redis_url
from .redisurl import redact as redact_redis
from .sasl import DEFAULT_MECHANISMS, MECHANISMS

T = TypeVar("T")

PROTOCOLS = ("imap", "pop3", "managesieve")
TLS_MODES = ("none", "starttls", "implicit")
#: "id": IMAP ID x-originating-ip... (Dovecot login_trusted_networks) and POP3 XCLIENT;
#: "proxy-v2": a PROXY protocol v2 header before anything else; "none": nothing
FORWARD_CLIENT = ("id", "proxy-v2", "none")
LOG_FORMATS = ("text", "json")
SYSLOG_FACILITIES = ("mail", "daemon", "user", "local0", "local1", "local2", "local3",
                     "local4", "local5", "local6", "local7")
LDAP_SCOPES = ("base", "one", "sub")

#: What a field's metadata may say about its key, besides its type (see _read): bounds for
#: numbers (a number's minimum is 0 unless given), the strings allowed, that a string must
#: not be empty, or a kind read by its own function (a list of CIDR networks, [[tls.sni]]).
_RULES = frozenset({"minimum", "maximum", "choices", "required", "kind"})


def _key(default: T, **rules: Any) -> T:
    """A field whose key has rules besides its type, e.g. ``_key(8192, minimum=512)``."""
    unknown = set(rules) - _RULES
    if unknown:
        raise TypeError(f"unknown config rule: {', '.join(sorted(unknown))}")
    return field(default=default, metadata=rules)


class ConfigError(Exception):
    """A config problem, rendered as one line: FILE: KEY: what is wrong."""

    def __init__(self, path: Path | str, key: str, message: str) -> None:
        self.path = str(path)
        self.key = key
        self.message = message
        super().__init__(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")


@dataclass(frozen=True)
class Listener:
    # No defaults for the first four: a Listener is always whole. The "imap" and
    # "starttls" that absent protocol and tls keys mean are written in _listener only.
    protocol: str
    host: str
    port: int
    tls: str
    #: expect a PROXY protocol v1/v2 header first (from [proxy_protocol] trusted peers only)
    proxy_protocol: bool = False


@dataclass(frozen=True)
class SniCertificate:
    """One [[tls.sni]] table: the certificate shown to clients asking for ``domain``."""

    #: a host name, or "*.example.org" for any one label below example.org
    domain: str
    certificate: Path
    key: Path


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path | None = None
    key: Path | None = None
    plaintext_auth: bool = False
    min_version: str = _key("1.2", choices=("1.2", "1.3"))
    #: OpenSSL cipher string for TLS 1.2; "" keeps Twisted's default (forward-secret
    #: AEAD suites first, no RC4/3DES/MD5/anonymous). TLS 1.3 suites are OpenSSL's.
    ciphers: str = ""
    #: certificates chosen by SNI; a client naming no listed domain gets the default one
    sni: tuple[SniCertificate, ...] = _key((), kind="sni")


@dataclass(frozen=True)
class AuthConfig:
    """What the proxy lets clients log in with, besides IMAP LOGIN and POP3 USER/PASS."""

    #: SASL mechanisms advertised (CAPABILITY AUTH=..., CAPA SASL ..., ManageSieve's
    #: "SASL" line) and accepted in AUTHENTICATE / AUTH; "OAUTHBEARER" and "XOAUTH2" pass
    #: the client's token through to the backend, which must accept them (sasl.py)
    mechanisms: tuple[str, ...] = _key(DEFAULT_MECHANISMS, kind="mechanisms")


@dataclass(frozen=True)
class UsernameConfig:
    """Username rewriting, in the manner of Perdition's strip/add/lower-case options."""

    domain_delimiter: str = "@"
    lowercase: bool = False
    default_domain: str = ""
    strip_domain_for_lookup: bool = False
    strip_domain_for_backend: bool = False


@dataclass(frozen=True)
class LdapConfig:
    uris: tuple[str, ...] = ("ldap://127.0.0.1:389",)
    #: required, unless the URIs carry it (_ldap_uris_and_base)
    base: str = ""
    scope: str = _key("sub", choices=LDAP_SCOPES)
    filter: str = "(uid={user})"
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    starttls: bool = False
    ca_file: Path | None = None
    host_attribute: str = _key("mailHost", required=True)
    imap_port_attribute: str = ""
    pop3_port_attribute: str = ""
    #: optional; without it ManageSieve goes to the host's port or [backend]'s
    managesieve_port_attribute: str = ""
    login_attribute: str = ""
    timeout: float = _key(5.0, minimum=0.1)
    pool_size: int = _key(4, minimum=1, maximum=64)


@dataclass(frozen=True)
class CacheConfig:
    positive_ttl: float = 300.0
    negative_ttl: float = 30.0
    stale_ttl: float = 3600.0
    max_entries: int = 100_000


@dataclass(frozen=True)
class DirectoryConfig:
    type: str = _key("static", choices=("static", "ldap"))
    map: Path | None = None
    ldap: LdapConfig | None = None
    cache: CacheConfig = CacheConfig()


@dataclass(frozen=True)
class BackendConfig:
    imap_port: int = _key(143, minimum=1, maximum=65535)
    pop3_port: int = _key(110, minimum=1, maximum=65535)
    #: RFC 5804 section 1.8: ManageSieve's registered port
    managesieve_port: int = _key(4190, minimum=1, maximum=65535)
    tls: str = _key("none", choices=TLS_MODES)
    ca_file: Path | None = None
    connect_timeout: float = _key(10.0, minimum=0.1)
    login_timeout: float = _key(30.0, minimum=0.1)
    #: seconds a backend that failed to connect is skipped (circuit breaker)
    down_cooldown: float = 30.0
    #: explicit and loud: only for labs; certificates are verified otherwise
    insecure_skip_verify: bool = False
    #: a certificate (with its chain) and key the proxy shows to backends asking for one
    client_certificate: Path | None = None
    client_key: Path | None = None
    #: how the backend learns the client's address: see FORWARD_CLIENT
    forward_client: str = _key("id", choices=FORWARD_CLIENT)


@dataclass(frozen=True)
class Limits:
    #: RFC 3501 gives no limit (RFC 7162 section 4 suggests accepting at least 8000
    #: octets); 8 KiB is far above any real pre-auth command.
    max_line: int = _key(8192, minimum=512)
    #: A LOGIN literal holds a name or a password; 64 KiB is generous.
    max_preauth_literal: int = _key(65536, minimum=256)
    preauth_timeout: float = _key(60.0, minimum=1.0)
    max_bad_commands: int = _key(10, minimum=1)
    max_failed_logins: int = _key(5, minimum=1)
    #: concurrent client connections of this process; 0 = automatic: (RLIMIT_NOFILE - 64)
    #: / 2, as each session holds two descriptors (client and backend)
    max_connections: int = 0
    #: per client address, IPv6 per /64: generous, as carriers put thousands of phones
    #: behind one IPv4 address (CGNAT); 0 = off
    max_connections_per_ip: int = 2000
    #: IPv6 clients are counted per network of this prefix length (RFC 6177: a /64 or
    #: more per subscriber)
    ipv6_prefix: int = _key(64, minimum=1, maximum=128)
    #: logged-in sessions per user from one client address (Dovecot's
    #: mail_max_userip_connections is 10 and counts per protocol); 0 = off
    max_connections_per_user_ip: int = 20
    #: the brute-force penalty (penalty.py), paid before the password is checked: an
    #: address (or, from addresses it has not used lately, a user) with recent failures
    #: waits this long before its next check, doubling per distinct failure (2, 4, 8,
    #: 15 s); also the least time before a failed login is answered; 0 = off
    login_delay: float = 2.0
    #: the penalty's cap (Dovecot's anvil caps at 15 s too)
    login_delay_max: float = 15.0
    #: seconds a failed login is remembered for the penalty
    login_failure_memory: float = 900.0
    #: CIDR networks never penalised nor counted (webmail hosts, other trusted callers)
    penalty_exempt: tuple[str, ...] = _key((), kind="networks")
    #: logins checked at once from one address without recent failures (a penalised
    #: address: one at a time); more wait their turn
    max_parallel_logins_per_ip: int = _key(32, minimum=1)
    #: seconds an address stays "known" for a user after a successful login there: from
    #: a known address the user penalty does not apply (the owner is never locked out)
    known_address_memory: float = 30 * 86400.0
    #: longest username in bytes (RFC 5321: 64 + 1 + 255); longer is a failed login
    max_username: int = _key(320, minimum=1, maximum=65536)
    #: admission pacing (pacing.py): logins let through per second by this process (with
    #: workers = N, by each worker), after the penalty and before the directory and the
    #: backend see them, so that a reconnect storm is served at the rate they take; the
    #: rest wait their turn; 0 = unlimited
    max_login_rate: float = 0.0
    #: logins waiting for their turn at most; more are refused at once (NO [UNAVAILABLE],
    #: -ERR [SYS/TEMP]); 0 = automatic: what max_login_rate lets through in half of
    #: preauth_timeout (the other half is for the TLS handshake and the login itself)
    max_login_queue: int = 0


@dataclass(frozen=True)
class Timeouts:
    #: RFC 3501 section 5.4: at least 30 minutes for an authenticated session.
    authenticated: float = _key(1860.0, minimum=1800.0)
    #: RFC 2177: clients re-issue IDLE every 29 minutes, so 31 leaves a margin.
    idle: float = _key(1860.0, minimum=60.0)
    #: seconds between "* OK Still here" lines to an idling client; 0 = off. Mobile
    #: NATs drop silent flows after a few minutes; Dovecot itself sends one every 2.
    idle_keepalive: float = 0.0
    #: how often the one timer of all relayed sessions runs (timeouts, keepalives)
    sweep_interval: float = _key(15.0, minimum=0.1)
    #: seconds a graceful drain (SIGTERM) waits for sessions before closing them
    drain: float = 30.0
    #: seconds between SIGTERM and the drain, while /readyz answers 503 and sessions go
    #: on, new ones included: a load balancer's health check takes the instance out of
    #: its pool before the drain sends its sessions back through it. 0: drain at once.
    drain_notice: float = _key(0.0, minimum=0.0)
    #: TCP keepalive on both legs: idle seconds, probe interval, probe count
    tcp_keepalive_idle: int = _key(300, minimum=1)
    tcp_keepalive_interval: int = _key(60, minimum=1)
    tcp_keepalive_count: int = _key(5, minimum=1)


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: GET /metrics in the Prometheus text format on this address."""

    host: str
    port: int


@dataclass(frozen=True)
class AdminConfig:
    """[admin]: the local-only admin API, on loopback "host:port" or a UNIX socket path."""

    address: str
    host: str = ""
    port: int = 0
    #: set for a UNIX socket ("/run/imapproxy/admin.sock"); host and port are unused then
    socket: Path | None = None
    #: [admin] token_file: required with a TCP address, optional with a socket
    token_file: Path | None = None
    #: the bearer token read from it, which every request must carry (admin.py)
    token: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ProxyProtocolConfig:
    """[proxy_protocol]: who may put a PROXY header in front of a connection."""

    #: CIDR networks of the load balancers; headers from anywhere else: connection closed
    trusted: tuple[str, ...] = _key(("127.0.0.1/32", "::1/128"), kind="networks")
    #: seconds a trusted peer has to send its header
    timeout: float = _key(10.0, minimum=0.1)


@dataclass(frozen=True)
class SharedConfig:
    """[shared]: the brute-force penalty and the per-user+address session counts shared
    by several proxy instances (and workers) through Redis (redisstate.py)."""

    #: "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]", "rediss://..." (TLS) or
    #: "unix:///path/to/redis.sock[?db=DB]"; "" = off: each process counts alone
    redis: str = field(default="", repr=False)
    #: seconds a login waits on Redis at most; past it, that login counts locally
    timeout: float = _key(0.25, minimum=0.01)
    #: a file (mode 0600) holding the secret the keyed hashes of user names are made
    #: with, the same on every instance; without it a random one is kept in Redis
    key_file: Path | None = None
    #: the Redis password, instead of in the URL
    password_file: Path | None = None
    #: CA bundle for rediss:// (system CAs without it)
    ca_file: Path | None = None
    #: put before every key name: several proxy clusters may share one database
    prefix: str = _key("imapproxy:", required=True)
    #: the parsed URL, None when off
    url: RedisUrl | None = field(default=None, repr=False)
    #: the secret read from key_file
    key: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LogConfig:
    """[log]: where twisted.logger events go besides twistd's own log."""

    #: "text": twistd's lines; "json": one JSON object per line instead
    format: str = _key("text", choices=LOG_FORMATS)
    #: "info", or "debug" for the proxy's own per-connection detail (twistd has no
    #: level filter of its own, so debug events are only made when asked for)
    level: str = _key("info", choices=("info", "debug"))
    #: also send every event to syslog
    syslog: bool = False
    #: a UNIX datagram socket path, or "host:port" for UDP
    syslog_address: str = "/dev/log"
    syslog_facility: str = _key("mail", choices=SYSLOG_FACILITIES)


@dataclass(frozen=True)
class Config:
    path: Path
    listeners: tuple[Listener, ...]
    tls: TlsConfig
    directory: DirectoryConfig
    backend: BackendConfig
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    username: UsernameConfig = UsernameConfig()
    auth: AuthConfig = AuthConfig()
    workers: int = _key(1, minimum=1, maximum=256)
    metrics: MetricsConfig | None = None
    admin: AdminConfig | None = None
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    log: LogConfig = LogConfig()
    shared: SharedConfig = SharedConfig()


class _Table:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, path: Path, prefix: str, data: Any) -> None:
        self.path = path
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, "must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), message)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a port of `true` is a mistake, not 1.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
        return value  # type: ignore[return-value]

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = float(self.get(name, (int, float), default))
        if not math.isfinite(value):
            raise self.error(name, "must be a finite number")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum:g}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.get(name, int, default)
        if value < minimum or (maximum is not None and value > maximum):
            limit = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(name, f"must be {limit}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(repr(c) for c in choices)}")
        return value

    def file(self, name: str, required: bool = False) -> Path | None:
        value = self.get(name, str, "")
        if not value:
            if required:
                raise self.error(name, "is required")
            return None
        if "\x00" in value:
            raise self.error(name, "must not contain NUL")
        resolved = (self.path.parent / value).resolve()
        if not resolved.is_file():
            raise self.error(name, f"file not found: {resolved}")
        return resolved

    def table(self, name: str) -> _Table | None:
        self.used.add(name)
        if name not in self.data:
            return None
        return _Table(self.path, self.key(name), self.data[name])

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


S = TypeVar("S")


@functools.cache
def _fields_of(cls: Any) -> dict[str, tuple[Any, Any, Any]]:
    """Field name -> (type, default, rules) of a config dataclass, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f.default, f.metadata) for f in fields(cls)}


def _read(table: _Table, cls: type, name: str) -> Any:
    """The key ``name`` of ``table``, read as the field ``name`` of ``cls`` says: its
    type, its default and its rules (_key)."""
    hint, default, rules = _fields_of(cls)[name]
    if "kind" in rules:
        return _KINDS[rules["kind"]](table, name, default)
    if "choices" in rules:
        return table.choice(name, rules["choices"], default)
    if hint is int:
        return table.integer(name, default, rules.get("minimum", 0), rules.get("maximum"))
    if hint is float:
        return table.number(name, default, rules.get("minimum", 0.0))
    if hint == Path | None:
        return table.file(name, required=rules.get("required", False))
    if hint is bool or hint is str:
        value = table.get(name, hint, default)
        if rules.get("required") and not value:
            raise table.error(name, "is required")
        return value
    raise TypeError(f"{cls.__name__}.{name}: no way to read a {hint}")


def _build(cls: type[S], table: _Table, **given: Any) -> S:
    """A ``cls`` from ``table``: the fields in ``given`` as given (the caller read and
    checked them), every other one read from its key, in field order."""
    names: Any = cls  # a class is hashable, whatever typeshed's type[S] says
    return cls(**{name: given[name] if name in given else _read(table, cls, name)
                  for name in _fields_of(names)})


def _section(cls: type[S], table: _Table | None) -> S:
    """A section whose keys are checked one by one (no rule spans two): all defaults when
    the table is absent."""
    if table is None:
        return cls()
    config = _build(cls, table)
    table.finish()
    return config


def parse_address(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; raises ValueError with a reason."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("IPv6 addresses are written [addr]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected host:port (IPv6 as [addr]:port)")
    if not host:
        raise ValueError("missing host")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(port_text)


def authority(host: str, port: int) -> str:
    """The Host header (RFC 9110 section 7.2) for a listener on ``host``:``port``."""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}".lower()


def _listener(table: _Table) -> Listener:
    protocol = table.choice("protocol", PROTOCOLS, "imap")
    address = table.get("address", str, "")
    if not address:
        raise table.error("address", "is required")
    try:
        host, port = parse_address(address)
    except ValueError as e:
        raise table.error("address", str(e)) from None
    tls = table.choice("tls", TLS_MODES, "starttls")
    proxy_protocol = _read(table, Listener, "proxy_protocol")
    table.finish()
    return Listener(protocol, host, port, tls, proxy_protocol)


def _tls(table: _Table | None) -> TlsConfig:
    if table is None:
        return TlsConfig()
    config = _build(TlsConfig, table)
    table.finish()
    if (config.certificate is None) != (config.key is None):
        missing = "key" if config.key is None else "certificate"
        raise table.error(missing, "certificate and key go together")
    if config.sni and config.certificate is None:
        raise table.error("certificate", "[[tls.sni]] needs a default certificate and key")
    domains = [entry.domain for entry in config.sni]
    for i, domain in enumerate(domains):
        if domain in domains[:i]:
            raise ConfigError(table.path, f"{table.key('sni')}[{i}].domain",
                              f"{domain!r} is listed twice")
    return config


def _sni_list(table: _Table, name: str, default: tuple[SniCertificate, ...]
              ) -> tuple[SniCertificate, ...]:
    """The [[tls.sni]] tables."""
    return tuple(_sni(_Table(table.path, f"{table.key(name)}[{i}]", item))
                 for i, item in enumerate(table.get(name, list, list(default))))


def _sni(table: _Table) -> SniCertificate:
    domain = table.get("domain", str, "").strip().lower().rstrip(".")
    labels = domain.split(".")
    wildcard = labels[0] == "*"
    if (not domain or "*" in ".".join(labels[1:] if wildcard else labels)
            or (wildcard and len(labels) < 3) or not all(labels)):
        raise table.error("domain", 'must be a host name, or "*.example.org"')
    cert = table.file("certificate", required=True)
    key = table.file("key", required=True)
    table.finish()
    assert cert is not None and key is not None
    return SniCertificate(domain, cert, key)


def _ldap_uris_and_base(table: _Table) -> tuple[list[str], str]:
    """The URIs, each checked (kept as written: they name the servers in logs), and
    the search base: the ``base`` key, else the DN part the URIs agree on."""
    uris = table.get("uris", list, list(LdapConfig.uris))
    if not uris:
        raise table.error("uris", "must be a non-empty list of LDAP URIs")
    dns: list[tuple[int, str]] = []
    for i, text in enumerate(uris):
        if not isinstance(text, str):
            raise table.error(f"uris[{i}]", f"expected a string, got {type(text).__name__}")
        try:
            uri = parse_ldap_uri(text)
        except ValueError as e:
            raise table.error(f"uris[{i}]", f"{redact(text)!r} {e}") from None
        if uri.dn:
            dns.append((i, uri.dn))
    base = _read(table, LdapConfig, "base")
    if not base and not dns:
        raise table.error("base", "is required (or give it as the DN part of the URIs, "
                                  "as in ldap://ldap.example.org/ou=people,dc=example,dc=org)")
    # One search base serves every URI (they are the same directory, tried in turn).
    source = "base is"
    if not base:
        first, base = dns[0]
        source = f"uris[{first}] has"
    for i, dn in dns:
        if not same_dn(dn, base):
            raise table.error(f"uris[{i}]", f"has DN part {dn!r}, but {source} {base!r}; "
                                            "give the search base once")
    return uris, base


def _ldap(table: _Table) -> LdapConfig:
    uris, base = _ldap_uris_and_base(table)
    scope = _read(table, LdapConfig, "scope")
    search_filter = _read(table, LdapConfig, "filter")
    if not (search_filter.startswith("(") and search_filter.endswith(")")):
        raise table.error("filter", "must be an LDAP filter in parentheses")
    try:
        search_filter.format(user="u", local="l", domain="d")
    except (KeyError, IndexError, ValueError) as e:
        raise table.error("filter",
                          f"only {{user}}, {{local}} and {{domain}} may be used ({e})") from None
    bind_dn = _read(table, LdapConfig, "bind_dn")
    password = _read(table, LdapConfig, "bind_password")
    password_file = table.file("bind_password_file")
    if password and password_file:
        raise table.error("bind_password_file", "give bind_password or bind_password_file")
    if password_file:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise table.error("bind_password_file", f"cannot read: {e}") from None
    config = _build(LdapConfig, table, uris=tuple(uris), base=base, scope=scope,
                    filter=search_filter, bind_dn=bind_dn, bind_password=password)
    table.finish()
    return config


def _directory(table: _Table | None, path: Path) -> DirectoryConfig:
    if table is None:
        raise ConfigError(path, "directory", "is required")
    kind = _read(table, DirectoryConfig, "type")
    map_path = table.file("map", required=(kind == "static"))
    ldap_table = table.table("ldap")
    if kind == "ldap" and ldap_table is None:
        raise table.error("ldap", 'is required when type = "ldap"')
    ldap = _ldap(ldap_table) if ldap_table is not None else None
    cache = _section(CacheConfig, table.table("cache"))
    table.finish()
    return DirectoryConfig(kind, map_path, ldap, cache)


def _backend(table: _Table | None) -> BackendConfig:
    if table is None:
        return BackendConfig()
    if ("client_certificate" in table.data) != ("client_key" in table.data):
        missing = "client_key" if "client_certificate" in table.data else "client_certificate"
        raise table.error(missing, "client_certificate and client_key go together")
    config = _build(BackendConfig, table)
    table.finish()
    return config


def _networks(table: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of CIDR networks ("192.0.2.0/24", "2001:db8::/32", a bare address)."""
    items = table.get(name, list, list(default))
    for item in items:
        if not isinstance(item, str):
            raise table.error(name, "must be a list of CIDR networks as strings")
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as e:
            raise table.error(name, f"{item!r}: {e}") from None
    return tuple(items)


def _mechanisms(table: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of SASL mechanism names, each one the proxy knows (sasl.MECHANISMS)."""
    items = table.get(name, list, list(default))
    for item in items:
        if not isinstance(item, str) or item.upper() not in MECHANISMS:
            raise table.error(name, f"unknown mechanism {item!r}; known: "
                              f"{', '.join(MECHANISMS)}")
    names = [item.upper() for item in items]
    if len(set(names)) != len(names):
        raise table.error(name, "lists a mechanism twice")
    return tuple(names)


#: readers of the fields whose rules name a kind: (table, key, default) -> value
#: a field's rules["kind"] -> the reader of a key of that kind (table, name, default)
_KINDS: dict[str, Callable[[_Table, str, Any], Any]] = {"networks": _networks,
                                                      "sni": _sni_list,
                                                      "mechanisms": _mechanisms}


def _username(table: _Table | None) -> UsernameConfig:
    if table is None:
        return UsernameConfig()
    delimiter = _read(table, UsernameConfig, "domain_delimiter")
    if len(delimiter) != 1:
        raise table.error("domain_delimiter", "must be a single character")
    config = _build(UsernameConfig, table, domain_delimiter=delimiter)
    table.finish()
    return config


def _address(table: _Table, name: str) -> tuple[str, int]:
    text = table.get(name, str, "")
    if not text:
        raise table.error(name, "is required")
    try:
        return parse_address(text)
    except ValueError as e:
        raise table.error(name, str(e)) from None


def _metrics(table: _Table | None) -> MetricsConfig | None:
    if table is None:
        return None
    host, port = _address(table, "address")
    table.finish()
    return MetricsConfig(host, port)


#: RFC 6750 section 2.1: what a bearer token may hold (b64token), so it fits the header
_B64TOKEN = re.compile(rb"[A-Za-z0-9._~+/-]+=*")


def is_token(data: bytes) -> bool:
    """Whether ``data`` can be sent as ``Authorization: Bearer <data>``."""
    return _B64TOKEN.fullmatch(data) is not None

#: characters an admin token needs at least (`openssl rand -hex 32` gives 64)
MIN_TOKEN = 16


def _admin(table: _Table | None) -> AdminConfig | None:
    if table is None:
        return None
    text = table.get("address", str, "")
    if text.startswith("/"):
        token_file = table.file("token_file")
        table.finish()
        # The socket is made mode 0600 (admin.py): the file system is the
        # protection; a token, if given, is required on top.
        token = _admin_token(table, token_file) if token_file is not None else None
        return AdminConfig(text, socket=Path(text), token_file=token_file, token=token)
    host, port = _address(table, "address")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        # Anyone who reaches it can list users and end their sessions.
        raise table.error("address", "must be a loopback address or a UNIX socket path")
    token_file = table.file("token_file")
    if token_file is None:
        # Any local process (another user's, a browser's through DNS rebinding) reaches
        # a loopback port.
        raise table.error("token_file", f"is required with a TCP address ({text}): a file "
                                        "holding a secret token (or give address a UNIX "
                                        "socket path)")
    table.finish()
    return AdminConfig(text, host, port, token_file=token_file,
                       token=_admin_token(table, token_file))


def _owner_only_file(table: _Table, name: str, path: Path) -> bytes:
    """The content of ``path`` (stripped): a file only its owner may read, as ssh wants
    of its keys."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise table.error(name, f"{path} is open to group or others (mode "
                                    f"{mode:04o}): chmod 600 it")
        data = path.read_bytes().strip()
    except OSError as e:
        raise table.error(name, f"cannot read {path}: {e.strerror} (run as the "
                                "service user or root)") from None
    if not data:
        raise table.error(name, f"{path} is empty")
    return data


def _admin_token(table: _Table, path: Path) -> Secret:
    """The token in ``path``, an owner-only file."""
    data = _owner_only_file(table, "token_file", path)
    if not is_token(data):
        # Never the token itself in the message.
        raise table.error("token_file", f"{path}: a token is letters, digits and -._~+/ "
                                        "(as from `openssl rand -hex 32`)")
    if len(data) < MIN_TOKEN:
        raise table.error("token_file", f"{path}: the token is too short ({len(data)} "
                                        f"characters, at least {MIN_TOKEN})")
    return Secret(data)


#: bytes a [shared] key_file holds at least (`openssl rand -hex 32` gives 64)
MIN_SHARED_KEY = 32


def _shared(table: _Table | None) -> SharedConfig:
    if table is None:
        return SharedConfig()
    text = _read(table, SharedConfig, "redis")
    config = _build(SharedConfig, table, redis=text, url=None, key=None)
    table.finish()
    if not text:
        return config  # off: the other keys wait for a URL
    try:
        url = parse_redis_url(text)
    except ValueError as e:
        # The URL as written, its password masked; the reason never repeats it.
        raise table.error("redis", f"{redact_redis(text)!r} {e}") from None
    if config.password_file is not None:
        if url.password is not None:
            raise table.error("password_file", "give the password in the URL or in "
                                               "password_file, not both")
        password = _owner_only_file(table, "password_file", config.password_file)
        url = dataclasses.replace(url, password=Secret(password))
    if config.ca_file is not None and not url.tls:
        raise table.error("ca_file", "is for rediss:// (Redis over TLS) only")
    key = None
    if config.key_file is not None:
        data = _owner_only_file(table, "key_file", config.key_file)
        if len(data) < MIN_SHARED_KEY:
            raise table.error("key_file", f"{config.key_file}: the key is too short "
                                          f"({len(data)} bytes, at least {MIN_SHARED_KEY}; "
                                          "`openssl rand -hex 32` makes one)")
        key = Secret(data)
    return dataclasses.replace(config, url=url, key=key)


def _log(table: _Table | None) -> LogConfig:
    if table is None:
        return LogConfig()
    config = _build(LogConfig, table)
    if not config.syslog_address.startswith("/"):
        try:
            parse_address(config.syslog_address)
        except ValueError as e:
            raise table.error("syslog_address", f"a socket path or host:port: {e}") from None
    table.finish()
    return config


def _sections(path: Path, data: dict[str, Any]) -> Config:
    root = _Table(path, "", data)
    listen = root.get("listen", list, [])
    if not listen:
        raise ConfigError(path, "listen", "at least one [[listen]] table is required")
    listeners = tuple(_listener(_Table(path, f"listen[{i}]", item))
                      for i, item in enumerate(listen))
    tls = _tls(root.table("tls"))
    for i, listener in enumerate(listeners):
        if listener.tls != "none" and tls.certificate is None:
            raise ConfigError(path, f"listen[{i}].tls",
                              f"tls = {listener.tls!r} needs [tls] certificate and key")
    config = Config(
        path=path,
        listeners=listeners,
        tls=tls,
        directory=_directory(root.table("directory"), path),
        backend=_backend(root.table("backend")),
        limits=_section(Limits, root.table("limits")),
        timeouts=_section(Timeouts, root.table("timeouts")),
        username=_username(root.table("username")),
        auth=_section(AuthConfig, root.table("auth")),
        workers=_read(root, Config, "workers"),
        metrics=_metrics(root.table("metrics")),
        admin=_admin(root.table("admin")),
        proxy_protocol=_section(ProxyProtocolConfig, root.table("proxy_protocol")),
        log=_log(root.table("log")),
        shared=_shared(root.table("shared")),
    )
    root.finish()
    return config


def load(path: Path | str) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and key."""
    path = Path(path).resolve()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "config file not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    return _sections(path, data)



"""Tests for imapproxy.config: TOML loading and validation.

Every error must name the config file and the dotted key, so one line tells an operator
what to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from rig.proxy import ADMIN_TOKEN, admin_token_file

from imapproxy import config as config_module
from imapproxy.config import (
    AdminConfig,
    AuthConfig,
    BackendConfig,
    CacheConfig,
    Config,
    ConfigError,
    DirectoryConfig,
    LdapConfig,
    Limits,
    Listener,
    LogConfig,
    ProxyProtocolConfig,
    SharedConfig,
    Timeouts,
    TlsConfig,
    UsernameConfig,
    load,
    parse_address,
)
from imapproxy.credentials import Secret
from imapproxy.redisurl import RedisUrl

MINIMAL = """
[[listen]]
protocol = "imap"
address = "127.0.0.1:1143"
tls = "none"

[directory]
map = "users.map"
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A config folder holding a map, a certificate and a key (contents are not read)."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "users.map").write_text("*  imap.example.org\n")
    (folder / "tls").mkdir()
    (folder / "tls" / "cert.pem").write_text("CERT\n")
    (folder / "tls" / "key.pem").write_text("KEY\n")
    (folder / "ldap.secret").write_text("s3cret\n")
    admin_token_file(folder)
    return folder


def write(folder: Path, text: str, name: str = "imapproxy.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_text(folder: Path, text: str) -> Config:
    return load(write(folder, text))


def config_error(folder: Path, text: str) -> ConfigError:
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value
    assert error.path == str(path.resolve())
    assert str(error).startswith(str(path.resolve()) + ": ")
    return error


# -- valid configs --------------------------------------------------------------------------


def test_minimal_config_and_defaults(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL)
    assert config.path == (confdir / "imapproxy.toml").resolve()
    assert config.listeners == (Listener("imap", "127.0.0.1", 1143, "none"),)
    assert config.directory.type == "static"
    assert config.directory.map == (confdir / "users.map").resolve()
    assert config.directory.ldap is None
    assert config.directory.cache == CacheConfig()
    assert config.backend == BackendConfig()
    assert config.limits == Limits()
    assert config.timeouts == Timeouts()
    assert config.username == UsernameConfig()
    assert config.tls.certificate is None
    assert config.tls.plaintext_auth is False
    assert config.workers == 1


FULL = """
workers = 2

[[listen]]
protocol = "imap"
address = "0.0.0.0:993"
tls = "implicit"

[[listen]]
protocol = "imap"
address = "[::1]:1143"

[[listen]]
protocol = "pop3"
address = "localhost:1110"
tls = "none"

[[listen]]
protocol = "managesieve"
address = "localhost:4190"

[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"
plaintext_auth = true
min_version = "1.3"

[directory]
type = "ldap"

[directory.ldap]
uris = ["ldaps://ldap1.example.org", "ldap://ldap2.example.org:389"]
base = "ou=people,dc=example,dc=org"
scope = "one"
filter = "(&(objectClass=mailUser)(mail={user}))"
bind_dn = "cn=proxy,dc=example,dc=org"
bind_password_file = "ldap.secret"
starttls = true
host_attribute = "mailHost"
imap_port_attribute = "mailImapPort"
managesieve_port_attribute = "mailSievePort"
timeout = 2
pool_size = 8

[directory.cache]
positive_ttl = 60
negative_ttl = 5.5
max_entries = 0

[backend]
imap_port = 1143
managesieve_port = 14190
tls = "starttls"
connect_timeout = 3
insecure_skip_verify = true

[limits]
max_line = 4096
max_bad_commands = 3

[timeouts]
authenticated = 1900
idle = 120

[username]
domain_delimiter = "+"
lowercase = true
default_domain = "example.org"
"""


def test_full_config(confdir: Path) -> None:
    config = load_text(confdir, FULL)
    assert config.workers == 2
    assert config.listeners == (
        Listener("imap", "0.0.0.0", 993, "implicit"),
        Listener("imap", "::1", 1143, "starttls"),  # tls defaults to starttls
        Listener("pop3", "localhost", 1110, "none"),
        Listener("managesieve", "localhost", 4190, "starttls"),
    )
    assert config.tls.certificate == (confdir / "tls" / "cert.pem").resolve()
    assert config.tls.key == (confdir / "tls" / "key.pem").resolve()
    assert config.tls.plaintext_auth is True
    assert config.tls.min_version == "1.3"
    ldap = config.directory.ldap
    assert ldap is not None
    assert config.directory.type == "ldap"
    assert config.directory.map is None
    assert ldap.uris == ("ldaps://ldap1.example.org", "ldap://ldap2.example.org:389")
    assert ldap.scope == "one"
    assert ldap.bind_password == "s3cret"
    assert "s3cret" not in repr(ldap)
    assert ldap.starttls is True
    assert ldap.timeout == 2.0 and isinstance(ldap.timeout, float)
    assert ldap.pool_size == 8
    assert config.directory.cache == CacheConfig(60.0, 5.5, 3600.0, 0)
    assert config.backend.imap_port == 1143
    assert config.backend.managesieve_port == 14190
    assert ldap.managesieve_port_attribute == "mailSievePort"
    assert config.backend.tls == "starttls"
    assert config.backend.insecure_skip_verify is True
    assert config.limits.max_line == 4096
    assert config.limits.max_bad_commands == 3
    assert config.limits.max_preauth_literal == Limits().max_preauth_literal
    assert config.timeouts == Timeouts(1900.0, 120.0)
    assert config.username.domain_delimiter == "+"
    assert config.username.lowercase is True


def test_ldap_directory_with_inline_bind_password(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL.replace('map = "users.map"', 'type = "ldap"')
                       + '[directory.ldap]\nbase = "dc=example,dc=org"\nbind_password = "pw"\n')
    ldap = config.directory.ldap
    assert ldap is not None
    assert ldap.bind_password == "pw"
    assert ldap.uris == ("ldap://127.0.0.1:389",)
    assert ldap.filter == "(uid={user})"
    assert ldap.scope == "sub"


def test_relative_paths_resolve_against_the_config_folder(
    confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (confdir / "maps").mkdir()
    (confdir / "maps" / "m").write_text("* h\n")
    config = load_text(confdir, MINIMAL.replace('"users.map"', '"maps/../maps/m"'))
    assert config.directory.map == (confdir / "maps" / "m").resolve()


def test_config_path_may_be_relative(confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(confdir, MINIMAL)
    monkeypatch.chdir(confdir)
    config = load("imapproxy.toml")
    assert config.path == (confdir / "imapproxy.toml").resolve()
    assert config.directory.map == (confdir / "users.map").resolve()


def test_absolute_paths_are_kept(confdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "abs.map"
    other.write_text("* h\n")
    config = load_text(confdir, MINIMAL.replace('"users.map"', f'"{other.as_posix()}"'))
    assert config.directory.map == other.resolve()


def test_config_is_frozen(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL)
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


# -- errors name the file and the dotted key ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        pytest.param("colour = 1\n" + MINIMAL, "colour", "unknown key", id="unknown root key"),
        pytest.param(MINIMAL.replace('tls = "none"', 'tls = "none"\nport = 1'),
                     "listen[0].port", "unknown key", id="unknown listener key"),
        pytest.param(MINIMAL + "[backend]\nimap_prot = 143\n", "backend.imap_prot",
                     "unknown key", id="misspelt backend key"),
        pytest.param(MINIMAL + "[directory.cache]\nttl = 1\n", "directory.cache.ttl",
                     "unknown key", id="unknown nested key"),
        pytest.param(MINIMAL + "[limits]\nmax_line = \"big\"\n", "limits.max_line",
                     "expected an integer, got str", id="string for an integer"),
        pytest.param(MINIMAL + "[backend]\nimap_port = true\n", "backend.imap_port",
                     "got a boolean", id="boolean for a port"),
        pytest.param(MINIMAL + "[limits]\nmax_line = 1.5\n", "limits.max_line",
                     "expected an integer, got float", id="float for an integer"),
        pytest.param(MINIMAL + "[backend]\nconnect_timeout = \"3s\"\n",
                     "backend.connect_timeout", "expected an integer or a number",
                     id="string for a number"),
        pytest.param(MINIMAL + "[tls]\nplaintext_auth = \"yes\"\n", "tls.plaintext_auth",
                     "expected a boolean, got str", id="string for a boolean"),
        pytest.param(MINIMAL + "[backend]\nimap_port = 70000\n", "backend.imap_port",
                     "between 1 and 65535", id="port out of range"),
        pytest.param(MINIMAL + "[limits]\nmax_line = 100\n", "limits.max_line", ">= 512",
                     id="limit below its minimum"),
        pytest.param(MINIMAL + "[timeouts]\nauthenticated = 60\n", "timeouts.authenticated",
                     "at least 1800", id="RFC 3501 30 minute minimum"),
        pytest.param("workers = 0\n" + MINIMAL, "workers", "between 1 and 256", id="workers"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", "127.0.0.1"), "listen[0].address",
                     "host:port", id="address without port"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", "127.0.0.1:0"), "listen[0].address",
                     "port must be", id="port 0"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", "127.0.0.1:imap"), "listen[0].address",
                     "port must be", id="port name"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", "::1:1143"), "listen[0].address",
                     "[addr]:port", id="bare IPv6"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", "[::1]1143"), "listen[0].address",
                     "[addr]:port", id="IPv6 without colon"),
        pytest.param(MINIMAL.replace("127.0.0.1:1143", ":1143"), "listen[0].address",
                     "missing host", id="missing host"),
        pytest.param(MINIMAL.replace('address = "127.0.0.1:1143"', ""), "listen[0].address",
                     "is required", id="missing address"),
        pytest.param(MINIMAL.replace('tls = "none"', 'tls = "ssl"'), "listen[0].tls",
                     "must be one of 'none', 'starttls', 'implicit'", id="bad tls value"),
        pytest.param(MINIMAL.replace('protocol = "imap"', 'protocol = "smtp"'),
                     "listen[0].protocol", "must be one of", id="bad protocol"),
        pytest.param(MINIMAL.replace('tls = "none"', 'tls = "implicit"'), "listen[0].tls",
                     "needs [tls] certificate and key", id="tls listener without certificate"),
        pytest.param(MINIMAL.replace('tls = "none"', ""), "listen[0].tls",
                     "'starttls' needs [tls] certificate", id="default starttls needs a cert"),
        pytest.param(MINIMAL.split("[directory]")[0], "directory", "is required",
                     id="missing [directory]"),
        pytest.param(MINIMAL.replace('map = "users.map"', ""), "directory.map", "is required",
                     id="static directory without map"),
        pytest.param(MINIMAL.replace('"users.map"', '"nope.map"'), "directory.map",
                     "file not found", id="map file missing"),
        pytest.param(MINIMAL.replace('map = "users.map"', 'type = "nis"'), "directory.type",
                     "must be one of", id="bad directory type"),
        pytest.param(MINIMAL.replace('map = "users.map"', 'type = "ldap"'), "directory.ldap",
                     'is required when type = "ldap"', id="ldap without [directory.ldap]"),
        pytest.param(MINIMAL + "[directory.ldap]\nuris = []\nbase = \"dc=x\"\n",
                     "directory.ldap.uris", "non-empty list", id="empty ldap uris"),
        pytest.param(MINIMAL + "[directory.ldap]\nuris = [\"http://x\"]\nbase = \"dc=x\"\n",
                     "directory.ldap.uris[0]", "'http://x' has scheme 'http'", id="non-ldap uri"),
        pytest.param(MINIMAL + "[directory.ldap]\nbase = \"\"\n", "directory.ldap.base",
                     "is required", id="ldap without base"),
        pytest.param(MINIMAL + "[directory.ldap]\nbase = \"dc=x\"\nfilter = \"uid={user}\"\n",
                     "directory.ldap.filter", "parentheses", id="filter without parens"),
        pytest.param(MINIMAL + "[directory.ldap]\nbase = \"dc=x\"\nfilter = \"(uid={name})\"\n",
                     "directory.ldap.filter", "only {user}, {local} and {domain}",
                     id="unknown filter placeholder"),
        pytest.param(MINIMAL + "[directory.ldap]\nbase = \"dc=x\"\nbind_password = \"a\"\n"
                     "bind_password_file = \"ldap.secret\"\n", "directory.ldap.bind_password_file",
                     "give bind_password or bind_password_file", id="both passwords"),
        pytest.param(MINIMAL + "[directory.ldap]\nbase = \"dc=x\"\nhost_attribute = \"\"\n",
                     "directory.ldap.host_attribute", "is required", id="empty host_attribute"),
        pytest.param(MINIMAL + "[tls]\ncertificate = \"tls/cert.pem\"\n", "tls.key",
                     "certificate and key go together", id="certificate without key"),
        pytest.param(MINIMAL + "[tls]\nkey = \"tls/key.pem\"\n", "tls.certificate",
                     "certificate and key go together", id="key without certificate"),
        pytest.param(MINIMAL + "[tls]\ncertificate = \"tls/missing.pem\"\nkey = \"tls/key.pem\"\n",
                     "tls.certificate", "file not found", id="certificate file missing"),
        pytest.param(MINIMAL + "[tls]\nmin_version = \"1.0\"\n", "tls.min_version",
                     "must be one of", id="old TLS version"),
        pytest.param(MINIMAL + "[username]\ndomain_delimiter = \"@@\"\n",
                     "username.domain_delimiter", "single character", id="long delimiter"),
        pytest.param("tls = 1\n" + MINIMAL, "tls", "must be a table", id="tls not a table"),
        pytest.param("listen = [1]\n[directory]\nmap = \"users.map\"\n", "listen[0]",
                     "must be a table", id="listen entry not a table"),
        pytest.param("[directory]\nmap = \"users.map\"\n", "listen",
                     "at least one [[listen]]", id="no listeners"),
        pytest.param("listen = \"x\"\n", "listen", "expected a list, got str",
                     id="listen not a list"),
    ],
)
def test_errors_name_the_file_and_the_key(confdir: Path, text: str, key: str, message: str) -> None:
    error = config_error(confdir, text)
    assert error.key == key
    assert message in error.message
    assert f": {key}: " in str(error)


def test_map_error_names_the_resolved_file(confdir: Path) -> None:
    error = config_error(confdir, MINIMAL.replace('"users.map"', '"nope.map"'))
    assert str((confdir / "nope.map").resolve()) in error.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as info:
        load(tmp_path / "absent.toml")
    assert info.value.path == str((tmp_path / "absent.toml").resolve())
    assert info.value.key == ""


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path)


def test_invalid_toml(confdir: Path) -> None:
    error = config_error(confdir, "[[listen]\naddress = \n")
    assert error.key == ""
    assert error.message.startswith("invalid TOML:")


def test_map_path_pointing_at_a_directory(confdir: Path) -> None:
    error = config_error(confdir, MINIMAL.replace('"users.map"', '"tls"'))
    assert error.key == "directory.map"


# -- parse_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:143", ("127.0.0.1", 143)),
        ("imap.example.org:993", ("imap.example.org", 993)),
        ("[::1]:1143", ("::1", 1143)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_address(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed


@pytest.mark.parametrize(
    "text",
    ["", "host", "host:", ":143", "host:65536", "host:-1", "host:+1", "host: 143", "[::1]",
     "[::1]:", "[]:143", "[::1:143", "::1:143", "a:b:143", "host:1e3"],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


# -- known bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [("[limits]\npreauth_timeout = nan\n", "limits.preauth_timeout"),
     ("[backend]\nconnect_timeout = inf\n", "backend.connect_timeout"),
     ("[timeouts]\nidle = nan\n", "timeouts.idle"),
     ("[limits]\nmax_login_rate = inf\n", "limits.max_login_rate")],
    ids=["nan preauth_timeout", "inf connect_timeout", "nan idle", "inf max_login_rate"],
)
def test_non_finite_numbers_are_refused(confdir: Path, text: str, key: str) -> None:
    assert config_error(confdir, MINIMAL + text).key == key


def test_undecodable_bind_password_file(confdir: Path) -> None:
    (confdir / "bad.secret").write_bytes(b"\xff\xfe")
    text = MINIMAL + '[directory.ldap]\nbase = "dc=x"\nbind_password_file = "bad.secret"\n'
    assert config_error(confdir, text).key == "directory.ldap.bind_password_file"


def test_nul_in_a_path(confdir: Path) -> None:
    error = config_error(confdir, MINIMAL.replace('"users.map"', '"users\\u0000.map"'))
    assert error.key == "directory.map"


@pytest.mark.parametrize("port", ["\u00b2", "\u0661\u0664\u0663"])
def test_parse_address_wants_ascii_digits(port: str) -> None:
    with pytest.raises(ValueError, match="port must be"):
        parse_address("127.0.0.1:" + port)


# -- issue 7: connection limits, brute-force delay, SNI, backend client certificate ----------


def test_security_defaults(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL)
    limits = config.limits
    assert (limits.max_connections, limits.max_connections_per_ip, limits.ipv6_prefix,
            limits.max_connections_per_user_ip) == (0, 2000, 64, 20)
    assert (limits.login_delay, limits.login_delay_max, limits.login_failure_memory) == (
        2.0, 15.0, 900.0)
    assert (limits.max_login_rate, limits.max_login_queue) == (0.0, 0)  # no pacing
    assert config.tls.sni == () and config.tls.ciphers == ""
    assert config.backend.client_certificate is None and config.backend.client_key is None


def test_security_keys(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL + """
[limits]
max_connections = 5000
max_connections_per_ip = 300
ipv6_prefix = 56
max_connections_per_user_ip = 0
login_delay = 0.5
login_delay_max = 8
login_failure_memory = 60
max_login_rate = 150
max_login_queue = 3000

[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"
ciphers = "ECDHE+AESGCM"

[[tls.sni]]
domain = "IMAP.Example.org."
certificate = "tls/cert.pem"
key = "tls/key.pem"

[[tls.sni]]
domain = "*.example.net"
certificate = "tls/cert.pem"
key = "tls/key.pem"

[backend]
client_certificate = "tls/cert.pem"
client_key = "tls/key.pem"
""")
    assert config.limits == Limits(max_connections=5000, max_connections_per_ip=300,
                                   ipv6_prefix=56, max_connections_per_user_ip=0,
                                   login_delay=0.5, login_delay_max=8,
                                   login_failure_memory=60, max_login_rate=150.0,
                                   max_login_queue=3000)
    assert isinstance(config.limits.max_login_rate, float)
    assert [(s.domain, s.certificate.name) for s in config.tls.sni] == [
        ("imap.example.org", "cert.pem"), ("*.example.net", "cert.pem")]
    assert config.backend.client_certificate == confdir / "tls" / "cert.pem"
    assert config.backend.client_key == confdir / "tls" / "key.pem"


TLS_OK = '[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n'


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[limits]\nmax_connections_per_ip = -1\n", "limits.max_connections_per_ip", ">= 0"),
        ("[limits]\nipv6_prefix = 129\n", "limits.ipv6_prefix", "between 1 and 128"),
        ("[limits]\nlogin_delay = -2\n", "limits.login_delay", "at least 0"),
        ("[limits]\nmax_login_rate = -1\n", "limits.max_login_rate", "at least 0"),
        ('[limits]\nmax_login_rate = "fast"\n', "limits.max_login_rate", "number"),
        ("[limits]\nmax_login_queue = -5\n", "limits.max_login_queue", ">= 0"),
        ("[limits]\nmax_login_queue = 1.5\n", "limits.max_login_queue", "integer"),
        ('[backend]\nclient_certificate = "tls/cert.pem"\n', "backend.client_key",
         "go together"),
        ('[backend]\nclient_key = "tls/key.pem"\n', "backend.client_certificate",
         "go together"),
        ('[tls]\n[[tls.sni]]\ndomain = "a.example"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\n', "tls.certificate", "default certificate"),
        (TLS_OK + '[[tls.sni]]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n',
         "tls.sni[0].domain", "host name"),
        (TLS_OK + '[[tls.sni]]\ndomain = "*.org"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\n', "tls.sni[0].domain", "host name"),
        (TLS_OK + '[[tls.sni]]\ndomain = "a.*.org"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\n', "tls.sni[0].domain", "host name"),
        (TLS_OK + '[[tls.sni]]\ndomain = "a..org"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\n', "tls.sni[0].domain", "host name"),
        (TLS_OK + '[[tls.sni]]\ndomain = "a.example"\ncertificate = "tls/cert.pem"\n',
         "tls.sni[0].key", "required"),
        (TLS_OK + '[[tls.sni]]\ndomain = "a.example"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\nport = 1\n', "tls.sni[0].port", "unknown key"),
        (TLS_OK + '[[tls.sni]]\ndomain = "a.example"\ncertificate = "tls/cert.pem"\n'
         'key = "tls/key.pem"\n[[tls.sni]]\ndomain = "A.example"\n'
         'certificate = "tls/cert.pem"\nkey = "tls/key.pem"\n', "tls.sni[1].domain",
         "listed twice"),
    ],
)
def test_security_key_errors(confdir: Path, text: str, key: str, message: str) -> None:
    error = config_error(confdir, MINIMAL + text)
    assert error.key == key
    assert message in error.message


# -- operations: [metrics], [admin], [proxy_protocol], [log], forward_client ----------------------

OPERATIONS = """
[metrics]
address = "127.0.0.1:9143"

[admin]
address = "127.0.0.1:9144"
token_file = "admin.token"

[proxy_protocol]
trusted = ["127.0.0.1/32", "::1/128", "10.1.0.0/16"]
timeout = 5

[backend]
forward_client = "proxy-v2"

[log]
format = "json"
syslog = true
syslog_address = "127.0.0.1:514"
syslog_facility = "local0"
"""


def test_operations_keys(confdir: Path) -> None:
    text = MINIMAL.replace('tls = "none"\n', 'tls = "none"\nproxy_protocol = true\n', 1)
    config = load(write(confdir, text + OPERATIONS))
    assert config.listeners[0].proxy_protocol is True
    assert config.metrics is not None and (config.metrics.host, config.metrics.port) == (
        "127.0.0.1", 9143)
    assert config.admin is not None and config.admin.port == 9144 and config.admin.socket is None
    assert config.admin.token_file == confdir / "admin.token"
    assert config.admin.token is not None
    assert config.admin.token.reveal() == ADMIN_TOKEN.encode()
    assert ADMIN_TOKEN not in repr(config.admin) and ADMIN_TOKEN not in repr(config)
    assert config.proxy_protocol.trusted[-1] == "10.1.0.0/16"
    assert config.proxy_protocol.timeout == 5
    assert config.backend.forward_client == "proxy-v2"
    assert (config.log.format, config.log.syslog, config.log.syslog_facility) == (
        "json", True, "local0")


def test_operations_defaults(confdir: Path) -> None:
    config = load(write(confdir, MINIMAL))
    assert config.metrics is None and config.admin is None
    assert config.listeners[0].proxy_protocol is False
    assert config.proxy_protocol.trusted == ("127.0.0.1/32", "::1/128")
    assert config.backend.forward_client == "id"
    assert config.log.format == "text" and not config.log.syslog


def test_admin_on_a_unix_socket(confdir: Path) -> None:
    config = load(write(confdir, MINIMAL + '[admin]\naddress = "/run/imapproxy/admin.sock"\n'))
    assert config.admin is not None and str(config.admin.socket) == "/run/imapproxy/admin.sock"
    assert config.admin.token is None  # the socket's mode 0600 is the protection
    with_token = load(write(confdir, MINIMAL + '[admin]\naddress = "/run/imapproxy/admin.sock"\n'
                                               'token_file = "admin.token"\n'))
    assert with_token.admin is not None and with_token.admin.token is not None


def test_admin_tcp_address_needs_a_token_file(confdir: Path) -> None:
    error = config_error(confdir, MINIMAL + '[admin]\naddress = "127.0.0.1:9144"\n')
    assert error.key == "admin.token_file"
    assert "is required with a TCP address (127.0.0.1:9144)" in error.message
    assert "imapproxy.toml: admin.token_file: is required" in str(error)
    config = load(write(confdir, MINIMAL + '[admin]\naddress = "[::1]:9144"\n'
                                           'token_file = "admin.token"\n'))
    assert config.admin is not None and config.admin.host == "::1"


@pytest.mark.parametrize(
    "mode, content, message",
    [
        (0o644, ADMIN_TOKEN, "is open to group or others (mode 0644): chmod 600 it"),
        (0o640, ADMIN_TOKEN, "(mode 0640)"),
        (0o604, ADMIN_TOKEN, "(mode 0604)"),
        (0o620, ADMIN_TOKEN, "(mode 0620)"),  # writable by the group: it could plant one
        (0o600, " \n\t\n", "is empty"),
        (0o600, "short-token", "too short (11 characters, at least 16)"),
        (0o600, "a token with spaces in it", "letters, digits and -._~+/"),
        (0o600, "ünïcödé-ünïcödé-ünïcödé", "letters, digits and -._~+/"),
    ],
)
def test_admin_token_file_errors(confdir: Path, mode: int, content: str, message: str) -> None:
    token = confdir / "admin.token"
    token.write_text(content)
    token.chmod(mode)
    text = MINIMAL + '[admin]\naddress = "127.0.0.1:9144"\ntoken_file = "admin.token"\n'
    error = config_error(confdir, text)
    assert error.key == "admin.token_file"
    assert message in error.message and str(token) in error.message
    assert content.strip() not in str(error) or not content.strip()


def test_admin_token_file_missing_or_unreadable(confdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + '[admin]\naddress = "127.0.0.1:9144"\ntoken_file = "nope.token"\n'
    error = config_error(confdir, text)
    assert error.key == "admin.token_file" and "file not found" in error.message

    # Tests run as root, who reads any file: imapproxy-admin run as nobody meets the real
    # refusal in tests/integration/test_operator.py.
    def refuse(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    error = config_error(confdir, text.replace("nope.token", "admin.token"))
    assert error.key == "admin.token_file"
    assert error.message == (f"cannot read {confdir / 'admin.token'}: Permission denied "
                             "(run as the service user or root)")


@pytest.mark.parametrize(
    "text, key, message",
    [
        ('[metrics]\naddress = "9143"\n', "metrics.address", "host:port"),
        ("[metrics]\n", "metrics.address", "required"),
        ('[admin]\naddress = "0.0.0.0:9144"\n', "admin.address", "loopback"),
        ('[admin]\naddress = "192.0.2.1:9144"\n', "admin.address", "loopback"),
        ('[proxy_protocol]\ntrusted = ["10.0.0.0/33"]\n', "proxy_protocol.trusted", "10.0.0.0/33"),
        ("[proxy_protocol]\ntrusted = [1]\n", "proxy_protocol.trusted", "CIDR"),
        ('[backend]\nforward_client = "xclient"\n', "backend.forward_client", "one of"),
        ('[log]\nformat = "xml"\n', "log.format", "one of"),
        ('[log]\nsyslog_facility = "kern"\n', "log.syslog_facility", "one of"),
        ('[log]\nsyslog_address = "loghost"\n', "log.syslog_address", "host:port"),
        ("[metrics]\naddress = \"127.0.0.1:1\"\npath = \"/m\"\n", "metrics.path", "unknown key"),
    ],
)
def test_operations_errors(confdir: Path, text: str, key: str, message: str) -> None:
    error = config_error(confdir, MINIMAL + text)
    assert error.key == key
    assert message in error.message


def test_listener_proxy_protocol_must_be_a_boolean(confdir: Path) -> None:
    text = MINIMAL.replace('tls = "none"\n', 'tls = "none"\nproxy_protocol = "yes"\n', 1)
    assert config_error(confdir, text).key == "listen[0].proxy_protocol"


# -- [directory.ldap] uris (RFC 4516 forms; parsing itself is tests/test_ldapurl.py) ------------

LDAP_MINIMAL = MINIMAL.replace('map = "users.map"', 'type = "ldap"') + "[directory.ldap]\n"


def ldap_text(uris: list[str], base: str | None = None) -> str:
    listed = ", ".join('"' + u.replace("\\", "\\\\") + '"' for u in uris)
    return LDAP_MINIMAL + f"uris = [{listed}]\n" + (f'base = "{base}"\n' if base is not None
                                                  else "")


def test_usual_uri_forms_load_as_written(confdir: Path) -> None:
    uris = ["ldap://ldap.example.org:389/", "ldap://ldap.example.org", "ldaps://[2001:db8::1]/",
            "ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/", "LDAP://127.0.0.1:3389"]
    ldap = load_text(confdir, ldap_text(uris, "dc=example,dc=org")).directory.ldap
    assert ldap is not None
    # Kept as written: the text names the server in logs and keys its health.
    assert ldap.uris == tuple(uris)
    assert ldap.base == "dc=example,dc=org"


def test_the_dn_part_serves_as_base(confdir: Path) -> None:
    uris = ["ldap://a.example.org/ou=people,dc=example,dc=org", "ldap://b.example.org/",
            "ldaps://c.example.org/ou%3Dpeople,dc%3Dexample,dc%3Dorg"]
    ldap = load_text(confdir, ldap_text(uris)).directory.ldap
    assert ldap is not None
    assert ldap.base == "ou=people,dc=example,dc=org"


def test_the_dn_part_may_repeat_the_base(confdir: Path) -> None:
    text = ldap_text(["ldap://a.example.org/OU=People,%20DC=example,dc=org"],
                     "ou=people,dc=example,dc=org")
    ldap = load_text(confdir, text).directory.ldap
    assert ldap is not None
    assert ldap.base == "ou=people,dc=example,dc=org"  # the key's spelling


@pytest.mark.parametrize(("text", "key", "message"), [
    pytest.param(ldap_text(["ldap://ldap.example.org:389/"]), "directory.ldap.base",
                 "or give it as the DN part of the URIs", id="no base anywhere"),
    pytest.param(ldap_text(["ldap://a/ou=people,dc=example,dc=org"], "dc=example,dc=org"),
                 "directory.ldap.uris[0]",
                 "has DN part 'ou=people,dc=example,dc=org', but base is 'dc=example,dc=org'",
                 id="dn part differs from base"),
    pytest.param(ldap_text(["ldap://a/", "ldap://b/dc=example,dc=org", "ldap://c/dc=example,dc=net"]),
                 "directory.ldap.uris[2]",
                 "has DN part 'dc=example,dc=net', but uris[1] has 'dc=example,dc=org'",
                 id="dn parts differ"),
    pytest.param(ldap_text(["ldap://ok.example.org/", "ldap://ldap.example.org:0/"], "dc=x"),
                 "directory.ldap.uris[1]", "'ldap://ldap.example.org:0/' has port 0",
                 id="port 0 names its index"),
    pytest.param(ldap_text(["ldapi:///"], "dc=x"), "directory.ldap.uris[0]",
                 "has no socket path", id="ldapi without a path"),
    pytest.param(ldap_text(["ldap:///"], "dc=x"), "directory.ldap.uris[0]", "has no host",
                 id="empty host"),
    pytest.param(LDAP_MINIMAL + 'uris = [389]\nbase = "dc=x"\n', "directory.ldap.uris[0]",
                 "expected a string, got int", id="not a string"),
    pytest.param(LDAP_MINIMAL + 'uris = "ldap://x/"\nbase = "dc=x"\n', "directory.ldap.uris",
                 "expected a list, got str", id="not a list"),
])
def test_uri_errors_name_the_file_and_the_entry(confdir: Path, text: str, key: str,
                                                message: str) -> None:
    error = config_error(confdir, text)
    assert error.key == key
    assert message in error.message, error.message


def test_a_uri_with_a_password_is_refused_without_showing_it(confdir: Path) -> None:
    error = config_error(confdir, ldap_text(["ldap://cn=proxy:Pa55word@ldap.example.org/"],
                                            "dc=x"))
    assert error.key == "directory.ldap.uris[0]"
    assert "user information" in error.message
    assert "Pa55word" not in str(error)
    assert "ldap.example.org" in str(error)


# -- each default is written once, on its field ---------------------------------------------


def section_classes() -> list[type]:
    """Every dataclass in the config tree, Config first."""
    found: list[type] = []

    def walk(cls: type) -> None:
        if cls in found:
            return
        found.append(cls)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # Listener in tuple[Listener, ...], LdapConfig in LdapConfig | None
            for outer in getattr(hints[f.name], "__args__", (hints[f.name],)):
                for inner in getattr(outer, "__args__", (outer,)):
                    if dataclasses.is_dataclass(inner):
                        walk(inner)

    walk(Config)
    return found


def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING


LDAP_BASE = MINIMAL.replace("[directory]", '[directory]\ntype = "ldap"') + (
    '[directory.ldap]\nbase = "dc=example,dc=org"\n')

#: (config text, the section in the loaded Config, its class, the fields the text sets)
EMPTY_SECTIONS = [
    (MINIMAL, lambda c: c, Config, {"path", "listeners", "tls", "directory", "backend"}),
    (MINIMAL, lambda c: c.listeners[0], Listener, {"protocol", "host", "port", "tls"}),
    (MINIMAL + "[tls]\n", lambda c: c.tls, TlsConfig, set()),
    (MINIMAL, lambda c: c.directory, DirectoryConfig, {"map"}),
    (LDAP_BASE, lambda c: c.directory.ldap, LdapConfig, {"base"}),
    (MINIMAL + "[directory.cache]\n", lambda c: c.directory.cache, CacheConfig, set()),
    (MINIMAL + "[backend]\n", lambda c: c.backend, BackendConfig, set()),
    (MINIMAL + "[limits]\n", lambda c: c.limits, Limits, set()),
    (MINIMAL + "[timeouts]\n", lambda c: c.timeouts, Timeouts, set()),
    (MINIMAL + "[username]\n", lambda c: c.username, UsernameConfig, set()),
    (MINIMAL + '[admin]\naddress = "/run/imapproxy/admin.sock"\n', lambda c: c.admin,
     AdminConfig, {"address", "socket"}),
    (MINIMAL + "[proxy_protocol]\n", lambda c: c.proxy_protocol, ProxyProtocolConfig, set()),
    (MINIMAL + "[log]\n", lambda c: c.log, LogConfig, set()),
    (MINIMAL + "[auth]\n", lambda c: c.auth, AuthConfig, set()),
    (MINIMAL + "[shared]\n", lambda c: c.shared, SharedConfig, set()),
    (MINIMAL + '[shared]\nredis = "redis://h"\n', lambda c: c.shared.url, RedisUrl,
     {"scheme", "host"}),
]


def test_every_section_with_defaults_is_checked_below() -> None:
    with_defaults = {cls for cls in section_classes()
                     if any(has_default(f) for f in dataclasses.fields(cls))}
    assert with_defaults == {cls for _, _, cls, _ in EMPTY_SECTIONS}


@pytest.mark.parametrize(("text", "section", "cls", "given"), EMPTY_SECTIONS,
                         ids=[case[2].__name__ for case in EMPTY_SECTIONS])
def test_an_empty_section_gives_its_dataclass_defaults(
        confdir: Path, text: str, section: Callable[[Config], Any], cls: type,
        given: set[str]) -> None:
    # The loader has no default of its own: every key it is not given is the field's.
    loaded = section(load_text(confdir, text))
    assert type(loaded) is cls
    for f in dataclasses.fields(cls):
        if f.name not in given:
            assert has_default(f), f.name
            assert getattr(loaded, f.name) == f.default, f.name


def test_every_default_keeps_its_own_rules() -> None:
    for cls in section_classes():
        for f in dataclasses.fields(cls):
            rules, default = f.metadata, f.default
            where = f"{cls.__name__}.{f.name}"
            assert has_default(f) or not rules, where
            if "choices" in rules:
                assert default in rules["choices"], where
            if "minimum" in rules:
                assert default >= rules["minimum"], where
            if "maximum" in rules:
                assert default <= rules["maximum"], where
            if rules.get("required"):
                assert default, where


def test_a_misspelt_rule_is_an_error_at_import() -> None:
    with pytest.raises(TypeError, match="unknown config rule: minumum"):
        config_module._key(1, minumum=1)


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}


def literals(node: ast.expr) -> Iterator[object]:
    """The constants a call argument spells out: 2.0, "mailHost", ["ldap://..."], 30 * 86400.0."""
    if isinstance(node, ast.Constant):
        yield node.value
    elif isinstance(node, ast.List | ast.Tuple):
        for element in node.elts:
            yield from literals(element)
    elif (isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC
          and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)):
        yield ARITHMETIC[type(node.op)](node.left.value, node.right.value)


def test_no_loader_repeats_a_default() -> None:
    # Defaults and bounds are written on the fields; code that reads keys passes none on.
    # Nothing falsy (0, "", False, None, ()) is looked for: those are everybody's words.
    defaults = set()
    for cls in section_classes():
        for f in dataclasses.fields(cls):
            for value in f.default if isinstance(f.default, tuple) else (f.default,):
                if isinstance(value, int | float | str) and not isinstance(value, bool) and value:
                    defaults.add((type(value) is str, value))
    source = ast.parse(inspect.getsource(config_module))
    repeated = []
    for function in ast.walk(source):
        if not isinstance(function, ast.FunctionDef):
            continue
        for call in ast.walk(function):
            if not isinstance(call, ast.Call):
                continue
            for argument in [*call.args, *(keyword.value for keyword in call.keywords)]:
                for value in literals(argument):
                    if not isinstance(value, bool) and (type(value) is str, value) in defaults:
                        repeated.append(f"{function.name}, line {call.lineno}: {value!r}")
    assert repeated == []


# -- [auth] ----------------------------------------------------------------------------------


def test_auth_mechanisms_default_to_the_password_ones(confdir: Path) -> None:
    assert load_text(confdir, MINIMAL).auth.mechanisms == ("PLAIN", "LOGIN")


def test_auth_mechanisms_turn_on_the_token_ones(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL + '[auth]\nmechanisms = ["plain", "OAUTHBEARER", '
                       '"XOAUTH2"]\n')
    assert config.auth.mechanisms == ("PLAIN", "OAUTHBEARER", "XOAUTH2")
    assert load_text(confdir, MINIMAL + "[auth]\nmechanisms = []\n").auth.mechanisms == ()


@pytest.mark.parametrize(("text", "key", "message"), [
    ('[auth]\nmechanisms = ["PLAIN", "CRAM-MD5"]\n', "auth.mechanisms",
     "unknown mechanism 'CRAM-MD5'"),
    ("[auth]\nmechanisms = [1]\n", "auth.mechanisms", "unknown mechanism 1"),
    ('[auth]\nmechanisms = "PLAIN"\n', "auth.mechanisms", "expected a list"),
    ('[auth]\nmechanisms = ["PLAIN", "plain"]\n', "auth.mechanisms", "twice"),
    ('[auth]\nmechanism = ["PLAIN"]\n', "auth.mechanism", "unknown key"),
])
def test_auth_errors_name_the_file_and_the_key(confdir: Path, text: str, key: str,
                                               message: str) -> None:
    error = config_error(confdir, MINIMAL + text)
    assert error.key == key and message in error.message
    assert str(error).startswith(str(confdir / "imapproxy.toml") + ": " + key + ": ")


# -- [shared] ----------------------------------------------------------------------------------


def secret_file(folder: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_shared_is_off_without_a_url(confdir: Path) -> None:
    config = load_text(confdir, MINIMAL)
    assert config.shared == SharedConfig() and config.shared.url is None
    # The other keys may stay while the URL is commented out.
    assert load_text(confdir, MINIMAL + "[shared]\ntimeout = 1\n").shared.url is None


def test_shared_redis_url_and_keys(confdir: Path) -> None:
    secret_file(confdir, "shared.key", "k" * 64 + "\n")
    config = load_text(confdir, MINIMAL + '[shared]\nredis = "redis://:pa%40ss@Redis.example:'
                       '6380/3"\ntimeout = 0.5\nkey_file = "shared.key"\nprefix = "mx1:"\n')
    shared = config.shared
    assert shared.url == RedisUrl("redis", "redis.example", 6380, "", 3, "",
                                  Secret(b"pa@ss"))
    assert shared.timeout == 0.5 and shared.prefix == "mx1:"
    assert shared.key == Secret(b"k" * 64) and shared.key_file == confdir / "shared.key"
    assert "pa@ss" not in repr(config) and "kkkk" not in repr(config)


def test_shared_password_file(confdir: Path) -> None:
    secret_file(confdir, "redis.pw", "from-a-file\n")
    config = load_text(confdir, MINIMAL + '[shared]\nredis = "redis://127.0.0.1"\n'
                       'password_file = "redis.pw"\n')
    assert config.shared.url is not None
    assert config.shared.url.password == Secret(b"from-a-file")


@pytest.mark.parametrize(("text", "key", "message"), [
    ('redis = "http://127.0.0.1"', "shared.redis", "expected redis://"),
    ('redis = "redis://127.0.0.1:0"', "shared.redis", "port must be a number"),
    ('redis = "redis://127.0.0.1/x"', "shared.redis", "database must be a number"),
    ('redis = "redis://127.0.0.1?timeout=1"', "shared.redis", "no ?parameters"),
    ('redis = "redis://:hunter2@"', "shared.redis", "has no host"),
    ('redis = "redis://hunter2@127.0.0.1"', "shared.redis", "without a colon"),
    ('redis = 6379', "shared.redis", "expected a string"),
    ('redis = "redis://h"\ntimeout = 0', "shared.timeout", "at least 0.01"),
    ('redis = "redis://h"\nprefix = ""', "shared.prefix", "is required"),
    ('redis = "redis://h"\nca_file = "users.map"', "shared.ca_file", "rediss://"),
    ('redis = "redis://:hunter2@h"\npassword_file = "redis.pw"', "shared.password_file",
     "not both"),
    ('redis = "redis://h"\nkey_file = "open.key"', "shared.key_file",
     "open to group or others"),
    ('redis = "redis://h"\nkey_file = "short.key"', "shared.key_file", "too short"),
    ('redis = "redis://h"\nkey_file = "nope.key"', "shared.key_file", "file not found"),
    ('redis = "redis://h"\nsentinel = "x"', "shared.sentinel", "unknown key"),
])
def test_shared_errors_name_the_file_and_the_key_never_the_password(
        confdir: Path, text: str, key: str, message: str) -> None:
    secret_file(confdir, "redis.pw", "from-a-file\n")
    secret_file(confdir, "open.key", "k" * 64, mode=0o644)
    secret_file(confdir, "short.key", "k" * 31)
    error = config_error(confdir, MINIMAL + "[shared]\n" + text + "\n")
    assert error.key == key and message in error.message, str(error)
    assert str(error).startswith(str(confdir / "imapproxy.toml") + ": " + key + ": ")
    assert "hunter2" not in str(error)

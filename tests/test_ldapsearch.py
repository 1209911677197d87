"""Tests for imapproxy.ldapsearch: how ldap3 is told where to go (no connection is made).

Searches against a real slapd are in tests/integration/test_ldap_directory.py.
"""

from __future__ import annotations

import pytest

from imapproxy.config import LdapConfig
from imapproxy.ldapsearch import LdapSearcher

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

"""Tests for imapproxy.ldapurl: the LDAP URI forms of RFC 4516 section 2 (and ldapi)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.ldapurl import (
    MAX_SOCKET_PATH,
    LdapUri,
    check_dn,
    format_ldap_uri,
    parse_ldap_uri,
    redact,
    same_dn,
)


@pytest.mark.parametrize(("text", "expected"), [
    # the form of OpenLDAP's ldap.conf (URI ldap://ldap.example.org:389/)
    ("ldap://ldap.example.org:389/", LdapUri("ldap", "ldap.example.org", 389)),
    ("ldap://ldap.example.org:389", LdapUri("ldap", "ldap.example.org", 389)),
    ("ldap://ldap.example.org/", LdapUri("ldap", "ldap.example.org", 389)),
    ("ldap://ldap.example.org", LdapUri("ldap", "ldap.example.org", 389)),
    ("ldaps://ldap.example.org", LdapUri("ldaps", "ldap.example.org", 636)),
    ("ldaps://ldap.example.org:10636/", LdapUri("ldaps", "ldap.example.org", 10636)),
    # RFC 3986 section 3.2.3: an empty port is the default one
    ("ldap://ldap.example.org:/", LdapUri("ldap", "ldap.example.org", 389)),
    ("ldap://127.0.0.1:3389/", LdapUri("ldap", "127.0.0.1", 3389)),
    ("ldap://127.0.0.1:03389", LdapUri("ldap", "127.0.0.1", 3389)),
    ("ldap://localhost", LdapUri("ldap", "localhost", 389)),
    ("ldap://ldap_1.corp.example", LdapUri("ldap", "ldap_1.corp.example", 389)),
    ("ldap://xn--bcher-kva.example/", LdapUri("ldap", "xn--bcher-kva.example", 389)),
    # schemes and host names are case-insensitive (RFC 3986 sections 3.1 and 3.2.2)
    ("LDAPS://LDAP.Example.ORG:636/", LdapUri("ldaps", "ldap.example.org", 636)),
    ("ldap://ldap%2Eexample.org/", LdapUri("ldap", "ldap.example.org", 389)),
    # IPv6 literals in brackets (RFC 3986 section 3.2.2), kept without them
    ("ldap://[::1]:3389/", LdapUri("ldap", "::1", 3389)),
    ("ldap://[::1]", LdapUri("ldap", "::1", 389)),
    ("ldaps://[2001:DB8:0:0::1]/", LdapUri("ldaps", "2001:db8::1", 636)),
    # the DN part: the search base (RFC 4516 section 2), percent-decoded (section 2.1)
    ("ldap://ldap.example.org/dc=example,dc=org",
     LdapUri("ldap", "ldap.example.org", 389, dn="dc=example,dc=org")),
    ("ldap://h/ou=Mail%20Users,dc=example,dc=org",
     LdapUri("ldap", "h", 389, dn="ou=Mail Users,dc=example,dc=org")),
    ("ldap://h/ou=M%C3%BCnchen,dc=example,dc=org",
     LdapUri("ldap", "h", 389, dn="ou=München,dc=example,dc=org")),
    ("ldap://h/cn=a%5C,b,dc=example", LdapUri("ldap", "h", 389, dn="cn=a\\,b,dc=example")),
    ("ldap://h/cn=a/b,dc=example", LdapUri("ldap", "h", 389, dn="cn=a/b,dc=example")),
    ("ldap://h/cn=x%3Fy,dc=example", LdapUri("ldap", "h", 389, dn="cn=x?y,dc=example")),
    ("ldap://h/cn=a+sn=b,dc=example", LdapUri("ldap", "h", 389, dn="cn=a+sn=b,dc=example")),
    ("ldap://h/2.5.4.3=x,dc=example", LdapUri("ldap", "h", 389, dn="2.5.4.3=x,dc=example")),
    # empty ?-parts say nothing and are accepted
    ("ldap://h/dc=example???", LdapUri("ldap", "h", 389, dn="dc=example")),
    ("ldap://h/?", LdapUri("ldap", "h", 389)),
    # ldapi (OpenLDAP): the socket path, percent-encoded, as host
    ("ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/",
     LdapUri("ldapi", socket_path="/var/run/slapd/ldapi")),
    ("ldapi://%2fvar%2frun%2fslapd%2fldapi", LdapUri("ldapi", socket_path="/var/run/slapd/ldapi")),
    ("LDAPI://%2Frun%2Fslap%20d%3A1/dc=example,dc=org",
     LdapUri("ldapi", socket_path="/run/slap d:1", dn="dc=example,dc=org")),
])
def test_accepted_forms(text: str, expected: LdapUri) -> None:
    assert parse_ldap_uri(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("", "is empty"),
    ("ldap.example.org", "is not an LDAP URI"),
    ("ldap:ldap.example.org", "is not an LDAP URI"),
    ("http://ldap.example.org/", "has scheme 'http'"),
    ("cldap://ldap.example.org/", "has scheme 'cldap'"),
    ("ldap://ldäp.example.org/", "non-ASCII"),
    ("ldap://h/ou=Zürich", "non-ASCII"),
    (" ldap://h/", "whitespace"),
    ("ldap://h/ ", "whitespace"),
    ("ldap://h/ou=a b", "whitespace"),
    ("ldap://h1 h2/", "several servers as several URIs"),  # Perdition's several hosts
    ("ldap://h/\t", "whitespace"),
    ("ldap://h/\x00", "control character"),
    ("ldap://h/%00", "control character"),
    ("ldapi://%2Ftmp%0Aldapi/", "control character"),
    ("ldap:///", "has no host"),
    ("ldap://", "has no host"),
    ("ldaps:///dc=example,dc=org", "has no host"),
    ("ldap://:389/", "has no host"),
    ("ldap://h:0/", "port 0"),
    ("ldap://h:65536/", "port 65536"),
    ("ldap://h:99999999999999999999/", "a port is a number from 1 to 65535"),
    ("ldap://h:-1/", "a port is a number"),
    ("ldap://h:38a9/", "a port is a number"),
    ("ldap://h:+389/", "a port is a number"),
    ("ldap://h:389:1/", "IPv6 address goes in brackets"),
    ("ldap://::1/", "IPv6 address goes in brackets"),
    ("ldap://[::1/", "without ']'"),
    ("ldap://[::1]x/", "expected ':port'"),
    ("ldap://[127.0.0.1]/", "not an IPv6 address"),
    ("ldap://[fe80::1%25eth0]/", "zone identifier"),
    ("ldap://[v1.fe]/", "IPvFuture"),
    ("ldap://user@h/", "user information"),
    ("ldap://cn=proxy:secret@h/", "user information"),
    ("ldap://h/#frag", "fragment"),
    ("ldap://h?one", "without a '/' before them"),
    ("ldap://1.2.3/", "neither an IPv4 address"),
    ("ldap://127.000.0.1/", "neither an IPv4 address"),
    ("ldap://256.1.1.1/", "neither an IPv4 address"),
    ("ldap://h./", "not a DNS name"),
    ("ldap://-h.example/", "not a DNS name"),
    ("ldap://h..example/", "not a DNS name"),
    ("ldap://" + "a" * 64 + ".example/", "not a DNS name"),
    ("ldap://h%20x/", "not a DNS name"),
    ("ldap://h<x>/", "not a host name or address"),
    ("ldap://h/%zz", "'%' not followed by two hex digits"),
    ("ldap://h/dc=100%", "'%' not followed by two hex digits"),
    ("ldap://h/%C3", "not UTF-8"),
    ("ldap://h/dc=example,", "type=value"),
    ("ldap://h/example", "type=value"),
    ("ldap://h/=x", "type=value"),
    ("ldap://h/dc=a\\x", "'\\' not followed"),
    # Perdition's map URL: the search parts belong in their own keys
    ("ldap://localhost/ou=mailbox,dc=nodomain?username,mailhost,port?one?(uid=%s)",
     "{user} where a Perdition map has %s"),
    ("ldap://h/dc=example??sub", "scope, filter"),
    ("ldap://h/dc=example???!x-ext", "does not read"),
    ("ldap://h/dc=example?????", "more than four '?' parts"),
    ("ldapi:///", "has no socket path"),
    ("ldapi:///var/run/slapd/ldapi", "has no socket path"),
    ("ldapi://var%2Frun%2Fldapi/", "not absolute"),
    ("ldapi://%2Fvar%2Frun%2Fldapi:389/", "takes no port"),
    ("ldapi://[::1]/", "takes no port"),
    ("ldapi://%2Ftmp%2F<s>/", "percent-encode it"),
    ("ldapi://%2F" + "x" * MAX_SOCKET_PATH + "/", "longer than 107 bytes"),
])
def test_refused_forms(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_ldap_uri(text)
    assert reason in str(info.value)


def test_socket_path_limit_is_in_bytes() -> None:
    fits = "/" + "x" * (MAX_SOCKET_PATH - 1)
    assert parse_ldap_uri("ldapi://" + quote(fits, safe="")).socket_path == fits
    with pytest.raises(ValueError, match="longer than"):
        parse_ldap_uri("ldapi://" + quote("/" + "é" * (MAX_SOCKET_PATH // 2 + 1), safe=""))


def test_canonical_form() -> None:
    assert str(parse_ldap_uri("LDAP://Ldap.Example.org")) == "ldap://ldap.example.org:389/"
    assert str(parse_ldap_uri("ldaps://[2001:db8:0::1]")) == "ldaps://[2001:db8::1]:636/"
    assert str(parse_ldap_uri("ldap://h/ou=Mail%20Users,dc=x")) == (
        "ldap://h:389/ou=Mail%20Users,dc=x")
    assert str(parse_ldap_uri("ldapi://%2frun%2fldapi")) == "ldapi://%2Frun%2Fldapi/"


def test_implicit_tls_is_ldaps_only() -> None:
    assert parse_ldap_uri("ldaps://h").implicit_tls
    assert not parse_ldap_uri("ldap://h").implicit_tls
    assert not parse_ldap_uri("ldapi://%2Fs").implicit_tls


def test_redact_hides_user_information_only() -> None:
    assert redact("ldap://cn=proxy:pw@h:389/dc=x") == "ldap://...@h:389/dc=x"
    assert redact("ldap://h/cn=a@b,dc=x") == "ldap://h/cn=a@b,dc=x"  # "@" in the DN
    assert redact("ldap://h:389/") == "ldap://h:389/"
    assert redact("not a uri @ all") == "not a uri @ all"


def test_same_dn_ignores_case_and_spaces_around_separators() -> None:
    assert same_dn("ou=people,dc=example,dc=org", "OU=People, DC=Example , dc=ORG")
    assert same_dn("cn=a+sn=b,dc=x", "sn=b+cn=a,dc=x")  # an RDN's AVAs are a set
    assert same_dn("cn=a\\2C b,dc=x", "cn=a\\2c b,dc=x")
    assert not same_dn("ou=people,dc=example,dc=org", "dc=example,dc=org")
    assert not same_dn("cn=a\\,b,dc=x", "cn=a,b,dc=x")
    assert same_dn("not a dn", " NOT A DN")  # unparsable: compared as text


def test_check_dn() -> None:
    check_dn("dc=example,dc=org")
    check_dn("cn=a\\,b\\2C\\\\,dc=x")
    check_dn("cn=")  # RFC 4514 allows an empty value
    for bad in ("dc", "dc=x,,dc=y", ",dc=x", "1a=x", "dc=x\\", "dc=x\\4"):
        with pytest.raises(ValueError):
            check_dn(bad)


# --- properties -------------------------------------------------------------------------

_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_names = st.lists(_labels, min_size=1, max_size=4).map(".".join).filter(
    lambda n: not n.split(".")[-1].isdigit())
_hosts = st.one_of(_names, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
_printable = st.characters().filter(str.isprintable)
# RFC 4514 section 2.4: escape what would end or confuse a value
_values = st.text(_printable, max_size=12).map(
    lambda v: "".join("\\" + c if c in ' "#+,;<=>\\' else c for c in v))
_rdns = st.tuples(st.sampled_from(["dc", "ou", "cn", "uid", "2.5.4.3"]), _values).map("=".join)
_dns = st.lists(_rdns, max_size=4).map(",".join)
_paths = st.text(_printable, min_size=1, max_size=40).map(lambda p: "/" + p).filter(
    lambda p: len(p.encode()) <= MAX_SOCKET_PATH)
_tcp_uris = st.builds(LdapUri, st.sampled_from(["ldap", "ldaps"]), _hosts,
                      st.integers(1, 65535), st.none(), _dns)
_ldapi_uris = st.builds(LdapUri, st.just("ldapi"), st.just(""), st.none(), _paths, _dns)


@settings(max_examples=300, deadline=None)
@given(uri=st.one_of(_tcp_uris, _ldapi_uris))
def test_format_then_parse_round_trips(uri: LdapUri) -> None:
    assert parse_ldap_uri(format_ldap_uri(uri)) == uri


_pieces = st.sampled_from(["ldap://", "ldaps://", "ldapi://", "LDAP://", "h", "[", "]", "::1",
                           ":", "389", "0", "/", "?", "??", "#", "@", "%", "%2F", "%zz", "%C3",
                           "dc=x", ",", "=", "\\", "\\2c", "+", " ", ".", "-", "é", "\x00",
                           "%00", "(uid=%s)", "127.0.0.1", "v1.x", "%25"])
_uri_like = st.lists(_pieces | st.text(max_size=4), max_size=12).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(_uri_like, st.text()))
def test_any_text_parses_or_raises_value_error_only(text: str) -> None:
    try:
        uri = parse_ldap_uri(text)
    except ValueError as e:
        assert str(e)
        return
    # What is accepted has a canonical form that means the same.
    assert parse_ldap_uri(str(uri)) == uri
    assert uri.scheme in ("ldap", "ldaps", "ldapi")
    assert (uri.port is None) == (uri.scheme == "ldapi") == (uri.socket_path is not None)

"""Tests for imapproxy.ldapfilter: RFC 4515 escaping of logins in search filters."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ldap3.utils.conv import escape_filter_chars

from imapproxy.ldapfilter import build_filter, escape


def test_plain_names_are_untouched() -> None:
    assert build_filter("(uid={user})", "alice") == "(uid=alice)"


def test_local_and_domain() -> None:
    template = "(&(uid={local})(associatedDomain={domain}))"
    assert build_filter(template, "bob@example.org") == (
        "(&(uid=bob)(associatedDomain=example.org))"
    )
    assert build_filter(template, "bob") == "(&(uid=bob)(associatedDomain=))"


@pytest.mark.parametrize(
    ("login", "escaped"),
    [
        ("*", r"\2a"),  # Perdition routed "a*" to alice
        ("a*", r"a\2a"),
        ("*)(uid=*", r"\2a\29\28uid=\2a"),
        ("x)(|(uid=*))", r"x\29\28|\28uid=\2a\29\29"),
        ("nul\x00byte", r"nul\00byte"),
        ("back\\slash", r"back\5cslash"),
        (r"\2a", r"\5c2a"),  # an escape typed by the client stays literal text
        ("jörg", "jörg"),  # RFC 4515 UTF1SUBSET/UTFMB: UTF-8 may stay literal
        ("名前", "名前"),
    ],
)
def test_injection_attempts_are_escaped(login: str, escaped: str) -> None:
    assert escape(login) == escaped
    assert build_filter("(uid={user})", login) == f"(uid={escaped})"


def test_every_placeholder_is_escaped() -> None:
    assert build_filter("(|(mail={user})(uid={local})(o={domain}))", "a*)@(b") == (
        r"(|(mail=a\2a\29@\28b)(uid=a\2a\29)(o=\28b))"
    )


def test_other_delimiter() -> None:
    assert build_filter("(uid={local})", "bob%example.org", "%") == "(uid=bob)"


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(ValueError):
        build_filter("(uid={user})", "bad\udcffname")


@given(st.text())
def test_agrees_with_ldap3(value: str) -> None:
    assert escape(value) == escape_filter_chars(value)


SPECIAL = re.compile(r"[()*\x00]")


@given(st.text())
def test_escaped_value_has_no_filter_syntax(value: str) -> None:
    out = escape(value)
    assert not SPECIAL.search(out)
    # Every backslash starts a two-hex-digit escape (RFC 4515 "escaped" production).
    assert all(re.fullmatch(r"[0-9a-f]{2}", out[i + 1 : i + 3]) for i, c in enumerate(out)
               if c == "\\")


@given(st.text())
def test_escape_round_trips(value: str) -> None:
    unescaped = re.sub(r"\\([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), escape(value))
    assert unescaped == value

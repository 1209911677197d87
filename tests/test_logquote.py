"""Client text in log lines: quoted so it can neither forge a field nor a line."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.logquote import MAX_QUOTED, quoted

FIELD = re.compile(r"user=<([^<>\n\r]*)> client=(\S+)$")


def line(user: str) -> str:
    return f"login failed id=1 user={quoted(user)} client=192.0.2.7"


def test_plain_and_non_ascii_names_stay_readable() -> None:
    assert quoted("alice") == "<alice>"
    assert quoted("jürgen@exämple.org") == "<jürgen@exämple.org>"


def test_a_forged_field_and_a_forged_line_stay_inside_the_value() -> None:
    forged = "x client=203.0.113.9\u2028login id=2 user=<root> client=203.0.113.9"
    text = line(forged)
    assert "\u2028" not in text and "\n" not in text
    match = FIELD.search(text)
    assert match is not None and match.group(2) == "192.0.2.7"
    assert "\\u2028" in match.group(1) and "\\x3c" in match.group(1)


def test_controls_separators_and_our_own_delimiters_are_escaped() -> None:
    assert quoted("a\r\nb\x00c\x85d\u2029e\u202ef") == \
        "<a\\x0d\\x0ab\\x00c\\x85d\\u2029e\\u202ef>"
    assert quoted("<>\\") == "<\\x3c\\x3e\\x5c>"


def test_long_values_are_cut_and_say_so() -> None:
    text = quoted("a" * 60_000)
    assert text == "<" + "a" * MAX_QUOTED + "...(60000 chars)>"


def test_bytes_none_and_undecodable_input() -> None:
    assert quoted(None) == "-"
    assert quoted(b"ab\xffc") == "<ab\\x5cxffc>"


@given(st.text(max_size=200))
def test_whatever_the_name_the_real_fields_are_found(user: str) -> None:
    text = line(user)
    assert len(text.splitlines()) == 1
    match = FIELD.search(text)
    assert match is not None and match.group(2) == "192.0.2.7"

"""Tests for imapproxy.usernames: Perdition-style username rewriting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.config import UsernameConfig
from imapproxy.usernames import Names, rewrite, split, username_problem


def cfg(**kwargs: object) -> UsernameConfig:
    return UsernameConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults_leave_the_name_alone() -> None:
    assert rewrite("Alice@Example.ORG", cfg()) == Names(
        lookup="Alice@Example.ORG", backend="Alice@Example.ORG", local="Alice", domain="Example.ORG"
    )


def test_bare_name_without_default_domain() -> None:
    assert rewrite("bob", cfg()) == Names("bob", "bob", "bob", "")


def test_default_domain_for_bare_names_only() -> None:
    c = cfg(default_domain="example.org")
    assert rewrite("bob", c) == Names("bob@example.org", "bob@example.org", "bob", "example.org")
    assert rewrite("bob@other.net", c).lookup == "bob@other.net"


def test_trailing_delimiter_counts_as_bare() -> None:
    assert rewrite("bob@", cfg(default_domain="example.org")).lookup == "bob@example.org"
    assert rewrite("bob@", cfg()).lookup == "bob"


def test_lowercase_applies_to_both_parts_and_default_domain() -> None:
    c = cfg(lowercase=True, default_domain="Example.ORG")
    assert rewrite("BOB", c) == Names("bob@example.org", "bob@example.org", "bob", "example.org")
    assert rewrite("Bob@Other.NET", c).lookup == "bob@other.net"


def test_lowercase_is_not_casefold() -> None:
    # casefold would turn "straße" into "strasse": another mailbox, not another spelling.
    assert rewrite("Straße@x", cfg(lowercase=True)).local == "straße"


def test_strip_for_lookup_only() -> None:
    # Perdition's "-S servername_lookup": look up "user", log in as "user@dom".
    names = rewrite("carol@example.org", cfg(strip_domain_for_lookup=True))
    assert (names.lookup, names.backend) == ("carol", "carol@example.org")


def test_strip_for_backend_only() -> None:
    names = rewrite("carol@example.org", cfg(strip_domain_for_backend=True))
    assert (names.lookup, names.backend) == ("carol@example.org", "carol")


def test_strip_both_with_default_domain_keeps_domain_field() -> None:
    c = cfg(strip_domain_for_lookup=True, strip_domain_for_backend=True, default_domain="d.org")
    assert rewrite("dave", c) == Names("dave", "dave", "dave", "d.org")


def test_splits_at_the_last_delimiter() -> None:
    # RFC 5321 section 4.1.2: a quoted local part may contain "@"; a domain cannot.
    assert split('"a@b"@example.org') == ('"a@b"', "example.org")
    assert rewrite("a@b@c", cfg(strip_domain_for_lookup=True)).lookup == "a@b"


@pytest.mark.parametrize("delimiter", ["%", "+", "#"])
def test_other_delimiters(delimiter: str) -> None:
    c = cfg(domain_delimiter=delimiter, default_domain="example.org")
    assert rewrite("erin", c).lookup == f"erin{delimiter}example.org"
    assert rewrite(f"erin{delimiter}x.net", c) == Names(
        f"erin{delimiter}x.net", f"erin{delimiter}x.net", "erin", "x.net"
    )
    # "@" is just a character when it is not the delimiter.
    assert rewrite("erin@x.net", c).domain == "example.org"


names_text = st.text(min_size=1, max_size=40)
configs = st.builds(
    UsernameConfig,
    domain_delimiter=st.sampled_from(["@", "%", "+"]),
    lowercase=st.booleans(),
    default_domain=st.sampled_from(["", "example.org", "Example.ORG"]),
    strip_domain_for_lookup=st.booleans(),
    strip_domain_for_backend=st.booleans(),
)


def rejoin(names: Names, c: UsernameConfig) -> str:
    return f"{names.local}{c.domain_delimiter}{names.domain}" if names.domain else names.local


@given(names_text, configs)
def test_rewrite_is_idempotent(username: str, c: UsernameConfig) -> None:
    # A name we rewrote, rewritten again, gives the same names: no drift between the
    # name the proxy logs, looks up and sends.
    first = rewrite(username, c)
    assert rewrite(rejoin(first, c), c) == first


@given(names_text, configs)
def test_lookup_and_backend_are_full_or_local(username: str, c: UsernameConfig) -> None:
    names = rewrite(username, c)
    full = rejoin(names, c)
    assert names.lookup == (names.local if c.strip_domain_for_lookup else full)
    assert names.backend == (names.local if c.strip_domain_for_backend else full)


@given(names_text, configs)
def test_domain_never_contains_the_delimiter(username: str, c: UsernameConfig) -> None:
    assert c.domain_delimiter not in rewrite(username, c).domain


@given(names_text)
def test_identity_config_is_identity(username: str) -> None:
    c = UsernameConfig()
    if username.endswith("@"):
        return
    names = rewrite(username, c)
    assert names.lookup == names.backend == username


@given(names_text, configs)
def test_lowercase_output_is_lowercase(username: str, c: UsernameConfig) -> None:
    if not c.lowercase:
        return
    names = rewrite(username, c)
    assert names.lookup == names.lookup.lower()
    assert names.backend == names.backend.lower()


@pytest.mark.parametrize(("name", "problem"), [
    ("alice", None),
    ("jürgen@exämple.org", None),
    ("a" * 320, None),
    ("a" * 321, "username longer than 320 bytes"),
    ("ü" * 161, "username longer than 320 bytes"),  # 322 bytes in UTF-8
    ("", "empty username"),
    ("bob\x00", "control character in username"),
    ("bob\r\nuser=<root>", "control character in username"),
    ("a\x85b", "control character in username"),
    ("a\u2028b", "control character in username"),
    ("a\u2029b", "control character in username"),
    ("a\x7fb", "control character in username"),
    ("\udcff", "username is not UTF-8"),
])
def test_username_problem(name: str, problem: str | None) -> None:
    assert username_problem(name, 320) == problem

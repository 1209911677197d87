"""Tests for imapproxy.credentials: the redacting Secret and SASL PLAIN (RFC 4616)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from base64 import b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.credentials import Credentials, Secret, decode_sasl_plain, decode_username
from imapproxy.errors import AuthenticationFailed, ClientProtocolError


def plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return b64encode(authzid + b"\x00" + authcid + b"\x00" + password)


# -- Secret ---------------------------------------------------------------------------------


def test_secret_repr_and_str_are_redacted() -> None:
    secret = Secret(b"hunter2")
    assert repr(secret) == "<redacted>"
    assert str(secret) == "<redacted>"
    assert f"{secret}" == "<redacted>"
    assert "%s %r" % (secret, secret) == "<redacted> <redacted>"  # noqa: UP031
    assert secret.reveal() == b"hunter2"


def test_secret_equality_and_hash() -> None:
    assert Secret(b"a") == Secret(b"a")
    assert Secret(b"a") != Secret(b"b")
    assert Secret(b"a") != b"a"
    assert hash(Secret(b"a")) == hash(Secret(b"a"))
    assert len({Secret(b"a"), Secret(b"a"), Secret(b"b")}) == 2


def test_secret_has_no_instance_dict() -> None:
    # __slots__: nothing like vars(secret) can spill the value into a debug dump.
    with pytest.raises(TypeError):
        vars(Secret(b"x"))


def test_password_never_in_credentials_repr() -> None:
    credentials = Credentials("bob", Secret(b"hunter2"), "bob", "PLAIN")
    for text in (repr(credentials), str(credentials), f"{credentials!r}",
                 repr([credentials]), repr({"c": credentials}),
                 repr(dataclasses.asdict(credentials)), repr(copy.deepcopy(credentials))):
        assert "hunter2" not in text
    assert "bob" in repr(credentials)


def test_password_never_in_log_output(caplog: pytest.LogCaptureFixture) -> None:
    credentials = Credentials("bob", Secret(b"hunter2"))
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("login %s %r", credentials, credentials.password)
    assert "hunter2" not in caplog.text


def test_credentials_defaults_and_immutability() -> None:
    credentials = Credentials("bob", Secret(b"pw"))
    assert credentials.authzid == ""
    assert credentials.mechanism == "LOGIN"
    with pytest.raises(dataclasses.FrozenInstanceError):
        credentials.username = "eve"  # type: ignore[misc]


def test_secret_survives_pickling_but_stays_redacted() -> None:
    secret = pickle.loads(pickle.dumps(Secret(b"pw")))
    assert secret.reveal() == b"pw"
    assert repr(secret) == "<redacted>"


# -- usernames ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"bob", b"bob@example.org", "jörg".encode(), b"a b"])
def test_decode_username_accepts(raw: bytes) -> None:
    assert decode_username(raw) == raw.decode()


@pytest.mark.parametrize(("raw", "name"), [(b"", ""), (b"bob\x00", "bob\x00"),
                                          (b"\xff\xfe", "\udcff\udcfe")])
def test_decode_username_keeps_odd_names_for_the_login_to_refuse(raw: bytes,
                                                                  name: str) -> None:
    assert decode_username(raw) == name


# -- SASL PLAIN -----------------------------------------------------------------------------


def test_plain_without_authzid() -> None:
    assert decode_sasl_plain(plain(b"", b"bob", b"pw")) == Credentials(
        "bob", Secret(b"pw"), "", "PLAIN"
    )


def test_plain_with_equal_authzid() -> None:
    credentials = decode_sasl_plain(plain(b"bob", b"bob", b"pw"))
    assert credentials.authzid == "bob"
    assert credentials.username == "bob"


def test_plain_mechanism_name_is_recorded() -> None:
    assert decode_sasl_plain(plain(b"", b"bob", b"pw"), "USER").mechanism == "USER"


def test_plain_utf8_and_8bit_password() -> None:
    # RFC 4616 section 2: passwd is UTF-8, but any NUL-free octets are passed on unchanged.
    credentials = decode_sasl_plain(plain(b"", "jörg".encode(), b"p\xe4ss \xff"))
    assert credentials.username == "jörg"
    assert credentials.password.reveal() == b"p\xe4ss \xff"


def test_rfc4616_example() -> None:
    # RFC 4616 section 4: "\0tim\0tanstaaftanstaaf".
    credentials = decode_sasl_plain(b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm")
    assert credentials.username == "tim"
    assert credentials.password.reveal() == b"tanstaaftanstaaf"
    # ... and "Ursel\0Kurt\0xipj3plmq", an authzid for someone else: refused, not a BAD.
    with pytest.raises(AuthenticationFailed):
        decode_sasl_plain(b"VXJzZWwAS3VydAB4aXBqM3BsbXE=")


def test_authzid_for_someone_else_is_an_authentication_failure() -> None:
    with pytest.raises(AuthenticationFailed) as info:
        decode_sasl_plain(plain(b"admin", b"bob", b"pw"))
    assert not isinstance(info.value, ClientProtocolError)
    assert info.value.imap_code == "AUTHENTICATIONFAILED"


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (b"", "Malformed"),
        (b"!!!!", "Invalid base64"),
        (b"AHVzZXIAcGFzcw", "Invalid base64"),  # missing padding
        (b"AHVz ZXIAcGFzcw==", "Invalid base64"),  # whitespace
        (b64encode(b"bob\x00pw"), "Malformed"),  # one NUL
        (b64encode(b"\x00bob\x00p\x00w"), "Malformed"),  # NUL in the password
        (plain(b"", b"", b"pw"), "Malformed"),  # empty authcid
        (plain(b"", b"bob", b""), "Malformed"),  # empty password
        (plain(b"\xff", b"bob", b"pw"), "Authorization identity"),
    ],
)
def test_invalid_plain_responses(encoded: bytes, message: str) -> None:
    with pytest.raises(ClientProtocolError, match=message) as info:
        decode_sasl_plain(encoded)
    assert not info.value.fatal


@given(st.binary(max_size=80))
def test_decoding_arbitrary_bytes_raises_only_our_errors(data: bytes) -> None:
    for candidate in (data, b64encode(data)):
        try:
            credentials = decode_sasl_plain(candidate)
        except (ClientProtocolError, AuthenticationFailed):
            continue
        assert credentials.username
        assert credentials.password.reveal()
        assert b"\x00" not in credentials.password.reveal()


@given(
    user=st.text(st.characters(min_codepoint=0x20, blacklist_characters="\x7f",
                               blacklist_categories=("Cs",)), min_size=1, max_size=20),
    password=st.binary(min_size=1, max_size=40).filter(lambda p: b"\x00" not in p),
    with_authzid=st.booleans(),
)
def test_plain_round_trip(user: str, password: bytes, with_authzid: bool) -> None:
    encoded_user = user.encode()
    authzid = encoded_user if with_authzid else b""
    credentials = decode_sasl_plain(plain(authzid, encoded_user, password))
    assert credentials == Credentials(user, Secret(password), user if with_authzid else "", "PLAIN")

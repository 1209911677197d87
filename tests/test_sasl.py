"""Tests for imapproxy.sasl: the client's SASL messages in, credentials or challenges out,
and the token messages the backend is sent. Hypothesis checks that any bytes give either
credentials or a ClientProtocolError, and that messages survive the round trip."""

from __future__ import annotations

from base64 import b64decode, b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ClientProtocolError,
    TokenRefused,
    UserNotFound,
)
from imapproxy.sasl import (
    ERROR_CHALLENGES,
    MECHANISMS,
    Challenge,
    Complete,
    ServerExchange,
    backend_message,
    dummy_response,
    failure_challenge,
    parse_oauthbearer,
    parse_xoauth2,
    relayable_challenge,
)

# RFC 7628 section 4.1's example, with the authzid the proxy requires.
RFC_EXAMPLE = (b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
               b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")


def test_oauthbearer_rfc_example() -> None:
    credentials = parse_oauthbearer(RFC_EXAMPLE)
    assert credentials.username == credentials.authzid == "user@example.com"
    assert credentials.password.reveal() == b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert credentials.mechanism == "OAUTHBEARER"
    assert credentials.message == Secret(RFC_EXAMPLE)


def test_xoauth2_google_form() -> None:
    credentials = parse_xoauth2(b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2"
                                b"Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")
    assert credentials.username == "someuser@example.com"
    assert credentials.password.reveal() == b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    assert credentials.mechanism == "XOAUTH2"


def test_saslname_escapes_and_channel_binding_flag() -> None:
    credentials = parse_oauthbearer(b"y,a=a=2Cb=3Dc,\x01auth=bearer  t\x01\x01")
    assert credentials.username == "a,b=c"
    assert credentials.password.reveal() == b"t"


@pytest.mark.parametrize("message", [
    b"",
    b"\x01",  # the dummy response is no initial response
    b"n,a=bob,\x01auth=Bearer t\x01",  # one kvsep short
    b"n,,\x01auth=Bearer t\x01\x01",  # no authzid: nothing to route by
    b"n,a=,\x01auth=Bearer t\x01\x01",
    b"p=tls-unique,a=bob,\x01auth=Bearer t\x01\x01",  # channel binding is not offered
    b"n,a=bob\x01auth=Bearer t\x01\x01",  # GS2 header without its closing comma
    b"n,a=b=2Xob,\x01auth=Bearer t\x01\x01",  # a bad escape
    b"n,a=bob,\x01host=x\x01\x01",  # no auth
    b"n,a=bob,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",  # auth twice
    b"n,a=bob,\x01auth=Basic dXNlcjpwdw==\x01\x01",
    b"n,a=bob,\x01auth=Bearer not a token\x01\x01",
    b"n,a=bob,\x01auth=Bearer t\x00\x01\x01",
    b"n,a=bob,\x011x=y\x01auth=Bearer t\x01\x01",  # keys are letters
])
def test_malformed_oauthbearer(message: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        parse_oauthbearer(message)


@pytest.mark.parametrize("message", [
    b"user=bob\x01auth=Bearer t\x01",
    b"user=\x01auth=Bearer t\x01\x01",
    b"auth=Bearer t\x01\x01",
    b"user=bob\x01auth=Bearer t\x01host=x\x01\x01",
    b"user=bob\x01auth=Bearer\x01\x01",
])
def test_malformed_xoauth2(message: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        parse_xoauth2(message)


# -- the exchange -----------------------------------------------------------------------------


def test_plain_exchange() -> None:
    exchange = ServerExchange("PLAIN")
    assert exchange.start(None) == Challenge(b"")
    step = exchange.respond(b64encode(b"\0bob\0pw"))
    assert step == Complete(Credentials("bob", Secret(b"pw"), "", "PLAIN"))
    with pytest.raises(AuthenticationFailed):
        ServerExchange("PLAIN").start(b64encode(b"alice\0bob\0pw"))


def test_login_exchange_with_and_without_initial_response() -> None:
    exchange = ServerExchange("LOGIN")
    assert exchange.start(None) == Challenge(b"Username:")
    assert exchange.respond(b64encode(b"bob")) == Challenge(b"Password:")
    assert exchange.respond(b64encode(b"p w")) == Complete(
        Credentials("bob", Secret(b"p w"), "", "LOGIN"))
    exchange = ServerExchange("LOGIN")
    assert exchange.start(b64encode(b"bob")) == Challenge(b"Password:")
    with pytest.raises(ClientProtocolError, match="Empty user name"):
        ServerExchange("LOGIN").start(b"=")


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_token_exchange(mechanism: str) -> None:
    message = (RFC_EXAMPLE if mechanism == "OAUTHBEARER"
               else b"user=user@example.com\x01auth=Bearer t\x01\x01")
    assert ServerExchange(mechanism).start(None) == Challenge(b"")
    step = ServerExchange(mechanism).start(b64encode(message))
    assert isinstance(step, Complete) and step.credentials.mechanism == mechanism
    with pytest.raises(ClientProtocolError, match="base64"):
        ServerExchange(mechanism).start(b"not base64!")


def test_unknown_mechanism_is_a_bug() -> None:
    with pytest.raises(ValueError):
        ServerExchange("CRAM-MD5")


# -- the backend's side -------------------------------------------------------------------------


def test_backend_message_is_the_clients_own_bytes_for_the_same_name() -> None:
    assert backend_message(parse_oauthbearer(RFC_EXAMPLE), "user@example.com") == RFC_EXAMPLE


def test_backend_message_names_the_backend_login() -> None:
    renamed = backend_message(parse_oauthbearer(RFC_EXAMPLE), "u,=1")
    assert renamed == RFC_EXAMPLE.replace(b"a=user@example.com,", b"a=u=2C=3D1,")
    assert parse_oauthbearer(renamed).username == "u,=1"
    xoauth = parse_xoauth2(b"user=bob\x01auth=Bearer t\x01\x01")
    assert backend_message(xoauth, "bob@example.org") == (
        b"user=bob@example.org\x01auth=Bearer t\x01\x01")


def test_dummy_responses() -> None:
    assert b64decode(dummy_response("OAUTHBEARER")) == b"\x01"  # RFC 7628 section 3.2.3
    assert dummy_response("XOAUTH2") == b""


def test_failure_challenges() -> None:
    assert failure_challenge("OAUTHBEARER", TokenRefused(b"eyJ9")) == b"eyJ9"
    assert failure_challenge("XOAUTH2", UserNotFound()) == ERROR_CHALLENGES["XOAUTH2"]
    assert failure_challenge("OAUTHBEARER", BackendUnavailable()) is None
    assert failure_challenge("PLAIN", UserNotFound()) is None
    assert b64decode(ERROR_CHALLENGES["OAUTHBEARER"]) == b'{"status":"invalid_token"}'


@pytest.mark.parametrize(("challenge", "relayed"), [
    (b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=", True), (b"", False), (b"a b", False),
    (b"abc\r\nx", False), (b"ab==c", False)])
def test_only_base64_challenges_reach_a_client(challenge: bytes, relayed: bool) -> None:
    assert (relayable_challenge(challenge) is not None) is relayed


def test_tokens_are_not_in_any_repr() -> None:
    credentials = parse_oauthbearer(RFC_EXAMPLE)
    assert b"vF9dft4" not in repr(credentials).encode()
    assert "vF9dft4" not in repr(Complete(credentials))


# -- properties ---------------------------------------------------------------------------------

_names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)
_tokens = st.from_regex(rb"\A[A-Za-z0-9\-._~+/]+=*\Z")


@given(st.binary(max_size=200))
def test_any_bytes_give_credentials_or_a_protocol_error(data: bytes) -> None:
    for mechanism in MECHANISMS:
        for initial in (data, b64encode(data)):
            try:
                step = ServerExchange(mechanism).start(initial)
            except ClientProtocolError:
                continue
            except AuthenticationFailed:
                assert mechanism == "PLAIN"
                continue
            assert isinstance(step, (Challenge, Complete))


@given(_names, _tokens, _names)
def test_oauthbearer_round_trip(name: str, token: bytes, login: str) -> None:
    raw = name.encode().replace(b"=", b"=3D").replace(b",", b"=2C")
    message = b"n,a=" + raw + b",\x01auth=Bearer " + token + b"\x01\x01"
    credentials = parse_oauthbearer(message)
    assert credentials.username == name and credentials.password.reveal() == token
    again = parse_oauthbearer(backend_message(credentials, login))
    assert again.username == login and again.password == credentials.password


@given(_names, _tokens, _names)
def test_xoauth2_round_trip(name: str, token: bytes, login: str) -> None:
    message = b"user=" + name.encode() + b"\x01auth=Bearer " + token + b"\x01\x01"
    credentials = parse_xoauth2(message)
    assert credentials.username == name
    again = parse_xoauth2(backend_message(credentials, login))
    assert again.username == login and again.password == credentials.password

"""Tests for imapproxy.sievebackend: the proxy's ManageSieve login at a backend (sans-IO).

Backend bytes in, actions out; the backend lines are Dovecot Pigeonhole's own (as the
rig's Dovecot sends them). Each dialogue is also fed one byte at a time.
"""

from __future__ import annotations

from base64 import b64encode

import pytest

from imapproxy.actions import BackendLoggedIn, BackendLoginFailed, SendToBackend, StartBackendTLS
from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendRefused,
    BackendUnavailable,
    TokenRefused,
)
from imapproxy.sasl import parse_oauthbearer, parse_xoauth2
from imapproxy.sievebackend import SieveBackendLogin, Step, parse_response, refusal
from imapproxy.sievewire import Atom, String

CAPS = (b'"IMPLEMENTATION" "Dovecot (Debian) Pigeonhole"\r\n'
        b'"SIEVE" "fileinto reject envelope vacation"\r\n"NOTIFY" "mailto"\r\n'
        b'"SASL" "PLAIN LOGIN"\r\n"STARTTLS"\r\n"VERSION" "1.0"\r\n"XCLIENT"\r\n')
GREETING = CAPS + b'OK "store1 ready."\r\n'
LEARNT = b'"SIEVE" "fileinto reject envelope vacation"\r\n"NOTIFY" "mailto"\r\n'
AUTH = b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0s3cret") + b'"\r\n'


def login(starttls: bool = False, password: bytes = b"s3cret",
          name: str = "alice") -> SieveBackendLogin:
    return SieveBackendLogin(Credentials(name, Secret(password)), name, starttls=starttls)


def feed(dialogue: SieveBackendLogin, data: bytes, split: bool) -> list[object]:
    if not split:
        return list(dialogue.receive_data(data))
    out: list[object] = []
    for i in range(len(data)):
        out += dialogue.receive_data(data[i:i + 1])
    return out


@pytest.mark.parametrize("split", [False, True])
def test_plain_login(split: bool) -> None:
    dialogue = login()
    assert feed(dialogue, GREETING, split) == [SendToBackend(AUTH)]
    assert dialogue.credentials_sent
    assert feed(dialogue, b'OK "Logged in."\r\n', split) == [BackendLoggedIn(LEARNT, b"")]
    assert dialogue.step is Step.DONE


@pytest.mark.parametrize("split", [False, True])
def test_starttls_then_the_capabilities_again(split: bool) -> None:
    dialogue = login(starttls=True)
    assert feed(dialogue, GREETING, split) == [SendToBackend(b"STARTTLS\r\n")]
    assert feed(dialogue, b'OK "Begin TLS negotiation now."\r\n', split) == [StartBackendTLS()]
    assert dialogue.tls_started() == []
    # RFC 5804 section 2.2: the list again (a literal this time), then OK.
    after = (b'"SIEVE" {8}\r\nfileinto\r\n"MAXREDIRECTS" "4"\r\n'
             b'OK "TLS negotiation successful."\r\n')
    assert feed(dialogue, after, split) == [SendToBackend(AUTH)]
    # what came behind the answer (in the same read) goes to the client
    assert dialogue.receive_data(b'OK "Logged in."\r\nextra') == [
        BackendLoggedIn(b'"SIEVE" "fileinto"\r\n"MAXREDIRECTS" "4"\r\n', b"extra")]


def test_long_credentials_go_as_a_literal_and_nul_cannot() -> None:
    dialogue = login(password=b"p" * 2000)
    (sent,) = dialogue.receive_data(GREETING)
    assert isinstance(sent, SendToBackend)
    assert sent.data.startswith(b'AUTHENTICATE "PLAIN" {')  # literal-c2s: {n+}
    assert b"+}\r\n" in sent.data
    failed = login(password=b"a\0b").receive_data(GREETING)
    assert len(failed) == 1 and isinstance(failed[0], BackendLoginFailed)
    assert isinstance(failed[0].error, AuthenticationFailed)


@pytest.mark.parametrize(("answer", "error", "code", "bye"), [
    (b'NO "Authentication failed."\r\n', AuthenticationFailed, None, False),
    (b'NO (AUTH-TOO-WEAK) "Use a stronger mechanism"\r\n', BackendRefused, "AUTH-TOO-WEAK",
     False),
    (b'NO (TRYLATER) "Try later"\r\n', BackendRefused, "TRYLATER", False),
    (b'BYE (REFERRAL "sieve://other.example") "Go elsewhere"\r\n', BackendRefused,
     'REFERRAL "sieve://other.example"', True),
    (b'NO (QUOTA) "odd"\r\n', AuthenticationFailed, None, False),
    (b"BYE\r\n", AuthenticationFailed, None, False),
])
def test_refusals(answer: bytes, error: type, code: str | None, bye: bool) -> None:
    dialogue = login()
    dialogue.receive_data(GREETING)
    (failed,) = dialogue.receive_data(answer)
    assert isinstance(failed, BackendLoginFailed) and type(failed.error) is error
    assert failed.error.sieve_code == code
    assert getattr(failed.error, "bye", False) is bye


@pytest.mark.parametrize(("data", "error"), [
    (b'NO "busy"\r\n', BackendUnavailable),
    (b"* OK IMAP here\r\n", BackendProtocolError),
    (b'"SIEVE" "a" "b"\r\n', BackendProtocolError),
    (b'"unterminated\r\n', BackendProtocolError),
    (b"x" * 70000, BackendProtocolError),
    (b'OK (CODE "x"\r\n', BackendProtocolError),
])
def test_bad_greetings(data: bytes, error: type) -> None:
    (failed,) = login().receive_data(data)
    assert isinstance(failed, BackendLoginFailed) and type(failed.error) is error


def test_starttls_refused_or_followed_by_plaintext() -> None:
    dialogue = login(starttls=True)
    dialogue.receive_data(GREETING)
    (failed,) = dialogue.receive_data(b'NO "no TLS"\r\n')
    assert isinstance(failed, BackendLoginFailed)
    assert isinstance(failed.error, BackendUnavailable)
    dialogue = login(starttls=True)
    dialogue.receive_data(GREETING)
    (failed,) = dialogue.receive_data(b'OK "go"\r\nOK "injected"\r\n')
    assert isinstance(failed, BackendLoginFailed)
    assert isinstance(failed.error, BackendProtocolError)


def test_data_during_handshake_or_after_the_login_answer() -> None:
    dialogue = login(starttls=True)
    dialogue.receive_data(GREETING)
    dialogue.receive_data(b'OK "go"\r\n')
    (failed,) = dialogue.receive_data(b"OK\r\n")
    assert isinstance(failed, BackendLoginFailed)
    dialogue = login()
    dialogue.receive_data(GREETING)
    (failed,) = dialogue.receive_data(b'"a challenge"\r\n')
    assert isinstance(failed, BackendLoginFailed)


def test_too_many_capability_lines() -> None:
    (failed,) = login().receive_data(b'"X"\r\n' * 300)
    assert isinstance(failed, BackendLoginFailed)


def test_no_sieve_line_learns_nothing() -> None:
    dialogue = login()
    dialogue.receive_data(b'"VERSION" "1.0"\r\nOK\r\n')
    assert dialogue.receive_data(b"OK\r\n") == [BackendLoggedIn(None, b"")]


def test_parse_response_and_refusal() -> None:
    assert parse_response([Atom(b"ok")]) == (b"OK", None, b"")
    assert parse_response([String(b"SIEVE")]) is None
    assert parse_response([]) is None
    assert parse_response([Atom(b"NO"), Atom(b"("), Atom(b"TRYLATER"), Atom(b")"),
                           String(b"later")]) == (b"NO", b"TRYLATER", b"later")
    error = refusal(b"NO", b"TRYLATER", b"")
    assert isinstance(error, BackendRefused) and error.client_text() == "Login refused"


def test_xclient_when_offered_with_the_clients_address() -> None:
    client_id = (("x-originating-ip", "192.0.2.9"), ("x-originating-port", "4444"),
                 ("x-session-id", "12-3"), ("x-proxy-ttl", "4"))
    dialogue = SieveBackendLogin(Credentials("alice", Secret(b"s3cret")), "alice",
                                 starttls=False, client_id=client_id)
    assert dialogue.receive_data(GREETING) == [
        SendToBackend(b"XCLIENT ADDR=192.0.2.9 PORT=4444 SESSION=12-3 TTL=4\r\n")]
    assert not dialogue.credentials_sent
    # OK "Updated", or NO from a backend that does not trust us: the login goes on
    assert dialogue.receive_data(b'NO "not trusted"\r\n') == [SendToBackend(AUTH)]
    # not offered: no XCLIENT
    dialogue = SieveBackendLogin(Credentials("alice", Secret(b"s3cret")), "alice",
                                 starttls=False, client_id=client_id)
    assert dialogue.receive_data(GREETING.replace(b'"XCLIENT"\r\n', b"")) == [
        SendToBackend(AUTH)]


# -- passwords from SASL LOGIN, and tokens (OAUTHBEARER, XOAUTH2: issue 16) ------------------

BEARER = b"n,a=alice,\x01host=sieve.example.org\x01port=4190\x01auth=Bearer ya29.tok\x01\x01"
XOAUTH = b"user=alice\x01auth=Bearer ya29.tok\x01\x01"
#: Dovecot's error challenge to a token its oauth2 passdb refuses
JSON_ERROR = b64encode(b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}')


def token_login(message: bytes, name: str = "alice") -> SieveBackendLogin:
    parse = parse_oauthbearer if message.startswith(b"n,") else parse_xoauth2
    return SieveBackendLogin(parse(message), name, starttls=False)


def test_a_sasl_login_client_logs_in_with_plain() -> None:
    # As the IMAP and POP3 dialogues do: the password is the password, whatever
    # mechanism carried it to the proxy.
    dialogue = SieveBackendLogin(Credentials("alice", Secret(b"s3cret"), "", "LOGIN"), "alice",
                                 starttls=False)
    assert dialogue.receive_data(GREETING) == [SendToBackend(AUTH)]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("message", "mechanism"), [(BEARER, b"OAUTHBEARER"),
                                                    (XOAUTH, b"XOAUTH2")])
def test_a_token_is_replayed_as_the_initial_response(message: bytes, mechanism: bytes,
                                                     split: bool) -> None:
    dialogue = token_login(message)
    assert feed(dialogue, GREETING, split) == [SendToBackend(
        b'AUTHENTICATE "' + mechanism + b'" "' + b64encode(message) + b'"\r\n')]
    assert dialogue.credentials_sent
    assert feed(dialogue, b'OK "Logged in."\r\n', split) == [BackendLoggedIn(LEARNT, b"")]


def test_a_token_for_a_user_the_backend_knows_by_another_name() -> None:
    dialogue = token_login(XOAUTH, name="alice@store1")
    assert dialogue.receive_data(GREETING) == [SendToBackend(
        b'AUTHENTICATE "XOAUTH2" "'
        + b64encode(b"user=alice@store1\x01auth=Bearer ya29.tok\x01\x01") + b'"\r\n')]


def test_a_long_token_goes_as_a_literal() -> None:
    message = b"user=alice\x01auth=Bearer " + b"t" * 2000 + b"\x01\x01"
    encoded = b64encode(message)
    assert token_login(message).receive_data(GREETING) == [SendToBackend(
        b'AUTHENTICATE "XOAUTH2" {%d+}\r\n' % len(encoded) + encoded + b"\r\n")]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("message", "dummy"), [(BEARER, b'"AQ=="\r\n'), (XOAUTH, b'""\r\n')])
def test_the_backends_error_challenge_becomes_token_refused(message: bytes, dummy: bytes,
                                                            split: bool) -> None:
    # RFC 7628 section 3.2.2-3.2.3: the challenge, our dummy response, then NO.
    dialogue = token_login(message)
    feed(dialogue, GREETING, split)
    assert feed(dialogue, b'"' + JSON_ERROR + b'"\r\n', split) == [SendToBackend(dummy)]
    out = feed(dialogue, b'NO "Authentication failed."\r\n', split)
    assert len(out) == 1 and isinstance(out[0], BackendLoginFailed)
    error = out[0].error
    assert isinstance(error, TokenRefused) and error.challenge == JSON_ERROR
    assert "ya29" not in repr(out) and "ya29" not in repr(dialogue.__dict__)


def test_a_challenge_as_a_literal_and_one_that_is_not_base64() -> None:
    dialogue = token_login(BEARER)
    dialogue.receive_data(GREETING)
    assert dialogue.receive_data(b"{%d}\r\n" % len(JSON_ERROR) + JSON_ERROR + b"\r\n") == [
        SendToBackend(b'"AQ=="\r\n')]
    [failed] = dialogue.receive_data(b'NO "Authentication failed."\r\n')
    assert isinstance(failed, BackendLoginFailed) and isinstance(failed.error, TokenRefused)
    # not base64: never shown to a client; ours is shown instead (sasl.failure_challenge)
    dialogue = token_login(BEARER)
    dialogue.receive_data(GREETING)
    assert dialogue.receive_data(b'"{not base64}"\r\n') == [SendToBackend(b'"AQ=="\r\n')]
    [failed] = dialogue.receive_data(b'NO "Authentication failed."\r\n')
    assert isinstance(failed, BackendLoginFailed)
    assert type(failed.error) is AuthenticationFailed


def test_a_second_challenge_or_one_to_a_password_is_a_protocol_error() -> None:
    dialogue = token_login(BEARER)
    dialogue.receive_data(GREETING)
    dialogue.receive_data(b'"' + JSON_ERROR + b'"\r\n')
    [failed] = dialogue.receive_data(b'"' + JSON_ERROR + b'"\r\n')
    assert isinstance(failed, BackendLoginFailed)
    assert isinstance(failed.error, BackendProtocolError)
    dialogue = login()
    dialogue.receive_data(GREETING)
    [failed] = dialogue.receive_data(b'""\r\n')
    assert isinstance(failed, BackendLoginFailed)
    assert isinstance(failed.error, BackendProtocolError)


def test_a_pass_through_code_wins_over_the_challenge() -> None:
    dialogue = token_login(BEARER)
    dialogue.receive_data(GREETING)
    dialogue.receive_data(b'"' + JSON_ERROR + b'"\r\n')
    [failed] = dialogue.receive_data(b'NO (TRYLATER) "Try later."\r\n')
    assert isinstance(failed, BackendLoginFailed) and isinstance(failed.error, BackendRefused)

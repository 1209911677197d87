"""Tests for imapproxy.managesieve: the sans-IO pre-login ManageSieve session (framing:
test_sievewire.py).

Each test is a transcript of client bytes and login results against the actions that
come out; ``check`` runs it fed whole and fed one byte at a time, and requires the same
(merged) output from both. Hypothesis checks that no input makes the session raise and
that what it holds stays bounded.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transcripts import LoginFails, LoginOk, Step, TimesOut
from transcripts import run as run_steps

from imapproxy.actions import Close, Login, SendToClient, Splice, StartClientTLS
from imapproxy.config import Limits
from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import (
    AuthenticationFailed,
    BackendRefused,
    BackendUnavailable,
    TokenRefused,
    UserNotFound,
)
from imapproxy.managesieve import BASE_SIEVE, ManageSieveSession, SieveCapabilities, State
from imapproxy.sasl import ERROR_CHALLENGES, parse_oauthbearer, parse_xoauth2

TLS = {"tls_active": True, "starttls_available": False, "plaintext_auth": False}
STARTTLS = {"tls_active": False, "starttls_available": True, "plaintext_auth": False}
PLAINTEXT_OK = {"tls_active": False, "starttls_available": True, "plaintext_auth": True}

CAPS_TLS = (b'"IMPLEMENTATION" "imapproxy"\r\n"SASL" "PLAIN LOGIN"\r\n' + BASE_SIEVE
            + b'"VERSION" "1.0"\r\n')
CAPS_PLAIN = (b'"IMPLEMENTATION" "imapproxy"\r\n"SASL" ""\r\n' + BASE_SIEVE
              + b'"STARTTLS"\r\n"VERSION" "1.0"\r\n')
ALICE = b64encode(b"\0alice\0secret")


def creds(user: str = "alice", password: bytes = b"secret") -> Credentials:
    return Credentials(user, Secret(password), "", "PLAIN")


def check(steps: list[Step], expected: list[Any], *, options: dict[str, bool] = TLS,
          limits: Limits | None = None, greet: bool = False,
          mechanisms: tuple[str, ...] | None = None) -> ManageSieveSession:
    """Run ``steps`` whole and byte by byte; both must give ``expected``."""
    session = None
    for split in (False, True):
        extra: dict[str, Any] = {"limits": limits} if limits is not None else {}
        if mechanisms is not None:
            extra["mechanisms"] = mechanisms
        session = ManageSieveSession(**options, **extra)  # type: ignore[arg-type]
        assert run_steps(session, steps, split=split, greet=greet) == expected, f"split={split}"
    assert session is not None
    return session


def test_greeting_is_the_capability_list_then_ok() -> None:
    check([], [SendToClient(CAPS_TLS + b'OK "ManageSieve proxy ready"\r\n')], greet=True)
    # RFC 5804 section 1.7 / 2.2: STARTTLS while not in TLS, and no SASL then.
    check([], [SendToClient(CAPS_PLAIN + b'OK "ManageSieve proxy ready"\r\n')],
          options=STARTTLS, greet=True)


def test_capability_noop_with_and_without_tag_and_logout() -> None:
    session = check(
        [b'capability\r\nNOOP\r\nNOOP "x\\"1"\r\nNOOP {2+}\r\nab\r\nLOGOUT\r\nNOOP\r\n'],
        [SendToClient(CAPS_TLS + b'OK "Capability completed"\r\nOK "NOOP completed"\r\n'
                      b'OK (TAG "x\\"1") "Done"\r\nOK (TAG "ab") "Done"\r\n'
                      b'OK "Logout completed"\r\n'), Close("logout")])
    assert session.state is State.CLOSED


def test_starttls_discards_pipelined_plaintext_and_sends_the_capabilities_again() -> None:
    # Fed whole only: bytes fed one by one after STARTTLS would be ones read after
    # the handshake, which count.
    session = ManageSieveSession(**STARTTLS)  # type: ignore[arg-type]
    assert session.receive_data(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n') == [
        SendToClient(b'OK "Begin TLS negotiation now"\r\n'), StartClientTLS(),
        SendToClient(CAPS_TLS + b'OK "TLS negotiation done"\r\n')]
    assert session.state is State.NOT_AUTHENTICATED and session.tls_active


def test_starttls_twice_or_with_arguments_is_refused() -> None:
    check([b"STARTTLS x\r\n", b"STARTTLS\r\n"],
          [SendToClient(b'NO "STARTTLS takes no arguments"\r\nNO "STARTTLS not available"\r\n')])


def test_no_authentication_before_tls() -> None:
    check([b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n'],
          [SendToClient(b'NO (ENCRYPT-NEEDED) "Authentication requires TLS, use STARTTLS"\r\n')],
          options=STARTTLS)
    # ... unless [tls] plaintext_auth allows it
    check([b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n'], [Login(creds())],
          options=PLAINTEXT_OK)


@pytest.mark.parametrize("command", [
    b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n',
    b'Authenticate PLAIN "' + ALICE + b'"\r\n',
    b'AUTHENTICATE "PLAIN" {%d+}\r\n' % len(ALICE) + ALICE + b"\r\n",
    b'AUTHENTICATE {5}\r\nPLAIN {%d}\r\n' % len(ALICE) + ALICE + b"\r\n",
])
def test_authenticate_with_an_initial_response(command: bytes) -> None:
    check([command], [Login(creds())])


def test_authenticate_with_a_continuation_quoted_or_literal() -> None:
    check([b'AUTHENTICATE "PLAIN"\r\n', b'"' + ALICE + b'"\r\n'],
          [SendToClient(b'""\r\n'), Login(creds())])
    check([b'AUTHENTICATE "PLAIN"\r\n', b"{%d+}\r\n" % len(ALICE) + ALICE + b"\r\n"],
          [SendToClient(b'""\r\n'), Login(creds())])


def test_authenticate_cancelled_or_malformed_response() -> None:
    check([b'AUTHENTICATE "PLAIN"\r\n"*"\r\nAUTHENTICATE "PLAIN"\r\nA B\r\n'
           b'AUTHENTICATE "PLAIN"\r\n"unterminated\r\nAUTHENTICATE "PLAIN"\r\nATOM\r\n'],
          [SendToClient(b'""\r\nNO "Authentication cancelled"\r\n""\r\n'
                        b'NO "AUTHENTICATE: expected one string"\r\n""\r\n'
                        b'NO "AUTHENTICATE: unterminated quoted string"\r\n""\r\n'
                        b'NO "AUTHENTICATE: expected one string"\r\n')],
          limits=Limits(max_bad_commands=10))


@pytest.mark.parametrize(("payload", "reply"), [
    (b"!!", b'NO "AUTHENTICATE: Invalid base64 in SASL response"\r\n'),
    (b64encode(b"\0alice\0pa\0ss"), b'NO "AUTHENTICATE: Malformed SASL PLAIN response"\r\n'),
    (b"", b'NO "AUTHENTICATE: Malformed SASL PLAIN response"\r\n'),
    # RFC 4616: an authzid other than the user is refused like a wrong password
    (b64encode(b"root\0alice\0secret"), b'NO "Authentication failed"\r\n'),
])
def test_bad_sasl_responses(payload: bytes, reply: bytes) -> None:
    check([b'AUTHENTICATE "PLAIN" "' + payload + b'"\r\n'], [SendToClient(reply)])


def test_other_mechanisms_and_bad_arguments() -> None:
    check([b'AUTHENTICATE "DIGEST-MD5"\r\nAUTHENTICATE\r\nAUTHENTICATE "PLAIN" x\r\n'],
          [SendToClient(b'NO "Unsupported authentication mechanism"\r\n'
                        b'NO "AUTHENTICATE needs a mechanism and at most one response"\r\n'
                        b'NO "AUTHENTICATE needs a mechanism and at most one response"\r\n')])


def test_unknown_commands_need_login_commands_and_bad_syntax() -> None:
    check([b'LISTSCRIPTS\r\nFROB\r\n"quoted"\r\n\r\nNOOP a b\r\nCAPABILITY x\r\nLOGOUT x\r\n'
           b'NOOP "x\0"\r\n'],
          [SendToClient(b'NO "Authenticate first"\r\nNO "Unknown command"\r\n'
                        b'NO "Missing command"\r\nNO "Missing command"\r\n'
                        b'NO "NOOP takes one optional string"\r\n'
                        b'NO "CAPABILITY takes no arguments"\r\nNO "LOGOUT takes no arguments"\r\n'
                        b'NO "NUL, CR or LF in a quoted string"\r\n')],
          limits=Limits(max_bad_commands=20))


def test_too_many_bad_commands_end_with_bye() -> None:
    check([b"A\r\nB\r\nC\r\nD\r\n"],
          [SendToClient(b'NO "Unknown command"\r\nNO "Unknown command"\r\n'
                        b'BYE "Unknown command; too many invalid commands"\r\n'),
           Close("Unknown command; too many invalid commands")],
          limits=Limits(max_bad_commands=3))


def test_long_line_is_refused_and_a_huge_literal_ends_the_session() -> None:
    limits = Limits(max_line=512, max_preauth_literal=256)
    check([b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n"],
          [SendToClient(b'NO "Line too long"\r\nOK "NOOP completed"\r\n')], limits=limits)
    check([b'AUTHENTICATE "PLAIN" {257+}\r\n' + b"x" * 300],
          [SendToClient(b'BYE "Literal too large"\r\n'), Close("Literal too large")],
          limits=limits)


def test_long_line_as_the_sasl_response() -> None:
    check([b'AUTHENTICATE "PLAIN"\r\n', b'"' + b"x" * 600 + b'"\r\n', b"NOOP\r\n"],
          [SendToClient(b'""\r\nNO "Line too long"\r\nOK "NOOP completed"\r\n')],
          limits=Limits(max_line=512))


def test_http_request_closes_without_a_word() -> None:
    check([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], [Close("HTTP request")])


def test_login_success_learns_the_backends_sieve_list_and_splices() -> None:
    learnt = b'"SIEVE" "fileinto vacation"\r\n"NOTIFY" "mailto"\r\n'
    cache = SieveCapabilities()
    session = ManageSieveSession(**TLS, sieve=cache)  # type: ignore[arg-type]
    actions = session.receive_data(b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\nLISTSCRIPTS\r\n')
    assert actions == [Login(creds())]
    assert session.receive_data(b'GETSCRIPT "a"\r\n') == []
    assert session.login_succeeded(learnt) == [SendToClient(b'OK "Logged in"\r\n'),
                                               Splice(b'LISTSCRIPTS\r\nGETSCRIPT "a"\r\n')]
    assert cache.lines == learnt
    # the next client's greeting says it
    other = ManageSieveSession(**TLS, sieve=cache)  # type: ignore[arg-type]
    greeting = other.start()[0]
    assert isinstance(greeting, SendToClient) and learnt in greeting.data
    # nothing learnt (a backend without SIEVE) keeps what was known
    cache.learn(None)
    assert cache.lines == learnt


def test_login_failures_no_with_codes_and_a_referral_bye() -> None:
    login = b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n'
    check([login, LoginFails(UserNotFound()), b"NOOP\r\n"],
          [Login(creds()), SendToClient(b'NO "Authentication failed"\r\nOK "NOOP completed"\r\n')])
    check([login, LoginFails(BackendUnavailable("refused"))],
          [Login(creds()), SendToClient(
              b'NO (TRYLATER) "Service temporarily unavailable, try again later"\r\n')])
    weak = BackendRefused("UNAVAILABLE", "too weak", sieve_code="AUTH-TOO-WEAK")
    check([login, LoginFails(weak)],
          [Login(creds()), SendToClient(b'NO (AUTH-TOO-WEAK) "too weak"\r\n')])
    check([login, LoginFails(BackendRefused("UNAVAILABLE", "go there", bye=True,
                                            sieve_code='REFERRAL "sieve://b.example"'))],
          [Login(creds()),
           SendToClient(b'BYE (REFERRAL "sieve://b.example") "go there"\r\n'),
           Close("backend said BYE")])


def test_too_many_failed_logins() -> None:
    login = b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n'
    check([login, LoginFails(AuthenticationFailed()), login, LoginFails(AuthenticationFailed())],
          [Login(creds()), SendToClient(b'NO "Authentication failed"\r\n'), Login(creds()),
           SendToClient(b'NO "Authentication failed"\r\nBYE "Too many failed logins"\r\n'),
           Close("too many failed logins")],
          limits=Limits(max_failed_logins=2))


def test_bytes_during_login_are_held_bounded() -> None:
    limits = Limits(max_line=512, max_preauth_literal=256)
    session = ManageSieveSession(**TLS, limits=limits)  # type: ignore[arg-type]
    assert session.receive_data(b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n') == [Login(creds())]
    assert session.receive_data(b"x" * 700) == []
    assert session.receive_data(b"x" * 100) == [
        SendToClient(b'BYE "Too much data pipelined during login"\r\n'),
        Close("Too much data pipelined during login")]
    assert session.login_succeeded(None) == []
    assert session.login_failed(AuthenticationFailed()) == []


def test_timeout_and_shutdown() -> None:
    check([TimesOut()], [SendToClient(b'BYE "Autologout; idle for too long"\r\n'),
                         Close("pre-auth timeout")])
    session = ManageSieveSession(**TLS)  # type: ignore[arg-type]
    assert session.shutdown() == [
        SendToClient(b'BYE (TRYLATER) "Server shutting down"\r\n'), Close("shutdown")]
    assert session.receive_data(b"NOOP\r\n") == []


def test_login_ok_step_through_the_transcript_runner() -> None:
    check([b'AUTHENTICATE "PLAIN" "' + ALICE + b'"\r\n', LoginOk(None)],
          [Login(creds()), SendToClient(b'OK "Logged in"\r\n'), Splice(b"")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"NOOP\r\n", b'AUTHENTICATE "PLAIN"\r\n', b'"' + ALICE + b'"\r\n',
                     b"{3+}\r\nabc", b"STARTTLS\r\n", b"{9999+}\r\n", b"\r\n", b'"*"\r\n',
                     b'AUTHENTICATE "LOGIN"\r\n', b'"Ym9i"\r\n', b'"AQ=="\r\n',
                     b'AUTHENTICATE "XOAUTH2" "dXNlcj1ib2IBYXV0aD1CZWFyZXIgdAEB"\r\n',
                     b'AUTHENTICATE "OAUTHBEARER"\r\n'])),
    max_size=20), st.booleans())
def test_no_input_makes_the_session_raise_and_holding_is_bounded(chunks: list[bytes],
                                                                 token_refused: bool) -> None:
    limits = Limits(max_line=512, max_preauth_literal=256)
    session = ManageSieveSession(**PLAINTEXT_OK, limits=limits,  # type: ignore[arg-type]
                                 mechanisms=("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"))
    for chunk in chunks:
        session.receive_data(chunk)
        assert session._reader.buffered <= session._max_held + 2
        if session.state is State.LOGGING_IN:
            session.login_failed(TokenRefused(b"eyJ9") if token_refused
                                 else AuthenticationFailed())


# -- AUTHENTICATE "LOGIN" (RFC 5804 section 2.1: challenges and responses are strings) -----

USERNAME_PROMPT = b'"VXNlcm5hbWU6"\r\n'  # "Username:"
PASSWORD_PROMPT = b'"UGFzc3dvcmQ6"\r\n'  # "Password:"


def login_creds(user: str, password: bytes) -> Login:
    return Login(Credentials(user, Secret(password), "", "LOGIN"))


def test_authenticate_login_with_quoted_and_literal_continuations() -> None:
    session = check(
        [b'AUTHENTICATE "LOGIN"\r\n', b'"' + b64encode(b"bob") + b'"\r\n',
         b"{%d+}\r\n" % len(b64encode(b"pass word")) + b64encode(b"pass word") + b"\r\n",
         LoginOk(None)],
        [SendToClient(USERNAME_PROMPT + PASSWORD_PROMPT), login_creds("bob", b"pass word"),
         SendToClient(b'OK "Logged in"\r\n'), Splice(b"")])
    assert session.state is State.RELAYING


def test_authenticate_login_with_an_initial_response() -> None:
    check([b'AUTHENTICATE "LOGIN" "' + b64encode(b"bob") + b'"\r\n',
           b'"' + b64encode(b"pw") + b'"\r\n'],
          [SendToClient(PASSWORD_PROMPT), login_creds("bob", b"pw")])


@pytest.mark.parametrize(("lines", "reply"), [
    ([b'"*"\r\n'], b'NO "Authentication cancelled"\r\n'),
    ([b'"' + b64encode(b"bob") + b'"\r\n', b'"*"\r\n'],
     PASSWORD_PROMPT + b'NO "Authentication cancelled"\r\n'),
    ([b'""\r\n'], b'NO "AUTHENTICATE: Empty user name"\r\n'),
    ([b'"' + b64encode(b"bob") + b'"\r\n', b'""\r\n'],
     PASSWORD_PROMPT + b'NO "AUTHENTICATE: Empty password"\r\n'),
    ([b'"b@d!"\r\n'], b'NO "AUTHENTICATE: Invalid base64 in SASL response"\r\n'),
    ([b"ATOM\r\n"], b'NO "AUTHENTICATE: expected one string"\r\n'),
])
def test_authenticate_login_refusals(lines: list[bytes], reply: bytes) -> None:
    session = check([b'AUTHENTICATE "LOGIN"\r\n', *lines, b"NOOP\r\n"],
                    [SendToClient(USERNAME_PROMPT + reply + b'OK "NOOP completed"\r\n')])
    assert session.state is State.NOT_AUTHENTICATED


def test_a_mechanism_not_listed_is_refused_and_not_offered() -> None:
    check([b'AUTHENTICATE "LOGIN"\r\nAUTHENTICATE "XOAUTH2" "' + b64encode(XOAUTH_MESSAGE)
           + b'"\r\n'],
          [SendToClient(b'NO "Unsupported authentication mechanism"\r\n' * 2)],
          mechanisms=("PLAIN",))
    session = ManageSieveSession(**TLS, mechanisms=("PLAIN",))  # type: ignore[arg-type]
    assert b'"SASL" "PLAIN"\r\n' in session.capabilities()


# -- OAUTHBEARER and XOAUTH2 ----------------------------------------------------------------

TOKENS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
BEARER_MESSAGE = b"n,a=bob,\x01host=sieve.example.org\x01port=4190\x01auth=Bearer ya29.tok\x01\x01"
XOAUTH_MESSAGE = b"user=bob\x01auth=Bearer ya29.tok\x01\x01"
JSON_ERROR = b64encode(b'{"status":"invalid_token","scope":"mail"}')


def token_login(message: bytes) -> Login:
    parse = parse_oauthbearer if message.startswith(b"n,") else parse_xoauth2
    return Login(parse(message))


def authenticate(message: bytes) -> bytes:
    mechanism = b"OAUTHBEARER" if message.startswith(b"n,") else b"XOAUTH2"
    return b'AUTHENTICATE "' + mechanism + b'" "' + b64encode(message) + b'"\r\n'


def test_token_mechanisms_are_in_the_sasl_line_when_listed() -> None:
    session = ManageSieveSession(**TLS, mechanisms=TOKENS)  # type: ignore[arg-type]
    assert b'"SASL" "PLAIN LOGIN OAUTHBEARER XOAUTH2"\r\n' in session.capabilities()
    assert b"OAUTHBEARER" not in ManageSieveSession(**TLS).capabilities()  # type: ignore[arg-type]


@pytest.mark.parametrize("message", [BEARER_MESSAGE, XOAUTH_MESSAGE])
def test_token_with_initial_response(message: bytes) -> None:
    session = check([authenticate(message), LoginOk(None)],
                    [token_login(message), SendToClient(b'OK "Logged in"\r\n'), Splice(b"")],
                    mechanisms=TOKENS)
    assert session.state is State.RELAYING


def test_token_after_a_continuation_quoted_or_literal() -> None:
    check([b'AUTHENTICATE "OAUTHBEARER"\r\n', b'"' + b64encode(BEARER_MESSAGE) + b'"\r\n'],
          [SendToClient(b'""\r\n'), token_login(BEARER_MESSAGE)], mechanisms=TOKENS)
    encoded = b64encode(XOAUTH_MESSAGE)
    check([b"AUTHENTICATE XOAUTH2\r\n", b"{%d+}\r\n" % len(encoded) + encoded + b"\r\n"],
          [SendToClient(b'""\r\n'), token_login(XOAUTH_MESSAGE)], mechanisms=TOKENS)


def test_backend_error_challenge_is_relayed_then_the_no() -> None:
    # RFC 7628 section 3.2.2 in RFC 5804's words: the challenge is a string, the
    # client's dummy response a string, then NO.
    session = check(
        [authenticate(BEARER_MESSAGE), LoginFails(TokenRefused(JSON_ERROR)), b'"AQ=="\r\n',
         b"NOOP\r\n"],
        [token_login(BEARER_MESSAGE),
         SendToClient(b'"' + JSON_ERROR + b'"\r\nNO "Authentication failed"\r\n'
                      b'OK "NOOP completed"\r\n')],
        mechanisms=TOKENS)
    assert session.failed_logins == 1 and session.bad_commands == 0


@pytest.mark.parametrize("dummy", [b'"*"\r\n', b'""\r\n', b"junk junk\r\n",
                                   b'"unterminated\r\n', b'"' + b"x" * 600 + b'"\r\n'])
def test_the_no_follows_whatever_the_dummy_response(dummy: bytes) -> None:
    session = check(
        [authenticate(XOAUTH_MESSAGE), LoginFails(TokenRefused(JSON_ERROR)), dummy],
        [token_login(XOAUTH_MESSAGE),
         SendToClient(b'"' + JSON_ERROR + b'"\r\nNO "Authentication failed"\r\n')],
        mechanisms=TOKENS, limits=Limits(max_line=512))
    assert session.failed_logins == 1 and session.bad_commands == 0
    assert session.state is State.NOT_AUTHENTICATED


def test_the_dummy_response_pipelined_behind_the_token_is_read_after_the_failure() -> None:
    session = ManageSieveSession(**TLS, mechanisms=TOKENS)  # type: ignore[arg-type]
    assert session.receive_data(authenticate(BEARER_MESSAGE) + b'"AQ=="\r\nNOOP\r\n') == [
        token_login(BEARER_MESSAGE)]
    assert session.login_failed(TokenRefused(JSON_ERROR)) == [
        SendToClient(b'"' + JSON_ERROR + b'"\r\n'),
        SendToClient(b'NO "Authentication failed"\r\n'),
        SendToClient(b'OK "NOOP completed"\r\n')]


def test_too_many_refused_tokens_end_with_bye() -> None:
    check([authenticate(BEARER_MESSAGE), LoginFails(TokenRefused(JSON_ERROR)),
           b'"AQ=="\r\nNOOP\r\n'],
          [token_login(BEARER_MESSAGE),
           SendToClient(b'"' + JSON_ERROR + b'"\r\nNO "Authentication failed"\r\n'
                        b'BYE "Too many failed logins"\r\n'),
           Close("too many failed logins")],
          mechanisms=TOKENS, limits=Limits(max_failed_logins=1))


@pytest.mark.parametrize(("mechanism", "message"), [("OAUTHBEARER", BEARER_MESSAGE),
                                                    ("XOAUTH2", XOAUTH_MESSAGE)])
def test_a_user_the_proxy_refuses_gets_the_same_kind_of_challenge(
        mechanism: str, message: bytes) -> None:
    # An unknown user must look like a refused token (no user enumeration).
    check([authenticate(message), LoginFails(UserNotFound()), b'"AQ=="\r\n'],
          [token_login(message),
           SendToClient(b'"' + ERROR_CHALLENGES[mechanism] + b'"\r\n'
                        b'NO "Authentication failed"\r\n')],
          mechanisms=TOKENS)


def test_a_backend_that_is_down_is_no_token_problem() -> None:
    check([authenticate(BEARER_MESSAGE), LoginFails(BackendUnavailable())],
          [token_login(BEARER_MESSAGE), SendToClient(
              b'NO (TRYLATER) "Service temporarily unavailable, try again later"\r\n')],
          mechanisms=TOKENS)


@pytest.mark.parametrize(("command", "text"), [
    (b'AUTHENTICATE "OAUTHBEARER" "Zm9v!!"\r\n', b"Invalid base64 in SASL response"),
    (b'AUTHENTICATE "OAUTHBEARER" "' + b64encode(b"n,,\x01auth=Bearer x\x01\x01") + b'"\r\n',
     b"OAUTHBEARER needs the user in the GS2 header (a=)"),
    (b'AUTHENTICATE "XOAUTH2" "' + b64encode(b"user=bob\x01auth=Basic x\x01\x01") + b'"\r\n',
     b"Malformed bearer token"),
])
def test_malformed_token_messages_are_refused(command: bytes, text: bytes) -> None:
    session = check([command], [SendToClient(b'NO "AUTHENTICATE: ' + text + b'"\r\n')],
                    mechanisms=TOKENS)
    assert session.state is State.NOT_AUTHENTICATED


def test_tokens_never_in_an_actions_repr() -> None:
    session = ManageSieveSession(**TLS, mechanisms=TOKENS)  # type: ignore[arg-type]
    actions = session.receive_data(authenticate(BEARER_MESSAGE))
    assert b"ya29" not in repr(actions).encode() and "ya29" not in repr(actions)
    assert "ya29" not in repr(session.login_failed(TokenRefused(JSON_ERROR)))

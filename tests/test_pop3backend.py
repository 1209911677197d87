"""Tests for imapproxy.pop3backend: the proxy's login dialogue with a POP3 backend.

Each transcript alternates what the backend sends with what the dialogue must answer;
``check`` plays it fed whole and fed one byte at a time. A hypothesis property checks that
no backend output makes the dialogue raise.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapproxy.actions import (
    BackendLoggedIn,
    BackendLoginFailed,
    SendToBackend,
    StartBackendTLS,
)
from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendRefused,
    BackendUnavailable,
    ProxyError,
    TokenRefused,
)
from imapproxy.pop3backend import MAX_BACKEND_LINE, MAX_CAPA_LINES, Pop3BackendLogin, Step
from imapproxy.sasl import parse_oauthbearer, parse_xoauth2

GREETING = b"+OK store1 ready.\r\n"
CAPA_PLAIN = (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
              b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n")
CAPA_USER_ONLY = b"+OK Capability list follows\r\nTOP\r\nUSER\r\n.\r\n"

# A transcript: (backend bytes, or "TLS" for tls_started(), expected actions).
Exchange = tuple[bytes | str, list[Any]]


def dialogue(password: bytes = b"secret", login: str = "alice",
             starttls: bool = False) -> Pop3BackendLogin:
    return Pop3BackendLogin(Credentials("alice", Secret(password)), login, starttls=starttls)


def play(make: Callable[[], Pop3BackendLogin], transcript: list[Exchange], *,
         split: bool) -> Pop3BackendLogin:
    login = make()
    for data, expected in transcript:
        if data == "TLS":
            actions = login.tls_started()
        else:
            assert isinstance(data, bytes)
            chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
            actions = []
            for chunk in chunks:
                actions += login.receive_data(chunk)
        assert [normal(a) for a in actions] == [normal(a) for a in expected], data
    return login


def normal(action: Any) -> Any:
    """Errors compare by type, codes and text (exceptions have no value equality)."""
    if isinstance(action, BackendLoginFailed):
        e = action.error
        return ("failed", type(e), e.imap_code, e.pop3_code, e.public_text)
    return action


def check(transcript: list[Exchange], **options: Any) -> Pop3BackendLogin:
    play(lambda: dialogue(**options), transcript, split=True)
    return play(lambda: dialogue(**options), transcript, split=False)


def plain_token(login: bytes, password: bytes) -> bytes:
    return b64encode(b"\0" + login + b"\0" + password)


def failed(error: ProxyError) -> BackendLoginFailed:
    return BackendLoginFailed(error)


# -- happy paths ---------------------------------------------------------------------------------


def test_auth_plain_when_offered() -> None:
    login = check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
                   (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret")
                                               + b"\r\n")]),
                   (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")])])
    assert login.step is Step.DONE
    assert login.receive_data(b"+OK more\r\n") == []


def test_user_pass_when_sasl_plain_is_not_offered() -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_USER_ONLY, [SendToBackend(b"USER bob\r\n")]),
           (b"+OK\r\n", [SendToBackend(b"PASS pass with spaces\r\n")]),
           (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")])],
          login="bob", password=b"pass with spaces")


def test_user_pass_when_capa_is_unknown() -> None:
    # A plain RFC 1939 server answers CAPA with -ERR.
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (b"-ERR Unknown command\r\n", [SendToBackend(b"USER alice\r\n")]),
           (b"+OK\r\n", [SendToBackend(b"PASS secret\r\n")]),
           (b"+OK\r\n", [BackendLoggedIn(None, b"")])])


def test_stls_then_capa_after_the_handshake() -> None:
    check([(GREETING, [SendToBackend(b"STLS\r\n")]),
           (b"+OK Begin TLS negotiation now.\r\n", [StartBackendTLS()]),
           ("TLS", [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret")
                                       + b"\r\n")]),
           (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")])], starttls=True)


def test_bytes_after_the_login_reply_are_trailing() -> None:
    # Fed whole only: the adapter pauses the backend at BackendLoggedIn, so byte by byte
    # nothing more would be read until the relay takes over.
    play(dialogue, [(GREETING + CAPA_USER_ONLY, [SendToBackend(b"CAPA\r\n"),
                                                 SendToBackend(b"USER alice\r\n")]),
                    (b"+OK\r\n", [SendToBackend(b"PASS secret\r\n")]),
                    (b"+OK Logged in.\r\n+OK 2 320\r\n",
                     [BackendLoggedIn(None, b"+OK 2 320\r\n")])],
         split=False)


def test_long_credentials_skip_the_initial_response() -> None:
    # RFC 5034 section 4: no initial response if the command would exceed 255 octets.
    password = b"p" * 300
    token = plain_token(b"alice", password)
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN\r\n")]),
           (b"+ \r\n", [SendToBackend(token + b"\r\n")]),
           (b"+OK\r\n", [BackendLoggedIn(None, b"")])], password=password)


def test_dot_stuffed_capability_lines_and_lowercase_sasl() -> None:
    capa = b"+OK\r\n..X-DOTTED\r\nsasl plain\r\n.\r\n"
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (capa, [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret") + b"\r\n")])])


def test_password_with_nul_cannot_be_sent() -> None:
    # Not in SASL PLAIN (NUL separates its fields), and not on a PASS line either.
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [failed(AuthenticationFailed())])], password=b"a\0b")


# -- refusals ------------------------------------------------------------------------------------


def _refused(imap_code: str, pop3_code: str, text: str) -> BackendRefused:
    error = BackendRefused(imap_code, text)
    error.pop3_code = pop3_code
    return error


@pytest.mark.parametrize(("line", "error"), [
    (b"-ERR [AUTH] Authentication failed.\r\n", AuthenticationFailed()),
    (b"-ERR Authentication failed.\r\n", AuthenticationFailed()),
    (b"-ERR [SYS/TEMP] Temporary failure\r\n",
     _refused("UNAVAILABLE", "SYS/TEMP", "Temporary failure")),
    (b"-ERR [SYS/TEMP/DISK] Disk full\r\n", _refused("UNAVAILABLE", "SYS/TEMP", "Disk full")),
    (b"-ERR [AUTH/EXPIRED] Too old\r\n", AuthenticationFailed()),
    (b"-ERR [FOO] what\r\n", AuthenticationFailed()),
])
def test_login_refusals(line: bytes, error: ProxyError) -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret")
                                       + b"\r\n")]),
           (line, [failed(error)])])


@pytest.mark.parametrize(("line", "error"), [
    (b"-ERR [IN-USE] Mailbox is locked\r\n", _refused("IN-USE", "IN-USE", "Mailbox is locked")),
    (b"-ERR [in-use]\r\n", _refused("IN-USE", "IN-USE", "Login refused")),
    (b"-ERR [LOGIN-DELAY] Wait a bit\r\n", _refused("UNAVAILABLE", "LOGIN-DELAY", "Wait a bit")),
    (b"-ERR [SYS/PERM] Broken\r\n", _refused("UNAVAILABLE", "SYS/PERM", "Broken")),
])
def test_codes_passed_through_on_user_pass(line: bytes, error: ProxyError) -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_USER_ONLY, [SendToBackend(b"USER alice\r\n")]),
           (b"+OK\r\n", [SendToBackend(b"PASS secret\r\n")]),
           (line, [failed(error)])])


def test_user_refused() -> None:
    check([(GREETING + b"-ERR\r\n", [SendToBackend(b"CAPA\r\n"),
                                      SendToBackend(b"USER alice\r\n")]),
           (b"-ERR [AUTH] No such user\r\n", [failed(AuthenticationFailed())])])


def test_auth_continuation_refused_instead() -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN\r\n")]),
           (b"-ERR [SYS/TEMP] Busy\r\n", [failed(_refused("UNAVAILABLE", "SYS/TEMP", "Busy"))])],
          password=b"p" * 300)


def test_credentials_that_cannot_go_on_a_line() -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_USER_ONLY, [failed(AuthenticationFailed())])], password=b"a\r\nDELE 1")
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (b"-ERR\r\n", [failed(AuthenticationFailed())])], login="a\nb")


# -- broken or unwilling backends ----------------------------------------------------------------


@pytest.mark.parametrize(("transcript", "error"), [
    ([(b"-ERR [SYS/TEMP] Too many connections\r\n", None)], BackendUnavailable()),
    ([(b"* OK IMAP4rev1 ready\r\n", None)], BackendProtocolError()),
    ([(GREETING, [SendToBackend(b"CAPA\r\n")]), (b"hello\r\n", None)], BackendProtocolError()),
    ([(GREETING, [SendToBackend(b"CAPA\r\n")]), (CAPA_PLAIN, ...), (b"+ \r\n", None)],
     BackendProtocolError()),
    ([(GREETING, [SendToBackend(b"CAPA\r\n")]), (b"x" * (MAX_BACKEND_LINE + 2), None)],
     BackendProtocolError()),
    ([(GREETING, [SendToBackend(b"CAPA\r\n")]),
      (b"+OK\r\n" + b"X\r\n" * (MAX_CAPA_LINES + 1), None)], BackendProtocolError()),
])
def test_backend_failures(transcript: list[Any], error: ProxyError) -> None:
    *head, (last, _) = transcript
    steps: list[Exchange] = []
    for data, expected in head:
        if expected is ...:
            expected = [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret") + b"\r\n")]
        steps.append((data, expected))
    steps.append((last, [failed(error)]))
    login = check(steps)
    assert login.step is Step.DONE


def test_stls_refused_or_followed_by_injected_plaintext() -> None:
    check([(GREETING, [SendToBackend(b"STLS\r\n")]),
           (b"-ERR TLS not configured\r\n", [failed(BackendUnavailable())])], starttls=True)
    login = dialogue(starttls=True)
    assert login.receive_data(GREETING) == [SendToBackend(b"STLS\r\n")]
    # Plaintext behind the +OK would be read as if it had come through TLS.
    assert [normal(a) for a in login.receive_data(b"+OK\r\n+OK Logged in\r\n")] == [
        normal(failed(BackendProtocolError()))]


def test_data_during_the_tls_handshake_is_an_error() -> None:
    login = dialogue(starttls=True)
    login.receive_data(GREETING)
    assert login.receive_data(b"+OK\r\n") == [StartBackendTLS()]
    assert [normal(a) for a in login.receive_data(b"+OK\r\n")] == [
        normal(failed(BackendProtocolError()))]


def test_password_is_not_in_the_repr_of_actions() -> None:
    login = dialogue(password=b"hunter2")
    login.receive_data(GREETING)
    actions = login.receive_data(CAPA_USER_ONLY + b"+OK\r\n")
    assert actions[-1] == SendToBackend(b"PASS hunter2\r\n")
    assert "hunter2" not in repr(actions)


# -- property ------------------------------------------------------------------------------------

_LINES = st.sampled_from([GREETING, CAPA_PLAIN, CAPA_USER_ONLY, b"+OK\r\n", b"-ERR\r\n",
                          b"+ \r\n", b".\r\n", b"-ERR [IN-USE] x\r\n", b"-ERR [SYS/TEMP]\r\n",
                          b"\r\n", b"\n"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_LINES, st.binary(max_size=64), st.just("TLS")), max_size=20),
       st.booleans(), st.binary(max_size=300))
def test_dialogue_never_raises(inputs: list[Any], starttls: bool, password: bytes) -> None:
    login = dialogue(password=password, starttls=starttls)
    ended = 0
    for item in inputs:
        if item == "TLS":
            if login.step is not Step.TLS_HANDSHAKE:
                continue  # the adapter only reports TLS after StartBackendTLS
            actions = login.tls_started()
        else:
            actions = login.receive_data(item)
        for action in actions:
            assert isinstance(action, (SendToBackend, StartBackendTLS, BackendLoggedIn,
                                       BackendLoginFailed))
            if isinstance(action, (BackendLoggedIn, BackendLoginFailed)):
                ended += 1
            if isinstance(action, BackendLoginFailed):
                assert isinstance(action.error, ProxyError)
    assert ended <= 1
    assert ended == (login.step is Step.DONE)


def test_ok_instead_of_the_auth_continuation_is_an_error() -> None:
    check([(GREETING, [SendToBackend(b"CAPA\r\n")]),
           (CAPA_PLAIN, [SendToBackend(b"AUTH PLAIN\r\n")]),
           (b"+OK\r\n", [failed(BackendProtocolError())])], password=b"p" * 300)


def test_transitions_outside_the_table_are_bugs() -> None:
    login = dialogue()
    login.receive_data(b"-ERR go away\r\n")
    with pytest.raises(AssertionError, match="illegal transition"):
        login.tls_started()  # the dialogue is over


# -- XCLIENT: the client's address, where the backend offers it ----------------------------------

ORIGIN = (("x-originating-ip", "192.0.2.7"), ("x-originating-port", "40000"),
          ("x-connected-ip", "10.0.0.1"), ("x-session-id", "12-3"))
XCLIENT = b"XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=12-3\r\n"


def forwarding_dialogue(client_id: tuple[tuple[str, str | None], ...] = ORIGIN,
                        starttls: bool = False) -> Pop3BackendLogin:
    return Pop3BackendLogin(Credentials("alice", Secret(b"secret")), "alice",
                            starttls=starttls, client_id=client_id)


def test_xclient_when_the_greeting_offers_it_then_login() -> None:
    # Dovecot's pop3-login greets its login_trusted_networks with "[XCLIENT]".
    for split in (False, True):
        play(forwarding_dialogue, [
            (b"+OK [XCLIENT] store1 ready.\r\n", [SendToBackend(b"CAPA\r\n")]),
            (CAPA_PLAIN, [SendToBackend(XCLIENT)]),
            (b"+OK Updated\r\n", [SendToBackend(b"AUTH PLAIN " + plain_token(b"alice", b"secret")
                                                + b"\r\n")]),
            (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")]),
        ], split=split)


def test_xclient_from_capa_and_refused_xclient_does_not_stop_the_login() -> None:
    play(forwarding_dialogue, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n", [SendToBackend(XCLIENT)]),
        (b"-ERR You are not from trusted IP\r\n", [SendToBackend(b"USER alice\r\n")]),
    ], split=False)


def test_xclient_before_user_when_capa_is_unknown() -> None:
    play(forwarding_dialogue, [
        (b"+OK [XCLIENT] ready\r\n", [SendToBackend(b"CAPA\r\n")]),
        (b"-ERR what\r\n", [SendToBackend(XCLIENT)]),
        (b"+OK\r\n", [SendToBackend(b"USER alice\r\n")]),
    ], split=False)


def test_no_xclient_unless_offered_or_without_an_address() -> None:
    play(forwarding_dialogue, [(GREETING, [SendToBackend(b"CAPA\r\n")]),
                               (CAPA_USER_ONLY, [SendToBackend(b"USER alice\r\n")])], split=False)
    play(lambda: forwarding_dialogue(()), [
        (b"+OK [XCLIENT] ready\r\n", [SendToBackend(b"CAPA\r\n")]),
        (CAPA_USER_ONLY, [SendToBackend(b"USER alice\r\n")])], split=False)
    odd = (("x-originating-ip", "1.2.3.4 EVIL=1"), ("x-originating-port", None))
    play(lambda: forwarding_dialogue(odd), [
        (b"+OK [XCLIENT] ready\r\n", [SendToBackend(b"CAPA\r\n")]),
        (CAPA_USER_ONLY, [SendToBackend(b"USER alice\r\n")])], split=False)


def test_xclient_after_stls() -> None:
    play(lambda: forwarding_dialogue(starttls=True), [
        (b"+OK [XCLIENT] ready\r\n", [SendToBackend(b"STLS\r\n")]),
        (b"+OK Begin TLS\r\n", [StartBackendTLS()]),
        ("TLS", [SendToBackend(b"CAPA\r\n")]),
        (CAPA_USER_ONLY, [SendToBackend(XCLIENT)]),
        (b"+OK Updated\r\n", [SendToBackend(b"USER alice\r\n")]),
    ], split=False)


# -- tokens (OAUTHBEARER, XOAUTH2): the client's message replayed in AUTH ------------------

SHORT_BEARER = parse_oauthbearer(b"n,a=alice,\x01auth=Bearer t0k\x01\x01")
LONG_BEARER = parse_oauthbearer(b"n,a=alice,\x01auth=Bearer " + b"t" * 300 + b"\x01\x01")
XOAUTH = parse_xoauth2(b"user=alice\x01auth=Bearer t0k\x01\x01")
ERROR_JSON = b64encode(b'{"status":"invalid_token"}')


def token_dialogue(credentials: Credentials, login: str = "alice") -> Pop3BackendLogin:
    return Pop3BackendLogin(credentials, login, starttls=False)


def check_token(credentials: Credentials, transcript: list[Exchange]) -> None:
    play(lambda: token_dialogue(credentials), transcript, split=True)
    play(lambda: token_dialogue(credentials), transcript, split=False)


def encoded(credentials: Credentials) -> bytes:
    assert credentials.message is not None
    return b64encode(credentials.message.reveal())


def test_short_token_goes_as_initial_response() -> None:
    check_token(SHORT_BEARER, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (CAPA_PLAIN, [SendToBackend(b"AUTH OAUTHBEARER " + encoded(SHORT_BEARER) + b"\r\n")]),
        (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")]),
    ])


def test_long_token_waits_for_the_continuation() -> None:
    # RFC 5034 section 4: no initial response when the command would pass 255 octets.
    check_token(LONG_BEARER, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (CAPA_PLAIN, [SendToBackend(b"AUTH OAUTHBEARER\r\n")]),
        (b"+ \r\n", [SendToBackend(encoded(LONG_BEARER) + b"\r\n")]),
        (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")]),
    ])


def test_token_goes_in_auth_even_without_capa() -> None:
    check_token(XOAUTH, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (b"-ERR no CAPA\r\n", [SendToBackend(b"AUTH XOAUTH2 " + encoded(XOAUTH) + b"\r\n")]),
        (b"+OK Logged in.\r\n", [BackendLoggedIn(None, b"")]),
    ])


@pytest.mark.parametrize(("credentials", "dummy"), [(SHORT_BEARER, b"AQ=="), (XOAUTH, b"")])
def test_failed_token_answers_the_error_challenge_then_fails_with_it(
        credentials: Credentials, dummy: bytes) -> None:
    login = token_dialogue(credentials)
    login.receive_data(GREETING)
    login.receive_data(CAPA_PLAIN)
    assert login.receive_data(b"+ " + ERROR_JSON + b"\r\n") == [SendToBackend(dummy + b"\r\n")]
    (action,) = login.receive_data(b"-ERR [AUTH] Authentication failed.\r\n")
    assert isinstance(action, BackendLoginFailed)
    assert isinstance(action.error, TokenRefused) and action.error.challenge == ERROR_JSON
    assert login.step is Step.DONE


def test_token_refusal_with_a_passed_through_code_keeps_the_code() -> None:
    check_token(SHORT_BEARER, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (CAPA_PLAIN, [SendToBackend(b"AUTH OAUTHBEARER " + encoded(SHORT_BEARER) + b"\r\n")]),
        (b"+ " + ERROR_JSON + b"\r\n", [SendToBackend(b"AQ==\r\n")]),
        (b"-ERR [SYS/TEMP] later\r\n", [failed(BackendRefused("UNAVAILABLE", "later",
                                                               "SYS/TEMP"))]),
    ])


def test_a_second_challenge_or_junk_challenge() -> None:
    check_token(SHORT_BEARER, [
        (GREETING, [SendToBackend(b"CAPA\r\n")]),
        (CAPA_PLAIN, [SendToBackend(b"AUTH OAUTHBEARER " + encoded(SHORT_BEARER) + b"\r\n")]),
        (b"+ not json!\r\n", [SendToBackend(b"AQ==\r\n")]),
        (b"+ again\r\n", [failed(BackendProtocolError())]),
    ])
    login = token_dialogue(SHORT_BEARER)
    login.receive_data(GREETING + CAPA_PLAIN + b"+ not json!\r\n")
    (action,) = login.receive_data(b"-ERR [AUTH] no\r\n")
    assert type(action.error) is AuthenticationFailed  # type: ignore[attr-defined]


def test_token_message_names_the_backend_login() -> None:
    login = token_dialogue(XOAUTH, login="alice@example.org")
    login.receive_data(GREETING)
    (action,) = login.receive_data(CAPA_PLAIN)
    assert action == SendToBackend(b"AUTH XOAUTH2 " + b64encode(
        b"user=alice@example.org\x01auth=Bearer t0k\x01\x01") + b"\r\n")

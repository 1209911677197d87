"""Tests for imapproxy.pop3: the sans-IO pre-login POP3 session (framing: test_pop3wire.py).

Each test is a transcript of client bytes and login results against the actions that come
out. ``check`` runs every transcript twice, fed whole and fed one byte at a time, and
requires the same (merged) output from both. Hypothesis checks that no input makes the
session raise and that buffering stays bounded.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transcripts import LoginFails, LoginOk, Step, TimesOut, merged
from transcripts import run as run_steps

from imapproxy.actions import Close, Login, SendToClient, Splice, StartClientTLS
from imapproxy.config import Limits
from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import (
    AuthenticationFailed,
    BackendRefused,
    BackendUnavailable,
    DirectoryUnavailable,
    ProxyError,
    TokenRefused,
    UserNotFound,
)
from imapproxy.pop3 import (
    DEFAULT_LIMITS,
    MAX_PIPELINED_DURING_LOGIN,
    Pop3Session,
    State,
)
from imapproxy.sasl import ERROR_CHALLENGES, parse_oauthbearer, parse_xoauth2

# -- transcript machinery -------------------------------------------------------------------


def run(session: Pop3Session, steps: list[Step], *, split: bool) -> list[Any]:
    """A POP3 transcript starts with the greeting."""
    return run_steps(session, steps, split=split, greet=True)



class Options(TypedDict):
    tls_active: bool
    starttls_available: bool
    plaintext_auth: bool


IMPLICIT: Options = {"tls_active": True, "starttls_available": False, "plaintext_auth": False}
STARTTLS: Options = {"tls_active": False, "starttls_available": True, "plaintext_auth": False}
PLAINTEXT_OK: Options = {"tls_active": False, "starttls_available": True, "plaintext_auth": True}
NO_TLS_AT_ALL: Options = {"tls_active": False, "starttls_available": False, "plaintext_auth": False}

GREETING = SendToClient(b"+OK POP3 proxy ready\r\n")
TAIL_CAPS = b"RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION imapproxy\r\n.\r\n"
CAPA_HEAD = b"+OK Capability list follows\r\n"




def check(steps: list[Step], expected: list[Any], limits: Limits = DEFAULT_LIMITS,
          options: Options = PLAINTEXT_OK,
          mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")) -> Pop3Session:
    """Run the transcript whole and byte by byte; both must give ``expected``."""
    whole = Pop3Session(**options, limits=limits, mechanisms=mechanisms)
    assert run(whole, steps, split=False) == merged([GREETING, *expected])
    split = Pop3Session(**options, limits=limits, mechanisms=mechanisms)
    assert run(split, steps, split=True) == merged([GREETING, *expected])
    assert split.state is whole.state
    return whole


def send(data: bytes) -> SendToClient:
    return SendToClient(data)


def login(user: str, password: bytes, mechanism: str = "USER") -> Login:
    return Login(Credentials(user, Secret(password), "", mechanism))


def plain(authzid: bytes, user: bytes, password: bytes) -> bytes:
    return b64encode(authzid + b"\0" + user + b"\0" + password)


# -- greeting, CAPA, QUIT, unknown commands ----------------------------------------------------


def test_greeting_then_quit() -> None:
    session = check([b"QUIT\r\n"], [send(b"+OK Bye\r\n"), Close("quit")])
    assert session.state is State.CLOSED
    assert session.receive_data(b"CAPA\r\n") == []
    assert session.timed_out() == []


def test_capa_when_login_is_allowed_on_starttls_listener() -> None:
    check([b"CAPA\r\n"],
          [send(CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n" + TAIL_CAPS)])


def test_capa_before_tls_without_plaintext_hides_user_and_sasl() -> None:
    check([b"capa\r\n"], [send(CAPA_HEAD + b"STLS\r\n" + TAIL_CAPS)], options=STARTTLS)


def test_capa_on_implicit_tls_listener() -> None:
    check([b"CAPA\r\n"], [send(CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\n" + TAIL_CAPS)],
          options=IMPLICIT)


def test_capa_with_neither_tls_nor_plaintext() -> None:
    check([b"CAPA\r\n"], [send(CAPA_HEAD + TAIL_CAPS)], options=NO_TLS_AT_ALL)


@pytest.mark.parametrize(("line", "text"), [
    (b"NOOP", b"Log in first"),
    (b"STAT", b"Log in first"),
    (b"retr 1", b"Log in first"),
    (b"UIDL", b"Log in first"),
    (b"FROB", b"Unknown command"),
    (b"", b"Empty command"),
    (b"APOP alice 0123", b"APOP is not supported, use USER/PASS or AUTH PLAIN"),
    (b"PASS secret", b"Send USER first"),
    (b"CAPA x", b"CAPA takes no arguments"),
    (b"QUIT now", b"QUIT takes no arguments"),
    (b"STLS x", b"STLS takes no arguments"),
    (b"USER", b"USER needs a name"),
    (b"USER ", b"USER needs a name"),
    (b"AUTH CRAM-MD5", b"Unsupported authentication mechanism"),
])
def test_commands_refused_before_login(line: bytes, text: bytes) -> None:
    session = check([line + b"\r\n", b"QUIT\r\n"],
                    [send(b"-ERR " + text + b"\r\n+OK Bye\r\n"), Close("quit")])
    assert session.bad_commands == 1


def test_bare_lf_ends_a_line_too() -> None:
    check([b"CAPA\nQUIT\n"],
          [send(CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n" + TAIL_CAPS + b"+OK Bye\r\n"),
           Close("quit")])


def test_too_many_bad_commands_close() -> None:
    limits = Limits(max_bad_commands=3)
    check([b"A\r\nB\r\nC\r\nD\r\n"],
          [send(b"-ERR Unknown command\r\n-ERR Unknown command\r\n"
                b"-ERR Unknown command; too many invalid commands, closing\r\n"),
           Close("Unknown command; too many invalid commands, closing")],
          limits=limits)


def test_timeout_says_why_and_closes() -> None:
    session = check([b"CAPA\r\n", TimesOut()],
                    [send(CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n" + TAIL_CAPS),
                     send(b"-ERR Autologout; idle for too long\r\n"),
                     Close("Autologout; idle for too long")])
    assert session.state is State.CLOSED


# -- line limits ---------------------------------------------------------------------------------


def test_overlong_line_is_refused_and_skipped() -> None:
    limits = Limits(max_line=16)
    check([b"USER " + b"x" * 40 + b"\r\nQUIT\r\n"],
          [send(b"-ERR Line too long\r\n+OK Bye\r\n"), Close("quit")], limits=limits)


def test_line_at_the_limit_is_accepted() -> None:
    limits = Limits(max_line=6)
    check([b"QUIT  \r\n"], [send(b"-ERR QUIT takes no arguments\r\n")], limits=limits)
    check([b"QUIT   \r\nQUIT\r\n"],
          [send(b"-ERR Line too long\r\n+OK Bye\r\n"), Close("quit")], limits=limits)


def test_overlong_sasl_response_ends_the_exchange() -> None:
    limits = Limits(max_line=16)
    check([b"AUTH PLAIN\r\n", b"A" * 40 + b"\r\nQUIT\r\n"],
          [send(b"+ \r\n-ERR Line too long\r\n+OK Bye\r\n"), Close("quit")], limits=limits)


# -- STLS ------------------------------------------------------------------------------------------


def test_stls_discards_pipelined_plaintext() -> None:
    # RFC 2595 section 4: the USER/PASS pipelined behind STLS must never be acted on.
    # Fed whole only: byte by byte, the bytes after STLS would be the TLS stream.
    session = Pop3Session(**STARTTLS)
    session.start()
    assert session.receive_data(b"STLS\r\nUSER alice\r\nPASS secret\r\n") == [
        send(b"+OK Begin TLS negotiation now\r\n"), StartClientTLS()]
    assert session.tls_active and session.state is State.AUTHORIZATION
    assert session.receive_data(b"CAPA\r\n") == [
        send(CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\n" + TAIL_CAPS)]


def test_stls_twice_or_on_tls_listener_is_refused() -> None:
    check([b"STLS\r\n", b"STLS\r\n"],
          [send(b"+OK Begin TLS negotiation now\r\n"), StartClientTLS(),
           send(b"-ERR STLS not available\r\n")], options=STARTTLS)
    check([b"STLS\r\n"], [send(b"-ERR STLS not available\r\n")], options=IMPLICIT)


def test_plaintext_login_refused_before_tls_then_allowed_after() -> None:
    token = plain(b"", b"alice", b"pw")
    check([b"USER alice\r\nPASS pw\r\nAUTH PLAIN " + token + b"\r\nAUTH\r\n", b"STLS\r\n",
           b"USER alice\r\nPASS pw\r\n"],
          [send(b"-ERR [AUTH] TLS required: use STLS first\r\n" * 4
                + b"+OK Begin TLS negotiation now\r\n"), StartClientTLS(),
           send(b"+OK Send PASS\r\n"), login("alice", b"pw")], options=STARTTLS)


def test_plaintext_login_refused_without_any_tls() -> None:
    check([b"USER alice\r\n"], [send(b"-ERR [AUTH] TLS required\r\n")], options=NO_TLS_AT_ALL)


# -- USER/PASS -------------------------------------------------------------------------------------


def test_user_pass_login_and_splice_with_pipelined_commands() -> None:
    # RFC 2449 section 6.6: commands behind PASS belong to the backend, in order.
    session = check([b"USER alice\r\nPASS pass with  spaces \r\nSTAT\r\nLIST\r\n", LoginOk()],
                    [send(b"+OK Send PASS\r\n"), login("alice", b"pass with  spaces "),
                     send(b"+OK Logged in\r\n"), Splice(b"STAT\r\nLIST\r\n")])
    assert session.state is State.RELAYING
    assert session.receive_data(b"more") == []
    assert session.timed_out() == []


def test_user_then_other_command_forgets_the_name() -> None:
    check([b"USER alice\r\nCAPA\r\nPASS pw\r\n"],
          [send(b"+OK Send PASS\r\n" + CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n"
                + TAIL_CAPS + b"-ERR Send USER first\r\n")])


def test_user_twice_keeps_the_second_name() -> None:
    check([b"USER alice\r\nuser bob\r\npass pw\r\n"],
          [send(b"+OK Send PASS\r\n+OK Send PASS\r\n"), login("bob", b"pw")])


def test_empty_pass_is_refused() -> None:
    check([b"USER alice\r\nPASS\r\nPASS \r\n"],
          [send(b"+OK Send PASS\r\n-ERR PASS needs a password\r\n-ERR Send USER first\r\n")])


def test_wrong_password_then_retry() -> None:
    session = check([b"USER alice\r\nPASS bad\r\n", LoginFails(AuthenticationFailed()),
                     b"USER alice\r\nPASS good\r\n", LoginOk()],
                    [send(b"+OK Send PASS\r\n"), login("alice", b"bad"),
                     send(b"-ERR [AUTH] Authentication failed\r\n+OK Send PASS\r\n"),
                     login("alice", b"good"), send(b"+OK Logged in\r\n"), Splice(b"")])
    assert session.failed_logins == 1


def test_commands_pipelined_behind_a_failing_pass_are_answered_after_the_failure() -> None:
    check([b"USER alice\r\nPASS bad\r\nCAPA\r\nQUIT\r\n", LoginFails(UserNotFound())],
          [send(b"+OK Send PASS\r\n"), login("alice", b"bad"),
           send(b"-ERR [AUTH] Authentication failed\r\n" + CAPA_HEAD
                + b"USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n" + TAIL_CAPS + b"+OK Bye\r\n"),
           Close("quit")])


@pytest.mark.parametrize(("error", "line"), [
    (BackendUnavailable(),
     b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"),
    (DirectoryUnavailable(),
     b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"),
    (BackendRefused("IN-USE", "Mailbox is locked"), b"-ERR [AUTH] Mailbox is locked\r\n"),
    (ProxyError(), b"-ERR Internal error\r\n"),
])
def test_login_failure_replies(error: ProxyError, line: bytes) -> None:
    check([b"USER alice\r\nPASS pw\r\n", LoginFails(error)],
          [send(b"+OK Send PASS\r\n"), login("alice", b"pw"), send(line)])


def test_too_many_failed_logins_close() -> None:
    limits = Limits(max_failed_logins=2)
    fail = LoginFails(AuthenticationFailed())
    check([b"USER a\r\nPASS b\r\n", fail, b"USER a\r\nPASS c\r\nQUIT\r\n", fail],
          [send(b"+OK Send PASS\r\n"), login("a", b"b"),
           send(b"-ERR [AUTH] Authentication failed\r\n+OK Send PASS\r\n"), login("a", b"c"),
           send(b"-ERR [AUTH] Authentication failed\r\n"), Close("too many failed logins")],
          limits=limits)


def test_too_much_pipelined_during_login_closes() -> None:
    session = Pop3Session(**PLAINTEXT_OK)
    session.receive_data(b"USER a\r\nPASS b\r\n")
    assert session.state is State.LOGGING_IN
    assert session.receive_data(b"x" * MAX_PIPELINED_DURING_LOGIN) == []
    assert session.receive_data(b"x") == [
        SendToClient(b"-ERR Too much data pipelined during login\r\n"),
        Close("Too much data pipelined during login")]


def test_pipelining_bound_holds_in_the_same_read_as_the_pass() -> None:
    # As in IMAP: the bytes that came with the command starting the login count too.
    check([b"USER a\r\nPASS b\r\n" + b"x" * (MAX_PIPELINED_DURING_LOGIN + 1)],
          [send(b"+OK Send PASS\r\n"), login("a", b"b"),
           send(b"-ERR Too much data pipelined during login\r\n"),
           Close("Too much data pipelined during login")])


# -- AUTH PLAIN (RFC 5034) -------------------------------------------------------------------------


def test_auth_plain_with_initial_response() -> None:
    token = plain(b"", b"carol", "pässwörd".encode())
    check([b"AUTH PLAIN " + token + b"\r\nSTAT\r\n", LoginOk()],
          [login("carol", "pässwörd".encode(), "PLAIN"), send(b"+OK Logged in\r\n"),
           Splice(b"STAT\r\n")])


def test_auth_plain_without_initial_response() -> None:
    token = plain(b"bob", b"bob", b"pw")
    check([b"auth plain\r\n", token + b"\r\n"],
          [send(b"+ \r\n"), Login(Credentials("bob", Secret(b"pw"), "bob", "PLAIN"))])


def test_auth_plain_empty_initial_response_is_malformed() -> None:
    check([b"AUTH PLAIN =\r\n"], [send(b"-ERR AUTH: Malformed SASL PLAIN response\r\n")])


def test_auth_cancelled_with_star() -> None:
    session = check([b"AUTH PLAIN\r\n*\r\nQUIT\r\n"],
                    [send(b"+ \r\n-ERR AUTH cancelled\r\n+OK Bye\r\n"), Close("quit")])
    assert session.bad_commands == 1


def test_auth_bad_base64_and_foreign_authzid() -> None:
    session = check([b"AUTH PLAIN !!!\r\nAUTH PLAIN " + plain(b"admin", b"bob", b"pw") + b"\r\n"],
                    [send(b"-ERR AUTH: Invalid base64 in SASL response\r\n"
                          b"-ERR [AUTH] Authentication failed\r\n")])
    assert session.failed_logins == 1


def test_bare_auth_lists_mechanisms() -> None:
    check([b"AUTH\r\n"], [send(b"+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n")])


def test_user_given_then_auth_forgets_the_user() -> None:
    check([b"USER alice\r\nAUTH PLAIN\r\n*\r\nPASS pw\r\n"],
          [send(b"+OK Send PASS\r\n+ \r\n-ERR AUTH cancelled\r\n-ERR Send USER first\r\n")])


def test_login_succeeded_after_auth_splices_nothing_when_nothing_pipelined() -> None:
    session = Pop3Session(**IMPLICIT)
    assert session.receive_data(b"AUTH PLAIN " + plain(b"", b"a", b"b") + b"\r\n") == [
        login("a", b"b", "PLAIN")]
    assert session.login_succeeded(b"ignored") == [SendToClient(b"+OK Logged in\r\n"),
                                                   Splice(b"")]


# -- properties ------------------------------------------------------------------------------------

_WORDS = st.sampled_from([b"USER alice\r\n", b"PASS pw\r\n", b"CAPA\r\n", b"STLS\r\n",
                          b"AUTH PLAIN\r\n", b"AUTH PLAIN " + plain(b"", b"a", b"b") + b"\r\n",
                          b"*\r\n", b"QUIT\r\n", b"STAT\r\n", b"\r\n", b"\n", b"AUTH\r\n",
                          b"AUTH LOGIN\r\n", b"AUTH LOGIN YQ==\r\n", b"YQ==\r\n", b"AQ==\r\n",
                          b"AUTH OAUTHBEARER\r\n", b"AUTH XOAUTH2\r\n",
                          b64encode(b"user=a\x01auth=Bearer t\x01\x01") + b"\r\n",
                          b64encode(b"n,a=a,\x01auth=Bearer t\x01\x01") + b"\r\n"])
_INPUTS = st.one_of(_WORDS, st.binary(max_size=64), st.just(LoginOk()),
                    st.builds(LoginFails, st.sampled_from([AuthenticationFailed(),
                                                           BackendUnavailable(),
                                                           TokenRefused(b"eyJ9"),
                                                           UserNotFound()])),
                    st.just(TimesOut()))


@settings(max_examples=400, deadline=None)
@given(st.lists(_INPUTS, max_size=25), st.sampled_from([IMPLICIT, STARTTLS, PLAINTEXT_OK]))
def test_session_never_raises_and_stays_bounded(steps: list[Any], options: Options
                                                ) -> None:
    limits = Limits(max_line=48, max_bad_commands=1000, max_failed_logins=1000)
    session = Pop3Session(**options, limits=limits, mechanisms=TOKENS)
    session.start()
    for step in steps:
        # Login results only make sense while a login is running; the adapter guarantees it.
        if isinstance(step, (LoginOk, LoginFails)):
            if session.state is not State.LOGGING_IN:
                continue
            actions = (session.login_succeeded(None) if isinstance(step, LoginOk)
                       else session.login_failed(step.error))
        elif isinstance(step, TimesOut):
            actions = session.timed_out()
        else:
            actions = session.receive_data(step)
        for action in actions:
            assert isinstance(action, (SendToClient, StartClientTLS, Login, Splice, Close))
            if isinstance(action, SendToClient):
                assert action.data.endswith(b"\r\n")
        if session.state in (State.AUTHORIZATION, State.USER_GIVEN, State.AUTH_RESPONSE):
            assert session._lines.buffered <= limits.max_line + 1


def test_transitions_outside_the_table_are_bugs() -> None:
    session = Pop3Session(**PLAINTEXT_OK)
    with pytest.raises(AssertionError, match="illegal transition"):
        session.login_succeeded(None)  # no login is running


# -- HTTP requests (cross-protocol attacks, ALPACA) ----------------------------------------

HTTP_REQUEST = (b"Host: mail.example.org\r\nContent-Length: 40\r\n\r\n"
                b"USER <script>alert(document.cookie)</script>\r\n")


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"HEAD / HTTP/1.0", b"OPTIONS * HTTP/1.1",
    b"PUT / HTTP/1.1", b"DELETE / HTTP/1.1", b"CONNECT a:995 HTTP/1.1", b"PATCH / HTTP/1.1",
    b"TRACE / HTTP/1.1",
])
def test_an_http_request_line_closes_without_any_reply(first: bytes) -> None:
    """Not even -ERR: nothing answers the request, and the body is never read (ALPACA)."""
    for options in (IMPLICIT, STARTTLS, PLAINTEXT_OK):
        session = check([first + b"\r\n" + HTTP_REQUEST], [Close("HTTP request")],
                        options=options)
        assert session.state is State.CLOSED


def test_an_http_request_after_a_user_command_closes_too() -> None:
    check([b"USER alice\r\nPOST / HTTP/1.1\r\n" + HTTP_REQUEST],
          [send(b"+OK Send PASS\r\n"), Close("HTTP request")])


@pytest.mark.parametrize("line", [
    b"GET / HTTP", b"get / HTTP/1.1", b"GET  HTTP/1.1", b"PASS / HTTP/1.1x", b"XGET / HTTP/1.1",
])
def test_lines_that_are_not_http_requests_are_answered_as_usual(line: bytes) -> None:
    session = Pop3Session(**PLAINTEXT_OK)
    actions = session.receive_data(line + b"\r\n")
    assert len(actions) == 1 and isinstance(actions[0], SendToClient)
    assert actions[0].data.startswith(b"-ERR ")
    assert session.state is State.AUTHORIZATION


# -- AUTH LOGIN -------------------------------------------------------------------------------

USERNAME_PROMPT = b"+ VXNlcm5hbWU6\r\n"  # "Username:"
PASSWORD_PROMPT = b"+ UGFzc3dvcmQ6\r\n"  # "Password:"


def test_auth_login_two_steps() -> None:
    session = check([b"AUTH LOGIN\r\n", b64encode(b"alice") + b"\r\n",
                     b64encode(b"pass word") + b"\r\n", LoginOk()],
                    [send(USERNAME_PROMPT + PASSWORD_PROMPT), login("alice", b"pass word", "LOGIN"),
                     send(b"+OK Logged in\r\n"), Splice(b"")])
    assert session.state is State.RELAYING


def test_auth_login_with_initial_response() -> None:
    check([b"AUTH LOGIN " + b64encode(b"alice") + b"\r\n", b64encode(b"pw") + b"\r\n"],
          [send(PASSWORD_PROMPT), login("alice", b"pw", "LOGIN")])


def test_auth_login_cancelled_and_malformed() -> None:
    check([b"AUTH LOGIN\r\n", b"*\r\n", b"AUTH LOGIN\r\n", b"b@d!\r\n",
           b"AUTH LOGIN " + b64encode(b"alice") + b"\r\n", b"\r\n"],
          [send(USERNAME_PROMPT + b"-ERR AUTH cancelled\r\n" + USERNAME_PROMPT
                + b"-ERR AUTH: Invalid base64 in SASL response\r\n" + PASSWORD_PROMPT
                + b"-ERR AUTH: Empty password\r\n")])


def test_auth_login_not_offered_when_not_listed() -> None:
    check([b"AUTH LOGIN\r\n", b"AUTH\r\n"],
          [send(b"-ERR Unsupported authentication mechanism\r\n"
                b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n")], mechanisms=("PLAIN",))


# -- OAUTHBEARER and XOAUTH2 ------------------------------------------------------------------

TOKENS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
BEARER_MESSAGE = b"n,a=alice,\x01auth=Bearer ya29.tok\x01\x01"
XOAUTH_MESSAGE = b"user=alice\x01auth=Bearer ya29.tok\x01\x01"
JSON_ERROR = b64encode(b'{"status":"invalid_token"}')


def test_capa_lists_the_configured_mechanisms() -> None:
    session = Pop3Session(**IMPLICIT, mechanisms=TOKENS)
    assert b"SASL PLAIN LOGIN OAUTHBEARER XOAUTH2" in session.capabilities()
    assert not [c for c in Pop3Session(**IMPLICIT, mechanisms=()).capabilities()
                if c.startswith(b"SASL")]


def test_oauthbearer_with_initial_response_and_xoauth2_after_a_continuation() -> None:
    check([b"AUTH OAUTHBEARER " + b64encode(BEARER_MESSAGE) + b"\r\n",
           LoginFails(BackendUnavailable()),
           b"AUTH XOAUTH2\r\n", b64encode(XOAUTH_MESSAGE) + b"\r\n"],
          [Login(parse_oauthbearer(BEARER_MESSAGE)),
           send(b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n+ \r\n"),
           Login(parse_xoauth2(XOAUTH_MESSAGE))], mechanisms=TOKENS)


def test_backend_error_challenge_is_relayed_then_the_err() -> None:
    session = check(
        [b"AUTH OAUTHBEARER " + b64encode(BEARER_MESSAGE) + b"\r\n",
         LoginFails(TokenRefused(JSON_ERROR)), b"AQ==\r\n", b"CAPA\r\n"],
        [Login(parse_oauthbearer(BEARER_MESSAGE)),
         send(b"+ " + JSON_ERROR + b"\r\n-ERR [AUTH] Authentication failed\r\n" + CAPA_HEAD
              + b"USER\r\nSASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\nSTLS\r\n" + TAIL_CAPS)],
        mechanisms=TOKENS)
    assert session.failed_logins == 1


def test_an_overlong_dummy_response_still_ends_in_the_err() -> None:
    session = check(
        [b"AUTH XOAUTH2 " + b64encode(XOAUTH_MESSAGE) + b"\r\n", LoginFails(UserNotFound()),
         b"x" * 9000 + b"\r\n"],
        [Login(parse_xoauth2(XOAUTH_MESSAGE)),
         send(b"+ " + ERROR_CHALLENGES["XOAUTH2"] + b"\r\n-ERR [AUTH] Authentication failed\r\n")],
        mechanisms=TOKENS)
    assert session.failed_logins == 1 and session.state is State.AUTHORIZATION


def test_malformed_tokens_and_unlisted_mechanisms() -> None:
    check([b"AUTH OAUTHBEARER " + b64encode(b"n,,\x01auth=Bearer x\x01\x01") + b"\r\n",
           b"AUTH XOAUTH2 " + b64encode(XOAUTH_MESSAGE) + b"\r\n"],
          [send(b"-ERR AUTH: OAUTHBEARER needs the user in the GS2 header (a=)\r\n"
                b"-ERR Unsupported authentication mechanism\r\n")],
          mechanisms=("PLAIN", "OAUTHBEARER"))

"""Tests for imapproxy.imap: the sans-IO pre-login IMAP session.

Each test is a transcript of client bytes and login results against the actions that come
out. ``check`` runs every transcript twice, fed whole and fed one byte at a time, and
requires the same (merged) output from both.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transcripts import LoginFails, LoginOk, Step, TimesOut, merged, run

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
from imapproxy.imap import SERVER_ID, ImapSession, State
from imapproxy.sasl import ERROR_CHALLENGES, parse_oauthbearer, parse_xoauth2

# -- transcript machinery -------------------------------------------------------------------



IMPLICIT = {"tls_active": True, "starttls_available": False, "plaintext_auth": False}
STARTTLS = {"tls_active": False, "starttls_available": True, "plaintext_auth": False}
PLAINTEXT_OK = {"tls_active": False, "starttls_available": True, "plaintext_auth": True}

CAPS_IMPLICIT = b"IMAP4rev1 LITERAL+ SASL-IR ID IDLE AUTH=PLAIN AUTH=LOGIN"
CAPS_STARTTLS = b"IMAP4rev1 LITERAL+ SASL-IR ID IDLE STARTTLS LOGINDISABLED"
CAPS_PLAINTEXT_OK = b"IMAP4rev1 LITERAL+ SASL-IR ID IDLE STARTTLS AUTH=PLAIN AUTH=LOGIN"




def session_for(
    settings: dict[str, bool] | None = None, limits: Limits | None = None,
    mechanisms: tuple[str, ...] | None = None,
) -> ImapSession:
    kwargs: dict[str, Any] = dict(settings or IMPLICIT)
    if limits is not None:
        kwargs["limits"] = limits
    if mechanisms is not None:
        kwargs["mechanisms"] = mechanisms
    return ImapSession(**kwargs)


def check(
    steps: list[Step],
    expected: list[Any],
    settings: dict[str, bool] | None = None,
    limits: Limits | None = None,
    mechanisms: tuple[str, ...] | None = None,
) -> ImapSession:
    """Run the transcript whole and byte by byte; both must give ``expected``."""
    whole = session_for(settings, limits, mechanisms)
    assert run(whole, steps, split=False) == merged(expected)
    split = session_for(settings, limits, mechanisms)
    assert run(split, steps, split=True) == merged(expected)
    assert split.state is whole.state
    return whole


def send(data: bytes) -> SendToClient:
    return SendToClient(data)


def login(user: str, password: bytes, mechanism: str = "LOGIN", authzid: str = "",
          client_id: tuple[tuple[str, str | None], ...] = ()) -> Login:
    return Login(Credentials(user, Secret(password), authzid, mechanism), client_id)


def plain(authzid: bytes, user: bytes, password: bytes) -> bytes:
    return b64encode(authzid + b"\x00" + user + b"\x00" + password)


# -- greeting and capabilities --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "caps"),
    [
        pytest.param(STARTTLS, CAPS_STARTTLS, id="plain listener, STARTTLS, no plaintext auth"),
        pytest.param(IMPLICIT, CAPS_IMPLICIT, id="implicit TLS"),
        pytest.param(PLAINTEXT_OK, CAPS_PLAINTEXT_OK, id="plain listener, plaintext auth allowed"),
        pytest.param(
            {"tls_active": True, "starttls_available": True, "plaintext_auth": False},
            CAPS_IMPLICIT,
            id="implicit TLS never offers STARTTLS",
        ),
        pytest.param(
            {"tls_active": False, "starttls_available": False, "plaintext_auth": False},
            b"IMAP4rev1 LITERAL+ SASL-IR ID IDLE LOGINDISABLED",
            id="no TLS at all",
        ),
    ],
)
def test_greeting_and_capability(settings: dict[str, bool], caps: bytes) -> None:
    session = session_for(settings)
    assert session.start() == [send(b"* OK [CAPABILITY " + caps + b"] IMAP proxy ready\r\n")]
    check(
        [b"a1 CAPABILITY\r\n", b"a2 capability\r\n"],
        [send(b"* CAPABILITY " + caps + b"\r\na1 OK CAPABILITY completed\r\n"
              b"* CAPABILITY " + caps + b"\r\na2 OK CAPABILITY completed\r\n")],
        settings,
    )


def test_loginDisabled_means_no_auth_mechanism() -> None:  # noqa: N802
    caps = session_for(STARTTLS).capabilities().split()
    assert b"LOGINDISABLED" in caps
    assert not [c for c in caps if c.startswith(b"AUTH=")]
    caps = session_for(IMPLICIT).capabilities().split()
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps


def test_capability_takes_no_arguments() -> None:
    check([b"a CAPABILITY now\r\n"],
          [send(b"a BAD CAPABILITY: Unexpected extra arguments\r\n")])


def test_noop() -> None:
    check([b"a NOOP\r\nb noop\r\n"], [send(b"a OK NOOP completed\r\nb OK NOOP completed\r\n")])


def test_logout_says_bye_then_ok_then_closes() -> None:
    session = check(
        [b"a LOGOUT\r\n"],
        [send(b"* BYE Logging out\r\na OK LOGOUT completed\r\n"), Close("logout")],
    )
    assert session.state is State.CLOSED


def test_data_after_close_is_ignored() -> None:
    session = check(
        [b"a LOGOUT\r\nb NOOP\r\n", b"c LOGIN bob pw\r\n", TimesOut()],
        [send(b"* BYE Logging out\r\na OK LOGOUT completed\r\n"), Close("logout")],
    )
    assert session.receive_data(b"d NOOP\r\n") == []
    assert session.timed_out() == []


# -- ID -------------------------------------------------------------------------------------


def test_id_replies_and_remembers_the_client_id() -> None:
    session = check(
        [b'a ID ("name" "Thunderbird" "version" NIL)\r\nb LOGIN bob pw\r\n'],
        [send(SERVER_ID + b"a OK ID completed\r\n"),
         login("bob", b"pw", client_id=(("name", "Thunderbird"), ("version", None)))],
    )
    assert session.client_id == (("name", "Thunderbird"), ("version", None))


def test_id_nil() -> None:
    session = check([b"a ID NIL\r\n"], [send(SERVER_ID + b"a OK ID completed\r\n")])
    assert session.client_id == ()


def test_id_with_a_literal_value() -> None:
    session = check(
        [b'a ID ("name" {3}\r\n', b'm\xc3\xbc)\r\n'],
        [send(b"+ Ready for literal data\r\n" + SERVER_ID + b"a OK ID completed\r\n")],
    )
    assert session.client_id == (("name", "mü"),)


@pytest.mark.parametrize(
    "line",
    [b"a ID\r\n", b"a ID (\"name\")\r\n",
     b"a ID (" + b" ".join(b'"k%d" "v"' % i for i in range(31)) + b")\r\n"],
    ids=["no argument", "odd list", "31 pairs"],
)
def test_bad_id(line: bytes) -> None:
    session = session_for()
    out = run(session, [line], split=False)
    assert len(out) == 1 and out[0].data.startswith(b"a BAD ID: ")
    assert session.client_id == ()


def test_rejected_id_does_not_change_the_client_id() -> None:
    session = check([b'a ID ("k" "v") x\r\n'],
                    [send(b"a BAD ID: Unexpected extra arguments\r\n")])
    assert session.client_id == ()


# -- STARTTLS -------------------------------------------------------------------------------


def test_starttls_then_login_after_the_handshake() -> None:
    session = check(
        [b"a STARTTLS\r\n"],
        [send(b"a OK Begin TLS negotiation now\r\n"), StartClientTLS()],
        STARTTLS,
    )
    assert session.tls_active
    caps = session.capabilities().split()
    assert b"AUTH=PLAIN" in caps
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    # What the client sends now arrives through TLS.
    assert run(session, [b"b CAPABILITY\r\nc LOGIN bob pw\r\n"], split=False) == [
        send(b"* CAPABILITY " + CAPS_IMPLICIT + b"\r\nb OK CAPABILITY completed\r\n"),
        login("bob", b"pw"),
    ]


@pytest.mark.parametrize(
    "pipelined",
    [
        b"b LOGIN x y\r\n",
        b"b LOGIN x {1+}\r\ny\r\n",
        b"b LOGIN x {1}\r\n",
        b"b AUTHENTICATE PLAIN " + plain(b"", b"x", b"y") + b"\r\n",
        b"b LOGIN x",
        b"b NOOP\r\nc LOGOUT\r\n",
    ],
)
def test_bytes_pipelined_after_starttls_are_discarded(pipelined: bytes) -> None:
    # RFC 3501 section 6.2.1: plaintext sent behind STARTTLS must not be acted on. The
    # pipelined bytes arrive in the same read as the end of the STARTTLS line (later
    # reads go through TLS, so a one-byte split of them would change their meaning).
    data = b"a STARTTLS\r\n" + pipelined
    expected = [send(b"a OK Begin TLS negotiation now\r\n"), StartClientTLS()]
    cut = data.index(b"\n")
    chunkings = [[data], [data[i : i + 1] for i in range(cut)] + [data[cut:]]]
    for chunks in chunkings:
        session = session_for(STARTTLS)
        out = merged([a for chunk in chunks for a in session.receive_data(chunk)])
        assert out == expected
        assert session.state is State.NOT_AUTHENTICATED
        # The first command after the handshake is read from a clean slate.
        assert run(session, [b"z NOOP\r\n"], split=False) == [send(b"z OK NOOP completed\r\n")]


def test_starttls_not_offered_under_implicit_tls() -> None:
    check([b"a STARTTLS\r\n"], [send(b"a BAD STARTTLS not available\r\n")], IMPLICIT)


def test_starttls_only_once() -> None:
    session = session_for(STARTTLS)
    run(session, [b"a STARTTLS\r\n"], split=False)
    assert run(session, [b"b STARTTLS\r\n"], split=False) == [
        send(b"b BAD STARTTLS not available\r\n")
    ]


def test_starttls_takes_no_arguments() -> None:
    check([b"a STARTTLS now\r\n"], [send(b"a BAD STARTTLS: Unexpected extra arguments\r\n")],
          STARTTLS)


# -- LOGIN ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param([b"a LOGIN bob secret\r\n"], [login("bob", b"secret")], id="atoms"),
        pytest.param([b"a login Bob@Example.org s3cr3t!\r\n"],
                     [login("Bob@Example.org", b"s3cr3t!")], id="lowercase command"),
        pytest.param([b'a LOGIN "bob" "p \\"q\\" \\\\ r"\r\n'], [login("bob", b'p "q" \\ r')],
                     id="quoted with escapes"),
        pytest.param([b'a LOGIN "bob" ""\r\n'], [login("bob", b"")], id="empty password"),
        pytest.param(
            [b"a LOGIN bob {6}\r\n", b"se\x00\r\nt\r\n"],
            [send(b"+ Ready for literal data\r\n"), login("bob", b"se\x00\r\nt")],
            id="sync literal",
        ),
        pytest.param([b"a LOGIN bob {6+}\r\nsecret\r\n"], [login("bob", b"secret")],
                     id="non-sync literal"),
        pytest.param(
            [b"a LOGIN {3}\r\n", b"bob {2}\r\n", b"pw\r\n"],
            [send(b"+ Ready for literal data\r\n+ Ready for literal data\r\n"),
             login("bob", b"pw")],
            id="both sync literals",
        ),
        pytest.param(
            [b"a LOGIN bob {%d+}\r\n" % len("pässwörd€".encode()) + "pässwörd€".encode()
             + b"\r\n"],
            [login("bob", "pässwörd€".encode())],
            id="non-ASCII password literal",
        ),
        pytest.param(
            [b"a LOGIN j\xc3\xb6rg \xff\xfe\r\n"], [login("jörg", b"\xff\xfe")],
            id="UTF-8 username and 8-bit password atoms",
        ),
    ],
)
def test_login_gives_exactly_one_login_action(steps: list[Step], expected: list[Any]) -> None:
    session = check(steps, expected)
    assert session.state is State.LOGGING_IN
    logins = [a for a in run(session_for(), steps, split=True) if isinstance(a, Login)]
    assert len(logins) == 1
    assert logins[0].credentials.password.reveal() == expected[-1].credentials.password.reveal()
    assert logins[0].credentials.mechanism == "LOGIN"


def test_login_password_never_in_action_repr() -> None:
    [action] = run(session_for(), [b"a LOGIN bob hunter2\r\n"], split=False)
    assert "hunter2" not in repr(action)
    assert "hunter2" not in str(action)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"a LOGIN\r\n", b"a BAD LOGIN: Expected a space\r\n"),
        (b"a LOGIN bob\r\n", b"a BAD LOGIN: Expected a space\r\n"),
        (b"a LOGIN bob pw extra\r\n", b"a BAD LOGIN: Unexpected extra arguments\r\n"),
        (b'a LOGIN bob "pw\r\n', b"a BAD LOGIN: Unterminated quoted string\r\n"),
        (b'a LOGIN bob "p\\w"\r\n', b"a BAD LOGIN: Invalid escape in quoted string\r\n"),
    ],
)
def test_bad_login_syntax(line: bytes, reply: bytes) -> None:
    session = check([line, b"b NOOP\r\n"], [send(reply + b"b OK NOOP completed\r\n")])
    assert session.bad_commands == 1


@pytest.mark.parametrize(("line", "name"), [
    (b"a LOGIN {2+}\r\n\xff\xfe pw\r\n", "\udcff\udcfe"),
    (b'a LOGIN "b\x01b" pw\r\n', "b\x01b"),
    (b'a LOGIN "" pw\r\n', ""),
])
def test_odd_names_go_to_the_login_which_refuses_them_as_failed_logins(line: bytes,
                                                                      name: str) -> None:
    """Not a protocol error: the login pipeline refuses them, counted by the penalty
    (usernames.username_problem), with the ordinary authentication failure."""
    [action] = run(session_for(), [line], split=False)
    assert isinstance(action, Login) and action.credentials.username == name


def test_login_refused_before_tls() -> None:
    check(
        [b"a LOGIN bob secret\r\n", b"b NOOP\r\n"],
        [send(b"a NO [PRIVACYREQUIRED] Plaintext login is disabled, use STARTTLS\r\n"
              b"b OK NOOP completed\r\n")],
        STARTTLS,
    )


def test_login_before_tls_when_plaintext_auth_is_allowed() -> None:
    check([b"a LOGIN bob secret\r\n"], [login("bob", b"secret")], PLAINTEXT_OK)


# -- AUTHENTICATE PLAIN ---------------------------------------------------------------------


def test_authenticate_plain_with_initial_response() -> None:
    check(
        [b"a AUTHENTICATE PLAIN " + plain(b"", b"bob", b"s\xc3\xa9cret") + b"\r\n"],
        [login("bob", "sécret".encode(), mechanism="PLAIN")],
    )


def test_authenticate_plain_without_initial_response() -> None:
    session = check(
        [b"a authenticate plain\r\n", plain(b"", b"bob", b"pw") + b"\r\n",
         LoginOk(b"IMAP4rev1")],
        [send(b"+ \r\n"), login("bob", b"pw", mechanism="PLAIN"),
         send(b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n"), Splice(b"")],
    )
    assert session.state is State.RELAYING


def test_authenticate_state_between_challenge_and_response() -> None:
    session = session_for()
    assert session.receive_data(b"a AUTHENTICATE PLAIN\r\n") == [send(b"+ \r\n")]
    assert session.state is State.AUTHENTICATE


def test_authenticate_plain_authzid_equal_to_authcid() -> None:
    check(
        [b"a AUTHENTICATE PLAIN " + plain(b"bob", b"bob", b"pw") + b"\r\n"],
        [login("bob", b"pw", mechanism="PLAIN", authzid="bob")],
    )


def test_authenticate_plain_authzid_different_from_authcid() -> None:
    session = check(
        [b"a AUTHENTICATE PLAIN " + plain(b"admin", b"bob", b"pw") + b"\r\n", b"b NOOP\r\n"],
        [send(b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\nb OK NOOP completed\r\n")],
    )
    assert session.failed_logins == 1


def test_authzid_mismatches_count_towards_the_failed_login_limit() -> None:
    line = b"a AUTHENTICATE PLAIN " + plain(b"admin", b"bob", b"pw") + b"\r\n"
    no = b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    check(
        [line * 5],
        [send(no * 5 + b"* BYE Too many failed logins\r\n"), Close("too many failed logins")],
        limits=Limits(max_failed_logins=5),
    )


@pytest.mark.parametrize(
    ("steps", "reply"),
    [
        pytest.param([b"a AUTHENTICATE PLAIN\r\n", b"*\r\n"],
                     b"+ \r\na BAD AUTHENTICATE cancelled\r\n", id="cancel"),
        pytest.param([b"a AUTHENTICATE PLAIN =\r\n"],
                     b"a BAD AUTHENTICATE: Malformed SASL PLAIN response\r\n",
                     id="= is an empty initial response"),
        pytest.param([b"a AUTHENTICATE PLAIN\r\n", b"\r\n"],
                     b"+ \r\na BAD AUTHENTICATE: Malformed SASL PLAIN response\r\n",
                     id="empty response line"),
        pytest.param([b"a AUTHENTICATE PLAIN AHVzZXIAcGFzcw\r\n"],
                     b"a BAD AUTHENTICATE: Invalid base64 in SASL response\r\n",
                     id="unpadded base64"),
        pytest.param([b"a AUTHENTICATE PLAIN\r\n", b"not base64!\r\n"],
                     b"+ \r\na BAD AUTHENTICATE: Invalid base64 in SASL response\r\n",
                     id="invalid base64 response"),
        pytest.param([b"a AUTHENTICATE PLAIN " + b64encode(b"bob\x00pw") + b"\r\n"],
                     b"a BAD AUTHENTICATE: Malformed SASL PLAIN response\r\n",
                     id="one NUL"),
        pytest.param([b"a AUTHENTICATE PLAIN " + plain(b"", b"bob", b"") + b"\r\n"],
                     b"a BAD AUTHENTICATE: Malformed SASL PLAIN response\r\n",
                     id="empty password"),
        pytest.param([b"a AUTHENTICATE PLAIN\r\n", b"{3+}\r\nabc\r\n"],
                     b"+ \r\na BAD AUTHENTICATE: Malformed SASL PLAIN response\r\n",
                     id="non-sync literal as response"),
        pytest.param([b"a AUTHENTICATE PLAIN \"x\"\r\n"],
                     b"a BAD AUTHENTICATE: Expected an atom\r\n", id="quoted initial response"),
        pytest.param([b"a AUTHENTICATE\r\n"], b"a BAD AUTHENTICATE: Expected a space\r\n",
                     id="no mechanism"),
    ],
)
def test_authenticate_failures_answer_bad_and_go_on(steps: list[Step], reply: bytes) -> None:
    session = check([*steps, b"b NOOP\r\n"], [send(reply + b"b OK NOOP completed\r\n")])
    assert session.state is State.NOT_AUTHENTICATED


def test_sasl_response_line_is_not_a_command() -> None:
    # RFC 3501 section 6.2.2: the line after "+" is the response, even if it looks tagged.
    check(
        [b"a AUTHENTICATE PLAIN\r\n", b"b LOGOUT\r\n"],
        [send(b"+ \r\na BAD AUTHENTICATE: Invalid base64 in SASL response\r\n")],
    )


def test_sync_literal_in_sasl_response_is_fatal() -> None:
    check(
        [b"a AUTHENTICATE PLAIN\r\n", b"{3}\r\n"],
        [send(b"+ \r\n* BYE Invalid SASL response\r\n"), Close("Invalid SASL response")],
    )


def test_oversized_sync_literal_in_sasl_response_ends_the_exchange() -> None:
    session = session_for()
    session.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    out = merged(session.receive_data(b"{999999}\r\n"))
    assert session.state is not State.AUTHENTICATE
    assert not any(isinstance(a, SendToClient) and a.data.startswith(b"* BAD") for a in out)


@pytest.mark.parametrize("mechanism", [b"CRAM-MD5", b"OAUTHBEARER", b"XOAUTH2 dG9rZW4=", b"GSSAPI"])
def test_unsupported_mechanism(mechanism: bytes) -> None:
    check([b"a AUTHENTICATE " + mechanism + b"\r\n"],
          [send(b"a NO Unsupported authentication mechanism\r\n")])


def test_authenticate_refused_before_tls() -> None:
    check(
        [b"a AUTHENTICATE PLAIN " + plain(b"", b"bob", b"pw") + b"\r\n",
         b"b AUTHENTICATE PLAIN\r\n"],
        [send(b"a NO [PRIVACYREQUIRED] Plaintext login is disabled, use STARTTLS\r\n"
              b"b NO [PRIVACYREQUIRED] Plaintext login is disabled, use STARTTLS\r\n")],
        STARTTLS,
    )


# -- login results --------------------------------------------------------------------------


def test_login_succeeded_hands_over_pipelined_bytes_exactly() -> None:
    pipelined = b"b SELECT INBOX\r\nc APPEND INBOX {5}\r\nhel"
    session = check(
        [b"a LOGIN bob pw\r\n" + pipelined, b"lo", LoginOk(b"IMAP4rev1 IDLE MOVE")],
        [login("bob", b"pw"),
         send(b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"),
         Splice(pipelined + b"lo")],
    )
    assert session.state is State.RELAYING
    assert session.receive_data(b"d NOOP\r\n") == []
    assert session.timed_out() == []


def test_login_succeeded_without_capabilities() -> None:
    check(
        [b"t1 LOGIN bob pw\r\n", LoginOk(None)],
        [login("bob", b"pw"), send(b"t1 OK Logged in\r\n"), Splice(b"")],
    )


def test_bytes_during_login_are_not_parsed() -> None:
    # A sync literal pipelined behind LOGIN must not get a "+" from us: after the splice
    # the backend answers it.
    check(
        [b"a LOGIN bob pw\r\n", b"b LOGIN x {3}\r\n", b"garbage\x00\xff"],
        [login("bob", b"pw")],
    )


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (AuthenticationFailed(), b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"),
        (UserNotFound(), b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"),
        (BackendRefused("UNAVAILABLE", "Down for maintenance"),
         b"a NO [UNAVAILABLE] Down for maintenance\r\n"),
        (BackendUnavailable(), b"a NO [UNAVAILABLE] Service temporarily unavailable, try again "
                               b"later\r\n"),
        (DirectoryUnavailable(), b"a NO [UNAVAILABLE] Service temporarily unavailable, try "
                                 b"again later\r\n"),
    ],
)
def test_login_failed_answers_no_with_the_code(error: ProxyError, reply: bytes) -> None:
    session = check([b"a LOGIN bob pw\r\n", LoginFails(error)], [login("bob", b"pw"), send(reply)])
    assert session.state is State.NOT_AUTHENTICATED
    assert session.failed_logins == 1


def test_login_failed_then_buffered_commands_are_processed() -> None:
    check(
        [b"a LOGIN bob pw\r\nb NOOP\r\nc LOGIN bob pw2\r\nd NOOP\r\n",
         LoginFails(AuthenticationFailed()),
         LoginOk(b"IMAP4rev1")],
        [login("bob", b"pw"),
         send(b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\nb OK NOOP completed\r\n"),
         login("bob", b"pw2"),
         send(b"c OK [CAPABILITY IMAP4rev1] Logged in\r\n"),
         Splice(b"d NOOP\r\n")],
    )


def test_login_failed_after_authenticate_uses_its_tag() -> None:
    check(
        [b"x1 AUTHENTICATE PLAIN\r\n", plain(b"", b"bob", b"pw") + b"\r\n",
         LoginFails(AuthenticationFailed())],
        [send(b"+ \r\n"), login("bob", b"pw", mechanism="PLAIN"),
         send(b"x1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n")],
    )


def test_too_many_failed_logins() -> None:
    limits = Limits(max_failed_logins=3)
    no = b"NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    session = check(
        [b"a LOGIN bob 1\r\n", LoginFails(AuthenticationFailed()),
         b"b LOGIN bob 2\r\n", LoginFails(AuthenticationFailed()),
         b"c LOGIN bob 3\r\nd NOOP\r\n", LoginFails(AuthenticationFailed()),
         b"e NOOP\r\n"],
        [login("bob", b"1"), send(b"a " + no),
         login("bob", b"2"), send(b"b " + no),
         login("bob", b"3"), send(b"c " + no + b"* BYE Too many failed logins\r\n"),
         Close("too many failed logins")],
        limits=limits,
    )
    assert session.state is State.CLOSED


def test_too_much_pipelined_during_login_is_fatal() -> None:
    limits = Limits(max_line=64, max_preauth_literal=32)
    max_command = 64 + 2 * 32
    check(
        [b"a LOGIN bob pw\r\n", b"x" * (max_command + 1)],
        [login("bob", b"pw"),
         send(b"* BYE Too much data pipelined during login\r\n"),
         Close("Too much data pipelined during login")],
        limits=limits,
    )


def test_pipelining_bound_holds_in_the_same_read_as_login() -> None:
    limits = Limits(max_line=64, max_preauth_literal=32)
    max_command = 64 + 2 * 32
    check(
        [b"a LOGIN bob pw\r\n" + b"x" * (max_command + 1)],
        [login("bob", b"pw"),
         send(b"* BYE Too much data pipelined during login\r\n"),
         Close("Too much data pipelined during login")],
        limits=limits,
    )


@pytest.mark.parametrize("result", [LoginOk(b"IMAP4rev1"), LoginFails(AuthenticationFailed())])
def test_login_result_after_timeout_is_ignored(result: Step) -> None:
    session = check(
        [b"a LOGIN bob pw\r\n", TimesOut()],
        [login("bob", b"pw"), send(b"* BYE Autologout; idle for too long\r\n"),
         Close("pre-auth timeout")],
    )
    out = run(session, [result], split=False)
    assert not [a for a in out if isinstance(a, SendToClient | Splice)]


# -- errors and limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"a FROBNICATE\r\n", b"a BAD Unknown command\r\n"),
        (b"a STARTTLSX\r\n", b"a BAD Unknown command\r\n"),
        (b"a SELECT INBOX\r\n", b"a BAD Log in first\r\n"),
        (b"a uid fetch 1:* FLAGS\r\n", b"a BAD Log in first\r\n"),
        (b"a IDLE\r\n", b"a BAD Log in first\r\n"),
        (b"a\r\n", b"a BAD Missing command\r\n"),
        (b"a \r\n", b"a BAD Missing command\r\n"),
        (b"a (x)\r\n", b"a BAD Missing command\r\n"),
        (b"+ NOOP\r\n", b"* BAD Invalid tag\r\n"),
        (b"* NOOP\r\n", b"* BAD Invalid tag\r\n"),
        (b"a+ NOOP\r\n", b"* BAD Invalid tag\r\n"),
        (b" NOOP\r\n", b"* BAD Invalid tag\r\n"),
        (b"\r\n", b"* BAD Invalid tag\r\n"),
        (b"a{1} NOOP\r\n", b"* BAD Invalid tag\r\n"),
        (b"a NOOP x\r\n", b"a BAD NOOP: Unexpected extra arguments\r\n"),
        (b"a LOGOUT x\r\n", b"a BAD LOGOUT: Unexpected extra arguments\r\n"),
    ],
)
def test_bad_commands_answer_bad_and_go_on(line: bytes, reply: bytes) -> None:
    session = check([line, b"b NOOP\r\n"], [send(reply + b"b OK NOOP completed\r\n")])
    assert session.bad_commands == 1


def test_too_many_bad_commands() -> None:
    session = check(
        [b"a BOGUS\r\n" * 3 + b"b NOOP\r\n"],
        [send(b"a BAD Unknown command\r\n" * 3 + b"* BYE Too many invalid commands\r\n"),
         Close("Too many invalid commands")],
        limits=Limits(max_bad_commands=3),
    )
    assert session.state is State.CLOSED


def test_rejected_literal_answers_bad_and_stays_in_sync() -> None:
    check(
        [b"a LOGIN bob {70000}\r\n", b"b NOOP\r\n"],
        [send(b"a BAD Literal too large\r\nb OK NOOP completed\r\n")],
    )


def test_oversized_non_sync_literal_is_fatal() -> None:
    check(
        [b"a LOGIN bob {70000+}\r\n", b"x" * 100],
        [send(b"* BYE Literal too large\r\n"), Close("Literal too large")],
    )


def test_line_too_long_is_fatal() -> None:
    check(
        [b"a NOOP\r\n", b"b LOGIN " + b"x" * 100],
        [send(b"a OK NOOP completed\r\n* BYE Line too long\r\n"), Close("Line too long")],
        limits=Limits(max_line=64),
    )


@pytest.mark.parametrize(
    "steps",
    [[], [b"a NOOP\r\n"], [b"a AUTHENTICATE PLAIN\r\n"], [b"a LOGIN bob pw\r\n"], [b"a NO"]],
    ids=["idle", "after a command", "during AUTHENTICATE", "during login", "mid-line"],
)
def test_timed_out(steps: list[Step]) -> None:
    session = session_for()
    run(session, steps, split=False)
    assert session.timed_out() == [
        send(b"* BYE Autologout; idle for too long\r\n"), Close("pre-auth timeout")
    ]
    assert session.state is State.CLOSED
    assert session.timed_out() == []
    assert session.receive_data(b"b NOOP\r\n") == []


# -- hypothesis: arbitrary input never raises, buffering stays bounded ----------------------

_client_pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([
        b"\r\n", b"\n", b"a LOGIN bob pw\r\n", b"a LOGIN {3}\r\n", b"{3+}\r\n", b"{99}\r\n",
        b"{99+}\r\n", b"a AUTHENTICATE PLAIN\r\n", b"a AUTHENTICATE PLAIN =\r\n",
        plain(b"", b"bob", b"pw") + b"\r\n", b"*\r\n", b"a STARTTLS\r\n", b"a ID (\"a\" NIL)\r\n",
        b"a LOGOUT\r\n", b"a CAPABILITY\r\n", b"x" * 70, b'"', b"\\",
        b"a AUTHENTICATE LOGIN\r\n", b"a AUTHENTICATE LOGIN YQ==\r\n", b"YQ==\r\n",
        b"AQ==\r\n", b"a AUTHENTICATE OAUTHBEARER\r\n", b"a AUTHENTICATE XOAUTH2 =\r\n",
        b64encode(b"n,a=a,\x01auth=Bearer t\x01\x01") + b"\r\n",
    ]),
)
_events = st.lists(
    st.one_of(
        st.lists(_client_pieces, min_size=1, max_size=6).map(b"".join),
        st.sampled_from([LoginOk(b"IMAP4rev1"), LoginOk(None), LoginFails(AuthenticationFailed()),
                         LoginFails(BackendRefused("UNAVAILABLE", "x")), TimesOut(),
                         LoginFails(TokenRefused(b"eyJ9")), LoginFails(UserNotFound())]),
    ),
    max_size=12,
)
H_LIMITS = Limits(max_line=64, max_preauth_literal=32, max_bad_commands=4, max_failed_logins=3)
H_MAX_COMMAND = 64 + 2 * 32
ACTION_TYPES = (SendToClient, StartClientTLS, Login, Splice, Close)


@settings(max_examples=300, deadline=None)
@given(steps=_events, settings_=st.sampled_from([IMPLICIT, STARTTLS, PLAINTEXT_OK]))
def test_arbitrary_input_only_produces_actions(
    steps: list[Step], settings_: dict[str, bool]
) -> None:
    session = session_for(settings_, H_LIMITS, ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"))
    for step in steps:
        if isinstance(step, bytes):
            out = session.receive_data(step)
        elif session.state is not State.LOGGING_IN:
            continue  # the adapter only reports a login it was asked for
        elif isinstance(step, LoginOk):
            out = session.login_succeeded(step.capabilities)
        elif isinstance(step, LoginFails):
            out = session.login_failed(step.error)
        else:
            out = session.timed_out()
        assert all(isinstance(a, ACTION_TYPES) for a in out)
        for action in out:
            if isinstance(action, SendToClient):
                assert action.data.endswith(b"\r\n")
        if any(isinstance(a, Close | Splice) for a in out):
            assert session.state in (State.CLOSED, State.RELAYING)
            assert isinstance(out[-1], Close | Splice)
        # Buffering is bounded (private attribute: the only way to observe it).
        buffered = session._wire.buffered
        if session.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATE):
            assert buffered <= max(H_LIMITS.max_line + 1, H_LIMITS.max_preauth_literal)
        elif session.state is State.LOGGING_IN and isinstance(step, bytes):
            # + the read that carried the LOGIN line: see the xfail test on pipelining.
            assert buffered <= H_MAX_COMMAND + len(step)


@settings(max_examples=150, deadline=None)
@given(data=st.lists(_client_pieces, max_size=10).map(b"".join))
def test_chunking_does_not_change_the_output(data: bytes) -> None:
    # Splits that change meaning are excluded: STARTTLS (later reads are TLS) and reads
    # after LOGIN (the pipelining bound, see the xfail test), and lines of exactly
    # max_line octets + CRLF (see test_imapwire).
    if b"STARTTLS" in data.upper() or b"LOGIN" in data.upper():
        data = data.upper().replace(b"STARTTLS", b"NOOP").replace(b"LOGIN", b"NOOP")
    whole = run(session_for(IMPLICIT, H_LIMITS), [data], split=False)
    if any(isinstance(a, Login) for a in whole):
        return
    start = 0
    while (i := data.find(b"\r\n", start)) >= 0:
        if i >= H_LIMITS.max_line and b"\n" not in data[i - H_LIMITS.max_line : i]:
            return
        start = i + 1
    assert run(session_for(IMPLICIT, H_LIMITS), [data], split=True) == whole


# -- HTTP requests (cross-protocol attacks, ALPACA) ----------------------------------------

HTTP_REQUEST = (b"GET / HTTP/1.1\r\nHost: mail.example.org\r\n\r\n"
                b"<script>alert(document.cookie)</script>\r\n")


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1", b"POST /x?a=1 HTTP/1.0", b"HEAD / HTTP/2", b"OPTIONS * HTTP/1.1",
    b"PUT /a HTTP/1.1", b"DELETE /a HTTP/1.1", b"CONNECT mail:993 HTTP/1.1",
    b"PATCH /a HTTP/1.1", b"TRACE / HTTP/1.1",
])
def test_an_http_request_line_closes_without_any_reply(first: bytes) -> None:
    """Nothing of the request comes back: a page's script cannot be reflected (ALPACA)."""
    for listener in (IMPLICIT, STARTTLS, PLAINTEXT_OK):
        session = check([first + b"\r\n" + HTTP_REQUEST], [Close("HTTP request")], listener)
        assert session.state is State.CLOSED


def test_an_http_request_after_imap_commands_closes_too() -> None:
    check([b"a NOOP\r\n" + HTTP_REQUEST],
          [send(b"a OK NOOP completed\r\n"), Close("HTTP request")])


@pytest.mark.parametrize("line", [
    b"GET / HTTP", b"get / HTTP/1.1", b"GET  HTTP/1.1", b"GET / http/1.1", b"a GET / HTTP/1.1",
    b"GETX / HTTP/1.1",
])
def test_lines_that_are_not_http_requests_are_answered_as_usual(line: bytes) -> None:
    session = session_for(PLAINTEXT_OK)
    actions = session.receive_data(line + b"\r\n")
    assert len(actions) == 1 and isinstance(actions[0], SendToClient)
    assert b" BAD " in actions[0].data
    assert session.state is State.NOT_AUTHENTICATED


# -- AUTHENTICATE LOGIN ---------------------------------------------------------------------

USERNAME_PROMPT = b"+ VXNlcm5hbWU6\r\n"  # "Username:"
PASSWORD_PROMPT = b"+ UGFzc3dvcmQ6\r\n"  # "Password:"


def test_authenticate_login_two_steps() -> None:
    session = check(
        [b"a AUTHENTICATE LOGIN\r\n", b64encode(b"bob") + b"\r\n",
         b64encode(b"pass word") + b"\r\n", LoginOk(b"IMAP4rev1")],
        [send(USERNAME_PROMPT + PASSWORD_PROMPT), login("bob", b"pass word"),
         send(b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n"), Splice(b"")])
    assert session.state is State.RELAYING


def test_authenticate_login_with_initial_response() -> None:
    check([b"a AUTHENTICATE login " + b64encode(b"bob") + b"\r\n", b64encode(b"pw") + b"\r\n"],
          [send(PASSWORD_PROMPT), login("bob", b"pw")])


@pytest.mark.parametrize(("lines", "reply"), [
    ([b"*\r\n"], b"a BAD AUTHENTICATE cancelled\r\n"),
    ([b64encode(b"bob") + b"\r\n", b"*\r\n"],
     PASSWORD_PROMPT + b"a BAD AUTHENTICATE cancelled\r\n"),
    ([b"\r\n"], b"a BAD AUTHENTICATE: Empty user name\r\n"),
    ([b64encode(b"bob") + b"\r\n", b"\r\n"],
     PASSWORD_PROMPT + b"a BAD AUTHENTICATE: Empty password\r\n"),
    ([b"b@d!\r\n"], b"a BAD AUTHENTICATE: Invalid base64 in SASL response\r\n"),
])
def test_authenticate_login_refusals(lines: list[bytes], reply: bytes) -> None:
    session = check([b"a AUTHENTICATE LOGIN\r\n", *lines, b"b NOOP\r\n"],
                    [send(USERNAME_PROMPT + reply + b"b OK NOOP completed\r\n")])
    assert session.state is State.NOT_AUTHENTICATED


def test_authenticate_login_not_offered_when_not_listed() -> None:
    check([b"a AUTHENTICATE LOGIN\r\n"], [send(b"a NO Unsupported authentication mechanism\r\n")],
          mechanisms=("PLAIN",))
    assert b"AUTH=LOGIN" not in session_for(mechanisms=("PLAIN",)).capabilities()


# -- OAUTHBEARER and XOAUTH2 ----------------------------------------------------------------

TOKENS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
BEARER_MESSAGE = b"n,a=bob,\x01host=imap.example.org\x01port=993\x01auth=Bearer ya29.tok\x01\x01"
XOAUTH_MESSAGE = b"user=bob\x01auth=Bearer ya29.tok\x01\x01"
JSON_ERROR = b64encode(b'{"status":"invalid_token","scope":"mail"}')


def token_login(message: bytes) -> Login:
    parse = parse_oauthbearer if message.startswith(b"n,") else parse_xoauth2
    return Login(parse(message), ())


def test_token_mechanisms_are_advertised_when_listed() -> None:
    caps = session_for(mechanisms=TOKENS).capabilities()
    assert caps.endswith(b"AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2")
    assert b"OAUTHBEARER" not in session_for().capabilities()


@pytest.mark.parametrize("message", [BEARER_MESSAGE, XOAUTH_MESSAGE])
def test_token_with_initial_response(message: bytes) -> None:
    mechanism = b"OAUTHBEARER" if message.startswith(b"n,") else b"XOAUTH2"
    session = check([b"a AUTHENTICATE " + mechanism + b" " + b64encode(message) + b"\r\n",
                     LoginOk()],
                    [token_login(message), send(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
                     Splice(b"")], mechanisms=TOKENS)
    assert session.state is State.RELAYING


def test_token_after_a_continuation() -> None:
    check([b"a AUTHENTICATE OAUTHBEARER\r\n", b64encode(BEARER_MESSAGE) + b"\r\n"],
          [send(b"+ \r\n"), token_login(BEARER_MESSAGE)], mechanisms=TOKENS)


def test_backend_error_challenge_is_relayed_then_the_no() -> None:
    # RFC 7628 section 3.2.2: the challenge, the client's %x01, then the failure.
    session = check(
        [b"a AUTHENTICATE OAUTHBEARER " + b64encode(BEARER_MESSAGE) + b"\r\n",
         LoginFails(TokenRefused(JSON_ERROR)), b"AQ==\r\n", b"b NOOP\r\n"],
        [token_login(BEARER_MESSAGE), send(b"+ " + JSON_ERROR + b"\r\n"
                                           b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
                                           b"b OK NOOP completed\r\n")],
        mechanisms=TOKENS)
    assert session.failed_logins == 1


def test_the_no_follows_even_a_cancelled_dummy_response() -> None:
    session = check(
        [b"a AUTHENTICATE XOAUTH2 " + b64encode(XOAUTH_MESSAGE) + b"\r\n",
         LoginFails(TokenRefused(JSON_ERROR)), b"*\r\n"],
        [token_login(XOAUTH_MESSAGE),
         send(b"+ " + JSON_ERROR + b"\r\na NO [AUTHENTICATIONFAILED] Authentication failed\r\n")],
        mechanisms=TOKENS)
    assert session.failed_logins == 1 and session.bad_commands == 0


@pytest.mark.parametrize(("mechanism", "message"), [("OAUTHBEARER", BEARER_MESSAGE),
                                                    ("XOAUTH2", XOAUTH_MESSAGE)])
def test_a_user_the_proxy_refuses_gets_the_same_kind_of_challenge(
        mechanism: str, message: bytes) -> None:
    # An unknown user must look like a refused token (no user enumeration).
    check([b"a AUTHENTICATE " + mechanism.encode() + b" " + b64encode(message) + b"\r\n",
           LoginFails(UserNotFound()), b"AQ==\r\n"],
          [token_login(message), send(b"+ " + ERROR_CHALLENGES[mechanism] + b"\r\n"
                                      b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n")],
          mechanisms=TOKENS)


def test_a_backend_that_is_down_is_no_token_problem() -> None:
    check([b"a AUTHENTICATE OAUTHBEARER " + b64encode(BEARER_MESSAGE) + b"\r\n",
           LoginFails(BackendUnavailable())],
          [token_login(BEARER_MESSAGE),
           send(b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n")],
          mechanisms=TOKENS)


@pytest.mark.parametrize(("line", "text"), [
    (b"a AUTHENTICATE OAUTHBEARER Zm9v!!\r\n", b"Invalid base64 in SASL response"),
    (b"a AUTHENTICATE OAUTHBEARER " + b64encode(b"n,,\x01auth=Bearer x\x01\x01") + b"\r\n",
     b"OAUTHBEARER needs the user in the GS2 header (a=)"),
    (b"a AUTHENTICATE XOAUTH2 " + b64encode(b"user=bob\x01auth=Basic x\x01\x01") + b"\r\n",
     b"Malformed bearer token"),
])
def test_malformed_token_messages_are_bad(line: bytes, text: bytes) -> None:
    session = check([line], [send(b"a BAD AUTHENTICATE: " + text + b"\r\n")], mechanisms=TOKENS)
    assert session.state is State.NOT_AUTHENTICATED


def test_token_mechanism_not_listed_is_refused() -> None:
    check([b"a AUTHENTICATE XOAUTH2 " + b64encode(XOAUTH_MESSAGE) + b"\r\n"],
          [send(b"a NO Unsupported authentication mechanism\r\n")])


def test_a_token_larger_than_a_line_ends_the_session_before_any_login() -> None:
    out = run(session_for(mechanisms=TOKENS),
              [b"a AUTHENTICATE XOAUTH2 " + b64encode(b"user=bob\x01auth=Bearer "
                                                      + b"t" * 65536 + b"\x01\x01") + b"\r\n"],
              split=False)
    assert not any(isinstance(a, Login) for a in out)
    assert isinstance(out[-1], Close)

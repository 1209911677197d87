"""Tests for imapproxy.imapbackend: the proxy's own login dialogue with an IMAP backend.

Transcripts of backend bytes against the actions that come out, each also replayed one
byte at a time. In the replay, bytes that arrive after the dialogue is done are what the
adapter relays itself, so they are added to ``trailing`` before comparing.
"""

from __future__ import annotations

from base64 import b64encode
from dataclasses import dataclass
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
from imapproxy.imapbackend import (
    MAX_BACKEND_LINE,
    TRANSITIONS,
    ImapBackendLogin,
    Step,
    capability_list,
    id_list,
)
from imapproxy.sasl import parse_oauthbearer, parse_xoauth2

DOVECOT_CAPS = (b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
                b"AUTH=PLAIN")
DOVECOT_GREETING = b"* OK [CAPABILITY " + DOVECOT_CAPS + b"] Dovecot ready.\r\n"
PLAIN_GREETING = b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"
BARE_GREETING = b"* OK ready\r\n"
LOGGED_IN_CAPS = b"IMAP4rev1 SASL-IR ID ENABLE IDLE SORT MOVE LITERAL+"
LOGIN_OK = b"P3 OK [CAPABILITY " + LOGGED_IN_CAPS + b"] Logged in\r\n"
OAUTH_MESSAGE = b"n,a=bob,\x01host=mail\x01auth=Bearer tok3n.abc\x01\x01"
BEARER = parse_oauthbearer(OAUTH_MESSAGE)
XOAUTH = parse_xoauth2(b"user=bob\x01auth=Bearer tok3n.abc\x01\x01")
ERROR_JSON = b64encode(b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}')


@dataclass(frozen=True)
class TlsStarted:
    """The adapter reports that TLS towards the backend is up."""


@dataclass(frozen=True)
class Failed:
    """A BackendLoginFailed, compared by what the client would see."""

    error: str
    code: str | None
    text: str


def failed(error: ProxyError) -> Failed:
    return Failed(type(error).__name__, error.imap_code, error.client_text())


BackendStep = bytes | TlsStarted


def normalise(actions: list[Any], leftover: bytes) -> list[Any]:
    out: list[Any] = []
    for action in actions:
        if isinstance(action, SendToBackend) and out and isinstance(out[-1], SendToBackend):
            out[-1] = SendToBackend(out[-1].data + action.data)
        elif isinstance(action, BackendLoginFailed):
            out.append(failed(action.error))
        else:
            out.append(action)
    if leftover and out and isinstance(out[-1], BackendLoggedIn):
        out[-1] = BackendLoggedIn(out[-1].capabilities, out[-1].trailing + leftover)
    return out


def run(dialogue: ImapBackendLogin, steps: list[BackendStep], *, split: bool) -> list[Any]:
    actions: list[Any] = []
    leftover = b""
    for step in steps:
        if isinstance(step, TlsStarted):
            actions += dialogue.tls_started()
            continue
        chunks = [step[i : i + 1] for i in range(len(step))] if split else [step]
        for chunk in chunks:
            if dialogue.step is Step.DONE:
                leftover += chunk  # the adapter relays this itself
            else:
                actions += dialogue.receive_data(chunk)
    return normalise(actions, leftover)


def make(password: bytes = b"secret", login: str = "bob", *, starttls: bool = False,
         client_id: tuple[tuple[str, str | None], ...] = (),
         credentials: Credentials | None = None) -> ImapBackendLogin:
    if credentials is None:
        credentials = Credentials("bob", Secret(password))
    return ImapBackendLogin(credentials, login, starttls=starttls, client_id=client_id)


def check(steps: list[BackendStep], expected: list[Any], **kwargs: Any) -> ImapBackendLogin:
    """The transcript holds fed whole and fed one byte at a time."""
    whole = make(**kwargs)
    assert run(whole, steps, split=False) == normalise(expected, b"")
    split = make(**kwargs)
    assert run(split, steps, split=True) == normalise(expected, b"")
    assert split.step is whole.step
    return whole


def to_backend(data: bytes) -> SendToBackend:
    return SendToBackend(data)


# -- the happy paths ------------------------------------------------------------------------


def test_dovecot_greeting_then_pipelined_quoted_login() -> None:
    session = check(
        [DOVECOT_GREETING, LOGIN_OK],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), BackendLoggedIn(LOGGED_IN_CAPS)],
    )
    assert session.step is Step.DONE


def test_quoted_password_with_quotes_and_backslashes() -> None:
    check(
        [DOVECOT_GREETING],
        [to_backend(b'P3 LOGIN "bob" "bob pass \\"quoted\\" \\\\ back"\r\n')],
        password=b'bob pass "quoted" \\ back',
    )


def test_password_needing_a_literal_with_literal_plus() -> None:
    password = "pässwörd-çarol".encode()
    check(
        [DOVECOT_GREETING, LOGIN_OK],
        [to_backend(b'P3 LOGIN "bob" {%d+}\r\n' % len(password) + password + b"\r\n"),
         BackendLoggedIn(LOGGED_IN_CAPS)],
        password=password,
    )


@pytest.mark.parametrize("password", [b"line\r\nbreak", b"nul\x00", b"\x7f", "€".encode()])
def test_password_needing_a_sync_literal_without_literal_plus(password: bytes) -> None:
    session = check(
        [PLAIN_GREETING],
        [to_backend(b'P3 LOGIN "bob" {%d}\r\n' % len(password))],
        password=password,
    )
    assert session.step is Step.LOGIN_CONTINUATION
    check(
        [PLAIN_GREETING, b"+ OK\r\n", LOGIN_OK],
        [to_backend(b'P3 LOGIN "bob" {%d}\r\n' % len(password)),
         to_backend(password + b"\r\n"),
         BackendLoggedIn(LOGGED_IN_CAPS)],
        password=password,
    )


def test_login_refused_instead_of_continuation() -> None:
    check(
        [PLAIN_GREETING, b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        [to_backend(b'P3 LOGIN "bob" {2}\r\n'), failed(AuthenticationFailed())],
        password=b"\xff\xfe",
    )


def test_imap4rev2_greeting_allows_non_sync_literals() -> None:
    check(
        [b"* OK [CAPABILITY IMAP4rev2] hi\r\n"],
        [to_backend(b'P3 LOGIN "bob" {2+}\r\n\xff\xfe\r\n')],
        password=b"\xff\xfe",
    )


def test_imap4rev2_long_literal_is_synchronising() -> None:
    password = b"\xff" * 5000
    check(
        [b"* OK [CAPABILITY IMAP4rev2] hi\r\n"],
        [to_backend(b'P3 LOGIN "bob" {5000}\r\n')],
        password=password,
    )


def test_login_name_needing_a_literal() -> None:
    name = "jörg"
    encoded = name.encode()
    check(
        [DOVECOT_GREETING],
        [to_backend(b"P3 LOGIN {%d+}\r\n" % len(encoded) + encoded + b' "secret"\r\n')],
        login=name,
    )
    # Without LITERAL+ it would cost a round trip; such names are refused instead.
    check([PLAIN_GREETING], [failed(BackendProtocolError())], login=name)


def test_client_id_is_sent_before_login() -> None:
    client_id = (("name", "Thunderbird"), ("version", None), ("os", 'say "hi"'))
    check(
        [DOVECOT_GREETING, b'* ID ("name" "Dovecot")\r\nP2 OK ID completed.\r\n', LOGIN_OK],
        [to_backend(b'P2 ID ("name" "Thunderbird" "version" NIL "os" "say \\"hi\\"")\r\n'
                    b'P3 LOGIN "bob" "secret"\r\n'),
         BackendLoggedIn(LOGGED_IN_CAPS)],
        client_id=client_id,
    )


def test_id_failure_does_not_stop_the_login() -> None:
    check(
        [BARE_GREETING, b"P2 BAD Unknown command\r\n", LOGIN_OK],
        [to_backend(b'P2 ID ("name" "x")\r\nP3 LOGIN "bob" "secret"\r\n'),
         BackendLoggedIn(LOGGED_IN_CAPS)],
        client_id=(("name", "x"),),
    )


def test_id_list_rendering() -> None:
    assert id_list(()) == b"NIL"
    assert id_list((("name", "a"),)) == b'("name" "a")'
    assert id_list((("name", None),)) == b'("name" NIL)'
    # Values that would need a literal are dropped; nothing left means NIL.
    assert id_list((("name", "mü"),)) == b"NIL"
    assert id_list((("name", "mü"), ("os", "x"))) == b'("os" "x")'
    assert id_list((("k\r\n", "v"),)) == b"NIL"


#: What Dovecot answers to CAPABILITY once TLS is up (no STARTTLS, LOGINDISABLED gone).
TLS_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN"
TLS_CAPABILITY_REPLY = (b"* CAPABILITY " + TLS_CAPS + b"\r\n"
                        b"P5 OK Pre-login capabilities listed, post-login capabilities "
                        b"have more.\r\n")
STARTTLS_OK = b"P1 OK Begin TLS negotiation now.\r\n"


def test_starttls_flow() -> None:
    session = check(
        [DOVECOT_GREETING, STARTTLS_OK],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS()],
        starttls=True,
    )
    assert session.step is Step.STARTTLS
    # RFC 3501 section 6.2.1: after TLS the capabilities are asked for again, and LOGIN
    # waits for them.
    session = check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted()],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n")],
        starttls=True,
    )
    assert session.step is Step.TLS_CAPABILITY
    check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), TLS_CAPABILITY_REPLY, LOGIN_OK],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n"),
         to_backend(b'P3 LOGIN "bob" "secret"\r\n'), BackendLoggedIn(LOGGED_IN_CAPS)],
        starttls=True,
    )


def test_id_is_pipelined_with_the_capability_request_after_tls() -> None:
    check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), TLS_CAPABILITY_REPLY,
         b'* ID ("name" "Dovecot")\r\nP2 OK ID completed.\r\n', LOGIN_OK],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(),
         to_backend(b'P5 CAPABILITY\r\nP2 ID ("name" "x")\r\n'),
         to_backend(b'P3 LOGIN "bob" "secret"\r\n'), BackendLoggedIn(LOGGED_IN_CAPS)],
        starttls=True, client_id=(("name", "x"),),
    )


def test_capabilities_after_tls_are_used_for_the_login() -> None:
    """The issue: LITERAL+ was forgotten after STARTTLS, so a non-ASCII name failed (and
    the backend was marked down); the capabilities from after TLS bring it back."""
    login = "jürgen".encode()
    session = check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), TLS_CAPABILITY_REPLY, LOGIN_OK],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n"),
         to_backend(b"P3 LOGIN {%d+}\r\n" % len(login) + login + b' "secret"\r\n'),
         BackendLoggedIn(LOGGED_IN_CAPS)],
        starttls=True, login="jürgen",
    )
    assert session.step is Step.DONE


def test_capabilities_from_before_tls_do_not_count_after_it() -> None:
    # RFC 3501 section 6.2.1: LITERAL+ seen in plaintext is forgotten after STARTTLS; what
    # the backend says over TLS counts (here: no LITERAL+, so a synchronising literal).
    check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(),
         b"* CAPABILITY IMAP4rev1 IDLE\r\nP5 OK done\r\n", b"+ go\r\n"],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n"),
         to_backend(b'P3 LOGIN "bob" {2}\r\n'), to_backend(b"\xff\xfe\r\n")],
        starttls=True,
        password=b"\xff\xfe",
    )
    # No LITERAL+ after TLS and a non-ASCII name: refused as before (a literal for the
    # name would need another round trip).
    check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), b"P5 OK no untagged list\r\n"],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n"),
         failed(BackendProtocolError())],
        starttls=True, login="jürgen",
    )


def test_a_refused_capability_request_after_tls_is_a_protocol_error() -> None:
    check(
        [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), b"P5 BAD what\r\n"],
        [to_backend(b"P1 STARTTLS\r\n"), StartBackendTLS(), to_backend(b"P5 CAPABILITY\r\n"),
         failed(BackendProtocolError())],
        starttls=True,
    )


def test_starttls_refused() -> None:
    check(
        [BARE_GREETING, b"P1 NO STARTTLS not available\r\n"],
        [to_backend(b"P1 STARTTLS\r\n"), failed(BackendUnavailable())],
        starttls=True,
    )


def test_plaintext_injected_behind_starttls_ok_is_not_used() -> None:
    session = make(password=b"wrong", starttls=True)
    out = session.receive_data(BARE_GREETING)
    out += session.receive_data(b"P1 OK go\r\nP3 OK [CAPABILITY IMAP4rev1] ")
    if session.step is not Step.DONE:  # a fix may also refuse the injected bytes outright
        out += session.tls_started()
        out += session.receive_data(b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert not any(isinstance(a, BackendLoggedIn) for a in out)
    assert isinstance(out[-1], BackendLoginFailed)


def test_login_ok_without_capability_code_asks_for_capabilities() -> None:
    session = check(
        [BARE_GREETING, b"P3 OK Logged in\r\n"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), to_backend(b"P4 CAPABILITY\r\n")],
    )
    assert session.step is Step.CAPABILITY
    check(
        [BARE_GREETING, b"P3 OK Logged in\r\n",
         b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\nP4 OK Capability completed.\r\n"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), to_backend(b"P4 CAPABILITY\r\n"),
         BackendLoggedIn(b"IMAP4rev1 IDLE MOVE")],
    )


def test_login_ok_without_capability_code_forgets_greeting_capabilities() -> None:
    # The greeting's list is from before login; if the backend sends none now, say so.
    check(
        [DOVECOT_GREETING, b"P3 OK Logged in\r\n", b"P4 OK done\r\n"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), to_backend(b"P4 CAPABILITY\r\n"),
         BackendLoggedIn(None)],
    )


def test_other_untagged_data_is_ignored() -> None:
    check(
        [BARE_GREETING, b"* OK [ALERT] hello\r\n* 3 EXISTS\r\n", LOGIN_OK],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), BackendLoggedIn(LOGGED_IN_CAPS)],
    )


def test_bytes_after_the_final_ok_are_trailing() -> None:
    check(
        [DOVECOT_GREETING, LOGIN_OK + b"* 1 EXISTS\r\n* partial"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'),
         BackendLoggedIn(LOGGED_IN_CAPS, b"* 1 EXISTS\r\n* partial")],
    )
    check(
        [BARE_GREETING, b"P3 OK in\r\n", b"* CAPABILITY IMAP4rev1\r\nP4 OK done\r\nextra"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), to_backend(b"P4 CAPABILITY\r\n"),
         BackendLoggedIn(b"IMAP4rev1", b"extra")],
    )


def test_bare_lf_line_endings_are_accepted() -> None:
    check(
        [b"* OK ready\n", b"P3 OK [CAPABILITY IMAP4rev1] in\n"],
        [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), BackendLoggedIn(b"IMAP4rev1")],
    )


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (b"P3 NO Authentication failed.\r\n", failed(AuthenticationFailed())),
        (b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
         failed(AuthenticationFailed())),
        (b"P3 NO [UNAVAILABLE] Server in maintenance\r\n",
         failed(BackendRefused("UNAVAILABLE", "Server in maintenance"))),
        (b"P3 no [unavailable] down\r\n", failed(BackendRefused("UNAVAILABLE", "down"))),
        (b"P3 NO [EXPIRED] Password expired\r\n",
         failed(BackendRefused("EXPIRED", "Password expired"))),
        (b"P3 NO [LIMIT]\r\n", failed(BackendRefused("LIMIT", "Login refused"))),
        (b"P3 NO [CONTACTADMIN x y] Call us\r\n",
         failed(BackendRefused("CONTACTADMIN", "Call us"))),
        # Codes that could help an attacker or mean nothing to the user are not passed on.
        (b"P3 NO [AUTHORIZATIONFAILED] no\r\n", failed(AuthenticationFailed())),
        (b"P3 NO [X-SECRET-DEBUG user unknown] no\r\n", failed(AuthenticationFailed())),
        (b"P3 BAD Error in IMAP command\r\n", failed(AuthenticationFailed())),
        (b"* BYE Too many connections\r\n", failed(BackendUnavailable())),
        (b"P9 OK what\r\n", failed(BackendProtocolError())),
        (b"+ go ahead\r\n", failed(BackendProtocolError())),
        (b"garbage\r\n", failed(BackendProtocolError())),
    ],
)
def test_login_replies(reply: bytes, outcome: Failed) -> None:
    check([BARE_GREETING, reply], [to_backend(b'P3 LOGIN "bob" "secret"\r\n'), outcome])


def test_refused_code_text_is_what_the_client_sees() -> None:
    error = BackendRefused("UNAVAILABLE", "Server in maintenance")
    assert error.imap_code == "UNAVAILABLE"
    assert error.client_text() == "Server in maintenance"


@pytest.mark.parametrize(
    ("greeting", "outcome"),
    [
        (b"* BYE Too many connections\r\n", failed(BackendUnavailable())),
        (b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as root\r\n", failed(BackendUnavailable())),
        (b"+OK POP3 ready\r\n", failed(BackendProtocolError())),
        (b"HTTP/1.1 400 Bad Request\r\n", failed(BackendProtocolError())),
        (b"A1 OK hi\r\n", failed(BackendProtocolError())),
        (b"\r\n", failed(BackendProtocolError())),
        (b"* NO not ready\r\n", failed(BackendProtocolError())),
    ],
)
def test_bad_greetings(greeting: bytes, outcome: Failed) -> None:
    session = check([greeting], [outcome])
    assert session.step is Step.DONE


def test_nothing_more_after_a_failure() -> None:
    session = make()
    out = run(session, [b"* BYE go away\r\n* OK [CAPABILITY IMAP4rev1] ready\r\n"], split=False)
    assert out == [failed(BackendUnavailable())]
    assert session.receive_data(b"P3 OK [CAPABILITY X] in\r\n") == []


def test_overlong_line_without_end_is_an_error() -> None:
    check([b"* OK " + b"x" * MAX_BACKEND_LINE], [failed(BackendProtocolError())])


def test_overlong_line_is_an_error_however_it_arrives() -> None:
    check([b"* OK " + b"x" * MAX_BACKEND_LINE + b"\r\n"], [failed(BackendProtocolError())])


@pytest.mark.parametrize(
    "steps",
    [[b"* OK [CAPABILITY IMAP4rev1 X-\xff] hi\r\n"],
     [BARE_GREETING, b"P3 OK [CAPABILITY IMAP4rev1 X-\xc3\xa9] in\r\n"]],
    ids=["greeting", "login reply"],
)
def test_non_ascii_capability_code_does_not_crash(steps: list[BackendStep]) -> None:
    run(make(), steps, split=False)


# -- helpers --------------------------------------------------------------------------------


def test_capability_list() -> None:
    assert capability_list(b"CAPABILITY IMAP4rev1 IDLE") == b"IMAP4rev1 IDLE"
    assert capability_list(b"capability IMAP4rev1") == b"IMAP4rev1"
    assert capability_list(b"CAPABILITYX") is None
    assert capability_list(b"UNAVAILABLE") is None
    assert capability_list(None) is None


def test_password_never_in_repr_of_what_we_send() -> None:
    session = make(password=b"hunter2")
    [action] = session.receive_data(BARE_GREETING)
    assert isinstance(action, SendToBackend)
    assert b"hunter2" in action.data
    assert "hunter2" not in repr(action)


# -- the step table --------------------------------------------------------------------------


def test_transitions_outside_the_table_are_bugs() -> None:
    login = make()
    login.receive_data(b"* BYE go away\r\n")
    with pytest.raises(AssertionError, match="illegal transition"):
        login.tls_started()  # the dialogue is over


#: Dialogues that between them take every step change: (make() arguments, backend steps).
_TABLE_TOUR: list[tuple[dict[str, Any], list[BackendStep]]] = [
    # GREETING -> AUTHENTICATE (SASL-IR) -> CAPABILITY -> DONE
    ({"credentials": BEARER}, [DOVECOT_GREETING, b"P3 OK in\r\n", b"P4 OK\r\n"]),
    ({"credentials": BEARER}, [DOVECOT_GREETING, LOGIN_OK]),  # AUTHENTICATE -> DONE
    # GREETING -> AUTHENTICATE_CONTINUATION -> AUTHENTICATE
    ({"credentials": BEARER}, [BARE_GREETING, b"+ \r\n"]),
    ({"credentials": BEARER}, [BARE_GREETING, b"P3 OK in\r\n"]),  # ... -> CAPABILITY
    ({"credentials": BEARER}, [BARE_GREETING, b"P3 NO\r\n"]),  # ... -> DONE
    # TLS_CAPABILITY -> AUTHENTICATE, -> AUTHENTICATE_CONTINUATION
    ({"credentials": BEARER, "starttls": True},
     [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), TLS_CAPABILITY_REPLY]),
    ({"credentials": BEARER, "starttls": True},
     [BARE_GREETING, STARTTLS_OK, TlsStarted(), b"P5 OK\r\n"]),
    ({}, [b"* BYE busy\r\n"]),  # GREETING -> DONE
    ({}, [BARE_GREETING, b"P3 OK in\r\n", b"P4 OK\r\n"]),  # -> LOGIN -> CAPABILITY -> DONE
    ({}, [BARE_GREETING, LOGIN_OK]),  # LOGIN -> DONE
    ({"password": b"\xff"}, [PLAIN_GREETING, b"+ go\r\n"]),  # -> LOGIN_CONTINUATION -> LOGIN
    ({"password": b"\xff"}, [PLAIN_GREETING, b"P3 NO\r\n"]),  # LOGIN_CONTINUATION -> DONE
    ({"password": b"\xff"}, [PLAIN_GREETING, b"P3 OK in\r\n"]),  # ... -> CAPABILITY
    ({"starttls": True}, [BARE_GREETING, b"P1 NO\r\n"]),  # -> STARTTLS -> DONE
    ({"starttls": True}, [DOVECOT_GREETING, STARTTLS_OK, TlsStarted(), TLS_CAPABILITY_REPLY]),
    ({"starttls": True, "password": b"\xff"},
     [BARE_GREETING, STARTTLS_OK, TlsStarted(), b"P5 OK\r\n"]),  # -> LOGIN_CONTINUATION
    ({"starttls": True}, [BARE_GREETING, STARTTLS_OK, TlsStarted(), b"P5 BAD\r\n"]),
]


def test_every_step_change_in_the_table_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table holds what the dialogue does, no more: each entry is taken by a dialogue
    above, and _enter (which they all go through) refuses any step change not in it."""
    taken: set[tuple[Step, Step]] = set()
    enter = ImapBackendLogin._enter

    def recording_enter(self: ImapBackendLogin, new: Step) -> None:
        taken.add((self.step, new))
        enter(self, new)

    monkeypatch.setattr(ImapBackendLogin, "_enter", recording_enter)
    for kwargs, steps in _TABLE_TOUR:
        run(make(**kwargs), steps, split=False)
    assert taken == {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


# -- hypothesis -----------------------------------------------------------------------------

_backend_pieces = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([
        b"\r\n", b"\n", BARE_GREETING, DOVECOT_GREETING, PLAIN_GREETING, LOGIN_OK, b"+ go\r\n",
        b"P1 OK go\r\n", b"P1 NO\r\n", b"P3 OK in\r\n", b"P3 NO [UNAVAILABLE] x\r\n",
        b"P4 OK\r\n", b"* CAPABILITY IMAP4rev1 LITERAL+\r\n", b"* BYE\r\n", b"P2 OK\r\n",
        b"P5 OK\r\n", b"P5 NO\r\n",
        b"[", b"]", b"P3 OK [", b"* OK [CAPABILITY ",
    ]),
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(_backend_pieces, max_size=10).map(b"".join),
    starttls=st.booleans(),
    password=st.sampled_from([b"secret", b"\xff\xfe", b'a"b\\c']),
    client_id=st.sampled_from([(), (("name", "x"),)]),
)
def test_any_backend_stream(data: bytes, starttls: bool, password: bytes,
                            client_id: tuple[tuple[str, str | None], ...]) -> None:
    kwargs: dict[str, Any] = {"starttls": starttls, "password": password, "client_id": client_id}

    def replay(split: bool) -> list[Any]:
        session = make(**kwargs)
        out = run(session, [data], split=split)
        if StartBackendTLS() in out and session.step is Step.STARTTLS:
            out = normalise(out + run(session, [TlsStarted()], split=split), b"")
        return out

    whole = replay(False)
    split = replay(True)
    # Bytes behind the STARTTLS OK in the same read are refused as an injection; fed one
    # at a time they arrive after it, as they would over TLS. Otherwise both must agree.
    injected = starttls and any(isinstance(a, Failed) for a in whole) and StartBackendTLS() in split
    if not injected:
        assert split == whole
    outcomes = [a for a in whole if isinstance(a, BackendLoggedIn | Failed)]
    assert len(outcomes) <= 1
    if outcomes:
        assert whole[-1] == outcomes[0]
    for action in whole:
        assert isinstance(action, SendToBackend | StartBackendTLS | BackendLoggedIn | Failed)


# -- tokens (OAUTHBEARER, XOAUTH2): the client's message replayed in AUTHENTICATE --------



def test_token_goes_with_sasl_ir_when_offered() -> None:
    check([DOVECOT_GREETING, LOGIN_OK],
          [to_backend(b"P3 AUTHENTICATE OAUTHBEARER " + b64encode(OAUTH_MESSAGE) + b"\r\n"),
           BackendLoggedIn(LOGGED_IN_CAPS)], credentials=BEARER)


def test_token_waits_for_the_continuation_without_sasl_ir() -> None:
    check([PLAIN_GREETING, b"+ \r\n", LOGIN_OK],
          [to_backend(b"P3 AUTHENTICATE XOAUTH2\r\n"),
           to_backend(b64encode(b"user=bob\x01auth=Bearer tok3n.abc\x01\x01") + b"\r\n"),
           BackendLoggedIn(LOGGED_IN_CAPS)], credentials=XOAUTH)


def test_token_message_names_the_backend_login() -> None:
    message = b"n,a=bob@b=2Cx=3D,\x01host=mail\x01auth=Bearer tok3n.abc\x01\x01"
    check([DOVECOT_GREETING],
          [to_backend(b"P3 AUTHENTICATE OAUTHBEARER " + b64encode(message) + b"\r\n")],
          credentials=BEARER, login="bob@b,x=")


@pytest.mark.parametrize(("credentials", "dummy"), [(BEARER, b"AQ=="), (XOAUTH, b"")])
def test_failed_token_answers_the_error_challenge_then_fails_with_it(
        credentials: Credentials, dummy: bytes) -> None:
    session = check(
        [DOVECOT_GREETING, b"+ " + ERROR_JSON + b"\r\n",
         b"P3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        [to_backend(b"P3 AUTHENTICATE " + credentials.mechanism.encode() + b" "
                    + b64encode(credentials.message.reveal() if credentials.message else b"")
                    + b"\r\n"),
         to_backend(dummy + b"\r\n"),
         failed(TokenRefused(ERROR_JSON))],
        credentials=credentials)
    assert session.step is Step.DONE


def test_failed_token_error_carries_the_challenge() -> None:
    dialogue = make(credentials=BEARER)
    dialogue.receive_data(DOVECOT_GREETING)
    dialogue.receive_data(b"+ " + ERROR_JSON + b"\r\n")
    (action,) = dialogue.receive_data(b"P3 NO failed\r\n")
    assert isinstance(action, BackendLoginFailed)
    assert isinstance(action.error, TokenRefused) and action.error.challenge == ERROR_JSON


@pytest.mark.parametrize("challenge", [b"+ not base64!\r\n", b"+\r\n"])
def test_a_challenge_not_fit_for_a_client_gives_a_plain_failure(challenge: bytes) -> None:
    check([DOVECOT_GREETING, challenge, b"P3 NO failed\r\n"],
          [to_backend(b"P3 AUTHENTICATE OAUTHBEARER " + b64encode(OAUTH_MESSAGE) + b"\r\n"),
           to_backend(b"AQ==\r\n"), failed(AuthenticationFailed())], credentials=BEARER)


def test_a_second_challenge_is_a_protocol_error() -> None:
    check([DOVECOT_GREETING, b"+ " + ERROR_JSON + b"\r\n", b"+ more\r\n"],
          [to_backend(b"P3 AUTHENTICATE OAUTHBEARER " + b64encode(OAUTH_MESSAGE) + b"\r\n"),
           to_backend(b"AQ==\r\n"), failed(BackendProtocolError())], credentials=BEARER)


def test_token_refusal_with_a_passed_through_code_keeps_the_code() -> None:
    check([DOVECOT_GREETING, b"+ " + ERROR_JSON + b"\r\n", b"P3 NO [UNAVAILABLE] later\r\n"],
          [to_backend(b"P3 AUTHENTICATE OAUTHBEARER " + b64encode(OAUTH_MESSAGE) + b"\r\n"),
           to_backend(b"AQ==\r\n"), failed(BackendRefused("UNAVAILABLE", "later"))],
          credentials=BEARER)

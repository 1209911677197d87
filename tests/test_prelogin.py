"""Tests for imapproxy.prelogin: what the IMAP and POP3 pre-login sessions share, run
through both. Each protocol's own words, byte for byte, are in test_imap.py and
test_pop3.py."""

from __future__ import annotations

import pytest

from imapproxy.actions import Close, Login, SendToClient, Splice
from imapproxy.config import Limits
from imapproxy.errors import AuthenticationFailed
from imapproxy.imap import ImapSession
from imapproxy.pop3 import Pop3Session
from imapproxy.prelogin import PreLoginSession

Session = ImapSession | Pop3Session

#: a login and an unknown command, in each protocol
LOGIN = {ImapSession: b"a LOGIN u p\r\n", Pop3Session: b"USER u\r\nPASS p\r\n"}
UNKNOWN = {ImapSession: b"a FOO\r\n", Pop3Session: b"FOO\r\n"}


@pytest.fixture(params=[ImapSession, Pop3Session], ids=["imap", "pop3"])
def kind(request: pytest.FixtureRequest) -> type[Session]:
    return request.param  # type: ignore[no-any-return]


def new(kind: type[Session], **limits: int) -> Session:
    return kind(tls_active=True, starttls_available=False, plaintext_auth=False,
                limits=Limits(**limits))


def assert_silent(session: Session) -> None:
    """A session that is over says nothing more, whatever happens."""
    assert session.receive_data(b"a CAPABILITY\r\nCAPA\r\n") == []
    assert session.shutdown() == []
    assert session.timed_out() == []


def test_shutdown_says_the_protocol_line_then_closes(kind: type[Session]) -> None:
    session = new(kind)
    assert session.shutdown() == [SendToClient(kind.SHUTDOWN_LINE), Close("shutdown")]
    assert session.state is kind.CLOSED
    assert_silent(session)


def test_timeout_says_why_then_closes(kind: type[Session]) -> None:
    session = new(kind)
    [line, close] = session.timed_out()
    assert isinstance(line, SendToClient) and b"Autologout; idle for too long" in line.data
    assert close == Close(kind.TIMEOUT_REASON)
    assert_silent(session)


def test_a_relaying_session_has_nothing_more_to_say(kind: type[Session]) -> None:
    session = new(kind)
    assert isinstance(session.receive_data(LOGIN[kind])[-1], Login)
    assert session.state is kind.LOGGING_IN
    assert session.receive_data(b"held\r\n") == []  # the backend's, once logged in
    assert session.login_succeeded(None)[-1] == Splice(b"held\r\n")
    assert session.state is kind.RELAYING
    assert_silent(session)


def test_too_many_failed_logins_close(kind: type[Session]) -> None:
    session = new(kind, max_failed_logins=2)
    for attempt in (1, 2):
        session.receive_data(LOGIN[kind])
        actions = session.login_failed(AuthenticationFailed())
        assert session.failed_logins == attempt
    assert actions[-1] == Close("too many failed logins")
    assert session.state is kind.CLOSED


def test_too_many_bad_commands_close(kind: type[Session]) -> None:
    session = new(kind, max_bad_commands=2)
    assert not any(isinstance(a, Close) for a in session.receive_data(UNKNOWN[kind]))
    actions = session.receive_data(UNKNOWN[kind])
    assert session.bad_commands == 2
    assert isinstance(actions[-1], Close)
    assert session.state is kind.CLOSED


def test_a_state_change_outside_the_table_is_a_bug(kind: type[Session]) -> None:
    session = new(kind)
    with pytest.raises(AssertionError, match="illegal transition"):
        session._enter(kind.RELAYING)  # no login ran


def test_sessions_hold_no_per_instance_dict(kind: type[Session]) -> None:
    # Every connection waiting for its login holds one: __slots__ all the way down.
    assert not hasattr(new(kind), "__dict__")


def test_the_base_is_no_session_by_itself() -> None:
    with pytest.raises(TypeError, match="abstract"):
        PreLoginSession(None, tls_active=True, starttls_available=False,  # type: ignore
                        plaintext_auth=False, limits=Limits())

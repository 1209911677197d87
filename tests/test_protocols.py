"""protocols: each listener protocol's pre-login session and its refusal line, as bytes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from imapproxy.config import AuthConfig, Config, Limits, Listener, TlsConfig
from imapproxy.errors import BackendUnavailable, TooManyConnections
from imapproxy.imap import ImapSession
from imapproxy.managesieve import ManageSieveSession
from imapproxy.pop3 import Pop3Session
from imapproxy.protocols import FRONTEND_SESSIONS, REFUSALS, new_session


def test_every_protocol_has_a_session_and_a_refusal() -> None:
    assert set(FRONTEND_SESSIONS) == set(REFUSALS) == {"imap", "pop3", "managesieve"}


def test_refusals_in_place_of_the_greeting() -> None:
    # RFC 3501 7.1.5 (BYE as the greeting, RFC 5530 code), RFC 2449 8 / RFC 3206,
    # RFC 5804 1.3 (TRYLATER).
    error = TooManyConnections("too many connections")
    assert REFUSALS["imap"](error).startswith(b"* BYE [UNAVAILABLE] ")
    assert REFUSALS["pop3"](error).startswith(b"-ERR [SYS/TEMP] ")
    assert REFUSALS["managesieve"](error).startswith(b"BYE (TRYLATER) ")
    for line in (REFUSALS[p](BackendUnavailable("x")) for p in REFUSALS):
        assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1


def _config(plaintext_auth: bool) -> Config:
    """The parts of a Config that a new session reads."""
    return SimpleNamespace(tls=TlsConfig(plaintext_auth=plaintext_auth),  # type: ignore[return-value]
                           auth=AuthConfig(("PLAIN", "OAUTHBEARER")), limits=Limits())


@pytest.mark.parametrize(("protocol", "kind"), [("imap", ImapSession), ("pop3", Pop3Session),
                                                 ("managesieve", ManageSieveSession)])
def test_new_session_by_the_listener(protocol: str, kind: type) -> None:
    implicit = Listener(protocol=protocol, host="127.0.0.1", port=1, tls="implicit")
    session = new_session(implicit, _config(plaintext_auth=False))
    assert isinstance(session, kind)
    assert session.tls_active and not session.starttls_available
    starttls = Listener(protocol=protocol, host="127.0.0.1", port=1, tls="starttls")
    session = new_session(starttls, _config(plaintext_auth=False))
    assert not session.tls_active and session.starttls_available


def test_the_imap_session_offers_the_configured_mechanisms_after_tls_only() -> None:
    listener = Listener(protocol="imap", host="127.0.0.1", port=1, tls="implicit")
    capabilities = new_session(listener, _config(plaintext_auth=False)).capabilities()
    assert b"AUTH=PLAIN" in capabilities and b"AUTH=OAUTHBEARER" in capabilities
    listener = Listener(protocol="imap", host="127.0.0.1", port=1, tls="starttls")
    capabilities = new_session(listener, _config(plaintext_auth=False)).capabilities()
    assert b"LOGINDISABLED" in capabilities and b"AUTH=" not in capabilities

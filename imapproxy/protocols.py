# -*- test-case-name: tests.test_protocols -*-
"""The protocols a listener may speak, and what each brings before login: its pre-login
session (imap.py, pop3.py, managesieve.py) and the line that refuses a connection in
place of its greeting. Sans-IO: frontend.py looks them up here by the listener's
``protocol`` key, never by building a name from input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Config, Listener
from .errors import ProxyError
from .imap import ImapSession
from .imapwire import response
from .managesieve import ManageSieveSession, SieveCapabilities
from .pop3 import Pop3Session
from .pop3wire import reply
from .sievewire import response as sieve_response

#: protocol name -> front-end session class (both take the same keyword arguments)
FRONTEND_SESSIONS: dict[str, Callable[..., Any]] = {"imap": ImapSession, "pop3": Pop3Session,
                                                    "managesieve": ManageSieveSession}

#: protocol name -> the line refusing a connection in place of the greeting: RFC 3501
#: section 7.1.5 allows BYE as the greeting; RFC 2449 section 8 codes for POP3; RFC 5804
#: section 1.3: BYE may come at any time, (TRYLATER) says when to come back.
REFUSALS: dict[str, Callable[[ProxyError], bytes]] = {
    "imap": lambda e: response(b"*", b"BYE", e.client_text(), e.imap_code),
    "pop3": lambda e: reply(False, e.client_text(), e.pop3_code),
    "managesieve": lambda e: sieve_response(
        b"BYE", e.client_text(), e.sieve_code.encode() if e.sieve_code else None),
}


def new_session(listener: Listener, config: Config,
                sieve: SieveCapabilities | None = None) -> Any:
    """The pre-login session for a new client of this listener; ``sieve``: what the
    ManageSieve greeting says of the backends (runtime.Shared.sieve)."""
    extra: dict[str, Any] = {"mechanisms": config.auth.mechanisms}
    if listener.protocol == "managesieve":
        extra["sieve"] = sieve
    return FRONTEND_SESSIONS[listener.protocol](
        tls_active=listener.tls == "implicit", starttls_available=listener.tls == "starttls",
        plaintext_auth=config.tls.plaintext_auth, limits=config.limits, **extra)

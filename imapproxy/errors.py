"""The proxy's error hierarchy; each error knows the reply a client gets for it.

Modelled on h11's ``error_status_hint``: the code that raises an error decides what
it means, the adapter only renders it.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""

    #: RFC 5530 response code for IMAP (without brackets), None for none.
    imap_code: str | None = None
    #: RFC 3206 / RFC 2449 response code for POP3.
    pop3_code: str | None = None
    #: RFC 5804 section 1.3 response code for ManageSieve, in wire form ("TRYLATER").
    sieve_code: str | None = None
    #: Text safe to show to the client.
    public_text: str = "Internal error"

    def client_text(self) -> str:
        return self.public_text


class ClientProtocolError(ProxyError):
    """The client broke the protocol (bad syntax, oversized line, ...)."""

    imap_code = None
    public_text = "Protocol error"

    def __init__(self, text: str, *, fatal: bool = False) -> None:
        super().__init__(text)
        self.public_text = text
        #: fatal errors end the session (framing is lost), others get BAD and go on.
        self.fatal = fatal


class BackendProtocolError(ProxyError):
    """The backend said something we could not understand."""

    imap_code = "UNAVAILABLE"
    pop3_code = "SYS/TEMP"
    sieve_code = "TRYLATER"  # RFC 5804 section 1.3: try again later
    public_text = "Backend error, try again later"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        #: what went wrong, for the operator's log line (never for the client)
        self.detail = f"protocol error: {detail}" if detail else "protocol error"


class AuthenticationFailed(ProxyError):
    """Wrong credentials, or a user we cannot route: the client sees the same answer."""

    imap_code = "AUTHENTICATIONFAILED"
    pop3_code = "AUTH"
    public_text = "Authentication failed"


class TokenRefused(AuthenticationFailed):
    """The backend refused an OAuth token (OAUTHBEARER, XOAUTH2) and said why in a SASL
    challenge (RFC 7628 section 3.2.2): the client is shown that challenge before the NO."""

    def __init__(self, challenge: bytes) -> None:
        super().__init__()
        #: the backend's challenge, still base64 (checked to be nothing else)
        self.challenge = challenge


class UserNotFound(AuthenticationFailed):
    """No route for this user. Answered exactly like a wrong password (no enumeration)."""


class InvalidUsername(AuthenticationFailed):
    """A name no mailbox can have (too long, control characters): refused before any
    lookup, and answered like a wrong password."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        #: for the log line, never for the client
        self.detail = detail


class DirectoryUnavailable(ProxyError):
    """The directory could not be asked and nothing cached could answer."""

    imap_code = "UNAVAILABLE"
    pop3_code = "SYS/TEMP"
    sieve_code = "TRYLATER"  # RFC 5804 section 1.3: try again later
    public_text = "Service temporarily unavailable, try again later"


class BackendUnavailable(ProxyError):
    """No backend for this user could be reached in time."""

    imap_code = "UNAVAILABLE"
    pop3_code = "SYS/TEMP"
    sieve_code = "TRYLATER"  # RFC 5804 section 1.3: try again later
    public_text = "Service temporarily unavailable, try again later"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        #: why, for the operator's log line: "connection refused", "connect timed out",
        #: "TLS: certificate not trusted", ... (never for the client)
        self.detail = detail


class LoginDropped(AuthenticationFailed):
    """The backend closed the connection on the credentials the client sent (a name
    Dovecot finds too long, say): a refused login, not a backend failure."""

    def __init__(self) -> None:
        super().__init__()
        self.detail = "the backend closed the connection on the credentials"


class BackendRefused(ProxyError):
    """The backend refused the login with a response code worth passing on (RFC 5530)."""

    pop3_code = "AUTH"

    def __init__(self, code: str, text: str, pop3_code: str = "AUTH", *,
                 sieve_code: str | None = None, bye: bool = False) -> None:
        super().__init__(code)
        self.imap_code = code
        self.pop3_code = pop3_code
        self.sieve_code = sieve_code
        self.public_text = text
        #: ManageSieve: the backend said BYE (REFERRAL ...), so the client is told BYE
        #: and the connection closes (RFC 5804 section 1.3)
        self.bye = bye


class TooManyConnections(ProxyError):
    """A connection limit was reached (limits.py); the client may come back later."""

    imap_code = "UNAVAILABLE"
    pop3_code = "SYS/TEMP"
    sieve_code = "TRYLATER"  # RFC 5804 section 1.3: try again later

    def __init__(self, text: str = "Too many connections, try again later") -> None:
        super().__init__(text)
        self.public_text = text


class RoutingLoop(BackendUnavailable):
    """The route leads back to one of the proxy's own listeners (routingloops.py)."""

    def __init__(self) -> None:
        super().__init__("routing loop: the route leads back to a proxy")


class LoginsRefused(TooManyConnections):
    """Too many login attempts wait for this address or user (penalty.py): refused,
    unchecked."""

    def __init__(self, reason: str) -> None:
        super().__init__("Too many login attempts, try again later")
        self.reason = reason


class LoginQueueFull(TooManyConnections):
    """Too many logins wait for their turn (admission pacing, pacing.py): refused at once,
    unchecked; the client may come back later (RFC 5530 UNAVAILABLE, RFC 3206 SYS/TEMP,
    RFC 5804 TRYLATER)."""

    #: for the log line
    reason = "too many logins waiting for their turn"

    def __init__(self) -> None:
        super().__init__("Too many logins at once, try again later")

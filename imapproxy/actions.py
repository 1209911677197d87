"""Actions the sans-IO sessions ask their Twisted adapters to carry out.

Sessions never touch a transport: they return lists of these, and the adapter in
protocol.py executes them in order (mitmproxy's commands, h11's events).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .credentials import Credentials
from .errors import ProxyError


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Start the TLS handshake with the client now (after the OK to STARTTLS/STLS)."""


@dataclass(frozen=True, slots=True)
class Login:
    """Look the user up, connect to the backend and log in there with these credentials."""

    credentials: Credentials
    #: the client's IMAP ID parameters (RFC 2971), to pass on to the backend
    client_id: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Splice:
    """Login done: relay bytes both ways. ``trailing`` is what the client pipelined."""

    trailing: bytes = b""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection after flushing what was sent. ``reason`` is for the log."""

    reason: str


# Backend login dialogue actions (imapbackend.py, pop3backend.py)


@dataclass(frozen=True, slots=True)
class SendToBackend:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartBackendTLS:
    """Start TLS towards the backend now (after its OK to our STARTTLS/STLS)."""


@dataclass(frozen=True, slots=True)
class BackendLoggedIn:
    """The backend accepted the login. ``capabilities`` is its post-login list, if known."""

    capabilities: bytes | None
    #: bytes the backend sent after its final login reply, to go to the client
    trailing: bytes = b""


@dataclass(frozen=True, slots=True)
class BackendLoginFailed:
    error: ProxyError


Action = (
    SendToClient | StartClientTLS | Login | Splice | Close
)
BackendAction = SendToBackend | StartBackendTLS | BackendLoggedIn | BackendLoginFailed

"""Actions the sans-IO parts ask their Twisted adapters to carry out.

They never touch a transport, a clock or a socket: the pre-login sessions (imap.py,
pop3.py) and the backend login dialogues (imapbackend.py, pop3backend.py) return lists
of these, the relay's policy (relaysession.py) too, and the login (login.py) yields them
one by one and is sent what came of each. The adapters (frontend.py, backendconn.py,
relay.py) carry them out in order, each in one flat chain (mitmproxy's commands).
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


# What the relay's policy asks (relaysession.py), besides SendToClient, SendToBackend, Close


@dataclass(frozen=True, slots=True)
class PauseClient:
    """Stop reading the client (a drain: no new command may start)."""


@dataclass(frozen=True, slots=True)
class Log:
    """A log line about this session (the adapter adds the session's id)."""

    level: str
    text: str


# What a login asks (login.py): each is carried out, and its result (or error) sent back


@dataclass(frozen=True, slots=True)
class WaitForPenalty:
    """Wait for the brute-force penalty's admission (penaltygate.py): an Admission, or
    LoginsRefused."""

    address: str
    user_key: bytes


@dataclass(frozen=True, slots=True)
class WaitForTurn:
    """Wait for this login's turn (admission pacing, pacing.py): the seconds it waited,
    None when pacing is off, or LoginQueueFull."""


@dataclass(frozen=True, slots=True)
class FinishPenalty:
    """Tell the penalty what the admitted attempt's check found."""

    admission: object
    outcome: object
    fingerprint: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the directory for the user's route: a Route, or a ProxyError."""

    name: str
    protocol: str
    backend_login: str


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to one server (the route's Server, at ``port``): the connection, nothing
    said on it yet, or a BackendUnavailable saying why not."""

    server: object
    port: int
    #: a PROXY v2 header to send first ([backend] forward_client = "proxy-v2")
    proxy_header: bytes = b""


@dataclass(frozen=True, slots=True)
class LogInAtBackend:
    """Run ``dialogue`` (a backend login dialogue) on a dialled connection: the logged-in
    connection, or a ProxyError saying why not."""

    backend: object
    dialogue: object = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseBackend:
    """Close a backend connection the login will not use."""

    backend: object
    abort: bool = False


@dataclass(frozen=True, slots=True)
class ClaimSession:
    """Count the logged-in session on every instance ([shared], redisstate.py): None,
    or limits.Refusal.PER_USER_CLIENT when that makes more than ``limit``."""

    user: str
    #: the client address as the limits count it (limits.client_key)
    client: str
    limit: int


@dataclass(frozen=True, slots=True)
class LoginLog:
    """A log line about this login: ``text`` is ready, ``fields`` go along for JSON."""

    level: str
    text: str
    fields: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class CountLogin:
    """imapproxy_logins{protocol, result, reason}."""

    result: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CountRefusal:
    """imapproxy_refused{limit}."""

    limit: str


@dataclass(frozen=True, slots=True)
class CountTurn:
    """imapproxy_login_wait_seconds, and imapproxy_logins_paced if it waited."""

    waited: float


@dataclass(frozen=True, slots=True)
class CountBackendFailure:
    """imapproxy_backend_failures{backend, reason}."""

    backend: str
    reason: str


Action = (
    SendToClient | StartClientTLS | Login | Splice | Close
)
BackendAction = SendToBackend | StartBackendTLS | BackendLoggedIn | BackendLoginFailed
LoginAction = (WaitForPenalty | WaitForTurn | FinishPenalty | Lookup | Dial | LogInAtBackend
               | CloseBackend | ClaimSession | LoginLog | CountLogin | CountRefusal | CountTurn
               | CountBackendFailure)

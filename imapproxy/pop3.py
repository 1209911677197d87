"""The POP3 dialogue before login, spoken by the proxy itself: sans-IO.

Same shape as imap.py: bytes go in through ``receive_data``, the outcome of the login
comes back through ``login_succeeded``/``login_failed``, and every method returns the
actions (actions.py) for the adapter to carry out. The session ends in ``Splice``.
The line framing is in pop3wire.py, shared with the backend dialogue (pop3backend.py).
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from enum import Enum, auto
from typing import ClassVar

from .actions import Action, Login, SendToClient, Splice, StartClientTLS
from .config import Limits
from .credentials import Credentials, Secret, decode_username
from .crossprotocol import is_http_request_line
from .errors import ClientProtocolError, ProxyError
from .pop3wire import LineReader, LineTooLong, reply
from .prelogin import PreLoginSession
from .sasl import (
    DEFAULT_MECHANISMS,
    MECHANISMS,
    Challenge,
    ServerExchange,
    failure_challenge,
)

#: Bytes a client may pipeline behind PASS/AUTH while the backend login runs. The adapter
#: pauses reading during login, so only what was already in flight can arrive; 64 KiB is
#: far above any real burst of pipelined POP3 commands (RFC 2449 section 6.6).
MAX_PIPELINED_DURING_LOGIN = 65536


class State(Enum):
    #: reading commands before login (RFC 1939 section 4)
    AUTHORIZATION = auto()
    #: USER was accepted; PASS may follow (RFC 1939 section 7)
    USER_GIVEN = auto()
    #: AUTH sent "+ "; the next line is the SASL response (RFC 5034 section 4), or the
    #: dummy response to a backend's error challenge (RFC 7628 section 3.2.3)
    AUTH_RESPONSE = auto()
    #: waiting for lookup and backend login; client bytes are held back, unparsed
    LOGGING_IN = auto()
    #: handed over to the relay
    RELAYING = auto()
    CLOSED = auto()


# Rule: every state change goes through Pop3Session._enter (prelogin.py), checked against
# this table.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.AUTHORIZATION: frozenset(
        {State.USER_GIVEN, State.AUTH_RESPONSE, State.LOGGING_IN, State.CLOSED}),
    State.USER_GIVEN: frozenset(
        {State.AUTHORIZATION, State.AUTH_RESPONSE, State.LOGGING_IN, State.CLOSED}),
    State.AUTH_RESPONSE: frozenset({State.AUTHORIZATION, State.LOGGING_IN, State.CLOSED}),
    State.LOGGING_IN: frozenset({State.AUTHORIZATION, State.AUTH_RESPONSE, State.RELAYING,
                                 State.CLOSED}),
    State.RELAYING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}

# Commands of the TRANSACTION state (RFC 1939 sections 5 and 7), answered with a hint
# instead of "unknown command".
_NEEDS_LOGIN = frozenset(b"STAT LIST RETR DELE NOOP RSET TOP UIDL LAST".split())

Handler = Callable[["Pop3Session", bytes | None], list[Action]]

DEFAULT_LIMITS = Limits()


class Pop3Session(PreLoginSession):
    """One client's pre-login POP3 session."""

    __slots__ = ("mechanisms", "_lines", "_username", "_sasl", "_refusal",
                 "_login_mechanism")

    state: State
    TRANSITIONS = TRANSITIONS
    LOGGING_IN = State.LOGGING_IN
    RELAYING = State.RELAYING
    CLOSED = State.CLOSED
    #: RFC 3206 section 4: [SYS/TEMP] tells the client to retry later.
    SHUTDOWN_LINE = b"-ERR [SYS/TEMP] Shutting down\r\n"
    TIMEOUT_REASON = "Autologout; idle for too long"
    TOO_MANY_FAILED_LOGINS = b""  # the -ERR of the last failure is the last word
    _max_held = MAX_PIPELINED_DURING_LOGIN

    def __init__(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                 limits: Limits = DEFAULT_LIMITS,
                 mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS) -> None:
        super().__init__(State.AUTHORIZATION, tls_active=tls_active,
                         starttls_available=starttls_available, plaintext_auth=plaintext_auth,
                         limits=limits)
        #: the SASL mechanisms offered ([auth] mechanisms)
        self.mechanisms = mechanisms
        self._lines = LineReader(limits.max_line)
        self._username: str | None = None
        #: the AUTH under way
        self._sasl: ServerExchange | None = None
        #: a backend's refusal of a token, said once the client answered its challenge
        self._refusal: ProxyError | None = None
        #: the mechanism of the login under way
        self._login_mechanism = ""

    # -- inputs --------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The greeting (RFC 1939 section 4)."""
        return [SendToClient(reply(True, "POP3 proxy ready"))]

    def login_succeeded(self, capabilities: bytes | None = None) -> list[Action]:
        """The backend accepted the login: answer the client and hand over to the relay.

        ``capabilities`` is for IMAP; POP3 clients ask CAPA again after login, and that
        goes to the backend (RFC 2449 section 5).
        """
        self._enter(State.RELAYING)
        # Commands pipelined behind PASS/AUTH (RFC 2449 section 6.6) are the backend's now.
        return [SendToClient(reply(True, "Logged in")), Splice(self._lines.take_buffer())]

    def login_failed(self, error: ProxyError) -> list[Action]:
        """The lookup or the backend said no; the client may try again (within limits)."""
        challenge = failure_challenge(self._login_mechanism, error)
        if challenge is not None:
            # RFC 7628 section 3.2.2: a token's error challenge goes to the client, which
            # answers with a dummy response; then the -ERR (in _sasl_response).
            self._refusal = error
            self._enter(State.AUTH_RESPONSE)
            return [SendToClient(b"+ " + challenge + b"\r\n"), *self._process()]
        self._enter(State.AUTHORIZATION)
        return self._login_refused(error) + self._process()

    def _login_refused(self, error: ProxyError) -> list[Action]:
        return self._refuse_login(reply(False, error.client_text(), error.pop3_code))

    # -- capabilities -------------------------------------------------------------------

    def capabilities(self) -> list[bytes]:
        """The CAPA list (RFC 2449 section 6, RFC 2595 section 4, RFC 5034 section 6)."""
        caps: list[bytes] = []
        if self.login_allowed:
            # RFC 2595 section 4: don't advertise plaintext mechanisms that are refused.
            caps.append(b"USER")
            if self.mechanisms:
                caps.append(b"SASL " + " ".join(self.mechanisms).encode("ascii"))
        if self.starttls_available:
            caps.append(b"STLS")
        caps += [b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION imapproxy"]
        return caps

    # -- processing -----------------------------------------------------------------------

    def _goodbye(self, text: str) -> bytes:
        return reply(False, text)

    @property
    def _input(self) -> LineReader:
        return self._lines

    def _process(self) -> list[Action]:
        actions: list[Action] = []
        while self.state in (State.AUTHORIZATION, State.USER_GIVEN, State.AUTH_RESPONSE):
            line = self._lines.next_line()
            if line is None:
                break
            if isinstance(line, LineTooLong):
                if self.state is State.AUTH_RESPONSE and self._refusal is not None:
                    actions += self._sasl_response(b"")  # the failed login's -ERR
                    continue
                if self.state is State.AUTH_RESPONSE:
                    self._sasl = None
                    self._enter(State.AUTHORIZATION)
                actions += self._bad("Line too long")
            elif self.state is State.AUTH_RESPONSE:
                actions += self._sasl_response(line)
            else:
                actions += self._command(line)
        return actions

    def _bad(self, text: str) -> list[Action]:
        """A -ERR for a command we could not act on; too many of them end the session."""
        if self._count_bad_command():
            return self._fatal(text + "; too many invalid commands, closing")
        return [SendToClient(reply(False, text))]

    def _command(self, line: bytes) -> list[Action]:
        if is_http_request_line(line):
            # A browser sent here (ALPACA): close without a reply, and read nothing more.
            return [self._close("HTTP request")]
        # RFC 1939 section 3: a case-insensitive keyword, then arguments after one space.
        keyword, space, argument = line.partition(b" ")
        name = keyword.upper()
        handler = self._COMMANDS[self.state].get(name)
        if self.state is State.USER_GIVEN and name != b"PASS":
            self._username = None
            self._enter(State.AUTHORIZATION)
        if handler is None:
            if not name:
                return self._bad("Empty command")
            if name == b"APOP":
                return self._bad("APOP is not supported, use USER/PASS or AUTH PLAIN")
            if name in _NEEDS_LOGIN:
                return self._bad("Log in first")
            return self._bad("Unknown command")
        return handler(self, argument if space else None)

    def _capa(self, argument: bytes | None) -> list[Action]:
        if argument is not None:
            return self._bad("CAPA takes no arguments")
        # RFC 2449 section 5: a multi-line reply; no capability starts with ".".
        body = b"".join(cap + b"\r\n" for cap in self.capabilities())
        return [SendToClient(reply(True, "Capability list follows") + body + b".\r\n")]

    def _quit(self, argument: bytes | None) -> list[Action]:
        if argument is not None:
            return self._bad("QUIT takes no arguments")
        # RFC 1939 section 4: QUIT in the AUTHORIZATION state just says goodbye.
        return [SendToClient(reply(True, "Bye")), self._close("quit")]

    def _stls(self, argument: bytes | None) -> list[Action]:
        if argument is not None:
            return self._bad("STLS takes no arguments")
        if not self.starttls_available:
            return self._bad("STLS not available")
        # RFC 2595 section 4 (and RFC 3207's reasoning): whatever the client pipelined
        # after STLS arrived in plaintext and must not be acted on after the handshake.
        self._lines.discard()
        self.tls_active = True
        self.starttls_available = False
        return [SendToClient(reply(True, "Begin TLS negotiation now")), StartClientTLS()]

    def _refuse_plaintext(self) -> list[Action]:
        # RFC 3206 section 4: [AUTH] marks a problem with the credentials or their use.
        hint = ": use STLS first" if self.starttls_available else ""
        return [SendToClient(reply(False, "TLS required" + hint, "AUTH"))]

    def _user(self, argument: bytes | None) -> list[Action]:
        if not self.login_allowed:
            return self._refuse_plaintext()
        if not argument:
            return self._bad("USER needs a name")
        try:
            self._username = decode_username(argument)
        except ClientProtocolError as e:
            return self._bad(e.public_text)
        self._enter(State.USER_GIVEN)
        return [SendToClient(reply(True, "Send PASS"))]

    def _pass_without_user(self, argument: bytes | None) -> list[Action]:
        if not self.login_allowed:
            return self._refuse_plaintext()
        return self._bad("Send USER first")

    def _pass(self, argument: bytes | None) -> list[Action]:
        username, self._username = self._username, None
        assert username is not None
        self._enter(State.AUTHORIZATION)
        if not argument:
            return self._bad("PASS needs a password")
        # RFC 1939 section 7: PASS has one argument, so spaces belong to the password.
        return self._begin_login(Credentials(username, Secret(argument), "", "USER"))

    def _auth(self, argument: bytes | None) -> list[Action]:
        if not self.login_allowed:
            return self._refuse_plaintext()
        if argument is None:
            # Not in RFC 5034, but RFC 1734 clients send a bare AUTH to list mechanisms.
            listing = b"".join(name.encode("ascii") + b"\r\n" for name in self.mechanisms)
            return [SendToClient(reply(True, "Supported mechanisms follow") + listing
                                 + b".\r\n")]
        mechanism, space, initial = argument.partition(b" ")
        name = mechanism.upper().decode("ascii", "replace")
        if name not in self.mechanisms or name not in MECHANISMS:
            return self._bad("Unsupported authentication mechanism")
        self._sasl = ServerExchange(name)
        # RFC 5034 section 4: "=" stands for an empty initial response (sasl.py).
        return self._sasl_step(initial if space else None, first=True)

    def _sasl_response(self, line: bytes) -> list[Action]:
        self._enter(State.AUTHORIZATION)
        if self._refusal is not None:
            # The dummy response to the backend's error challenge (RFC 7628 section
            # 3.2.3), or "*": either way the login has failed.
            error, self._refusal = self._refusal, None
            return self._login_refused(error)
        if line == b"*":
            # RFC 5034 section 4: "*" cancels, and the server rejects the AUTH with -ERR.
            self._sasl = None
            return self._bad("AUTH cancelled")
        return self._sasl_step(line, first=False)

    def _sasl_step(self, line: bytes | None, *, first: bool) -> list[Action]:
        """One client message of the exchange: a challenge back, or the login begins."""
        assert self._sasl is not None
        try:
            step = self._sasl.start(line) if first else self._sasl.respond(line or b"")
        except ClientProtocolError as e:
            self._sasl = None
            return self._bad(f"AUTH: {e.public_text}")
        except ProxyError as e:
            self._sasl = None
            return self._login_refused(e)
        if isinstance(step, Challenge):
            self._enter(State.AUTH_RESPONSE)
            # RFC 5034 section 4: "+" SP base64 (empty for an empty challenge).
            return [SendToClient(b"+ " + b64encode(step.data) + b"\r\n")]
        self._sasl = None
        return self._begin_login(step.credentials)

    def _begin_login(self, credentials: Credentials) -> list[Action]:
        self._login_mechanism = credentials.mechanism
        self._enter(State.LOGGING_IN)
        return [Login(credentials)]

    # The commands each reading state accepts: one table for all sessions, not dicts of
    # bound methods in each. USER_GIVEN adds PASS; any other command there forgets the
    # name first (RFC 1939 section 7: PASS must follow USER).
    _AUTHORIZATION: ClassVar[dict[bytes, Handler]] = {
        b"CAPA": _capa,
        b"STLS": _stls,
        b"USER": _user,
        b"PASS": _pass_without_user,
        b"AUTH": _auth,
        b"QUIT": _quit,
    }
    _COMMANDS: ClassVar[dict[State, dict[bytes, Handler]]] = {
        State.AUTHORIZATION: _AUTHORIZATION,
        State.USER_GIVEN: {**_AUTHORIZATION, b"PASS": _pass},
    }

"""The IMAP dialogue before login, spoken by the proxy itself: sans-IO.

Bytes go in through ``receive_data``, results of the login come back through
``login_succeeded``/``login_failed``, and every method returns the actions
(actions.py) for the adapter to carry out. The session ends in ``Splice``.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from typing import ClassVar

from .actions import Action, Close, Login, SendToClient, Splice, StartClientTLS
from .config import Limits
from .credentials import Credentials, Secret, decode_username
from .crossprotocol import is_http_request_line
from .errors import ClientProtocolError, ProxyError
from .imapwire import (
    BYE_SHUTDOWN,
    ArgumentReader,
    CommandAssembler,
    CommandReceived,
    LiteralRejected,
    NeedContinuation,
    response,
)
from .prelogin import COMMAND_TRANSITIONS, CommandState, PreLoginSession
from .sasl import (
    DEFAULT_MECHANISMS,
    MECHANISMS,
    Challenge,
    ServerExchange,
    failure_challenge,
)

# RFC 3501 section 3: NOT_AUTHENTICATED until LOGIN or AUTHENTICATE (its "+" and the
# SASL response, RFC 3501 section 6.2.2) succeeds; every state change goes through
# ImapSession._enter, checked against the table (prelogin.py, shared with ManageSieve).
State = CommandState
TRANSITIONS = COMMAND_TRANSITIONS

# Commands valid only after login, answered with a hint instead of "unknown command".
_NEEDS_LOGIN = frozenset(
    b"SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND "
    b"CHECK CLOSE EXPUNGE SEARCH FETCH STORE COPY MOVE UID IDLE ENABLE NAMESPACE GETQUOTA "
    b"GETQUOTAROOT SETQUOTA GETACL SETACL MYRIGHTS LISTRIGHTS COMPRESS UNSELECT GETMETADATA "
    b"SETMETADATA NOTIFY XLIST".split()
)

Handler = Callable[["ImapSession", bytes, ArgumentReader], list[Action]]

SERVER_ID = b'* ID ("name" "imapproxy")\r\n'
DEFAULT_LIMITS = Limits()


class ImapSession(PreLoginSession):
    """One client's pre-login IMAP session."""

    __slots__ = ("client_id", "mechanisms", "_wire", "_pending_tag", "_sasl", "_refusal",
                 "_login_mechanism")

    state: State
    TRANSITIONS = TRANSITIONS
    LOGGING_IN = State.LOGGING_IN
    RELAYING = State.RELAYING
    CLOSED = State.CLOSED
    SHUTDOWN_LINE = BYE_SHUTDOWN
    TIMEOUT_REASON = "pre-auth timeout"
    TOO_MANY_FAILED_LOGINS = b"* BYE Too many failed logins\r\n"

    def __init__(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                 limits: Limits = DEFAULT_LIMITS,
                 mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS) -> None:
        super().__init__(State.NOT_AUTHENTICATED, tls_active=tls_active,
                         starttls_available=starttls_available, plaintext_auth=plaintext_auth,
                         limits=limits)
        self.client_id: tuple[tuple[str, str | None], ...] = ()
        #: the SASL mechanisms offered ([auth] mechanisms)
        self.mechanisms = mechanisms
        self._wire = CommandAssembler(limits.max_line, limits.max_preauth_literal)
        self._pending_tag = b"*"
        #: the AUTHENTICATE under way
        self._sasl: ServerExchange | None = None
        #: a backend's refusal of a token, said once the client answered its challenge
        self._refusal: ProxyError | None = None
        #: the mechanism of the login under way
        self._login_mechanism = ""

    # -- inputs --------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The greeting (RFC 3501 section 7.1.1, with a CAPABILITY response code)."""
        greeting = b"* OK [CAPABILITY " + self.capabilities() + b"] IMAP proxy ready\r\n"
        return [SendToClient(greeting)]

    def login_succeeded(self, capabilities: bytes | None) -> list[Action]:
        """The backend accepted the login: answer the client and hand over to the relay.

        Returns no actions when the session ended meanwhile (timeout, drain): the
        adapter then closes the backend connection.
        """
        if self.state is not State.LOGGING_IN:
            return []
        self._enter(State.RELAYING)
        code = b"" if capabilities is None else b"[CAPABILITY " + capabilities + b"] "
        reply = self._pending_tag + b" OK " + code + b"Logged in\r\n"
        return [SendToClient(reply), Splice(self._wire.take_buffer())]

    def login_failed(self, error: ProxyError) -> list[Action]:
        """The lookup or the backend said no; the client may try again (within limits)."""
        if self.state is not State.LOGGING_IN:
            return []
        challenge = failure_challenge(self._login_mechanism, error)
        if challenge is not None:
            # RFC 7628 section 3.2.2: a token's error challenge goes to the client, which
            # answers with a dummy response; then the NO (in _sasl_response).
            self._refusal = error
            self._enter(State.AUTHENTICATE)
            return [SendToClient(b"+ " + challenge + b"\r\n"), *self._process()]
        self._enter(State.NOT_AUTHENTICATED)
        actions = self._login_refused(self._pending_tag, error)
        if isinstance(actions[-1], Close):  # too many failures: nothing more is read
            return actions
        return actions + self._process()

    def _login_refused(self, tag: bytes, error: ProxyError) -> list[Action]:
        return self._refuse_login(response(tag, b"NO", error.client_text(), error.imap_code))

    # -- capabilities -------------------------------------------------------------------

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"IDLE"]
        if self.starttls_available:
            caps.append(b"STARTTLS")
        # RFC 3501 section 6.2.3: LOGINDISABLED while plaintext login is refused; and no
        # AUTH= mechanism then either (RFC 3501 section 6.2.1, RFC 4959).
        if self.login_allowed:
            caps += [b"AUTH=" + name.encode("ascii") for name in self.mechanisms]
        else:
            caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    # -- processing -----------------------------------------------------------------------

    def _goodbye(self, text: str) -> bytes:
        return b"* BYE " + text.encode() + b"\r\n"

    @property
    def _input(self) -> CommandAssembler:
        return self._wire

    @property
    def _max_held(self) -> int:
        return self._wire.max_command

    def _process(self) -> list[Action]:
        actions: list[Action] = []
        while self.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATE):
            try:
                event = self._wire.next_event()
            except ClientProtocolError as e:
                return actions + self._fatal(e.public_text)
            if event is None:
                break
            if isinstance(event, NeedContinuation):
                if self.state is State.AUTHENTICATE:
                    return actions + self._fatal("Invalid SASL response")
                actions.append(SendToClient(b"+ Ready for literal data\r\n"))
            elif isinstance(event, LiteralRejected):
                if self.state is State.AUTHENTICATE:
                    return actions + self._fatal("Invalid SASL response")
                actions += self._bad(event.tag, "Literal too large")
            elif self.state is State.AUTHENTICATE:
                actions += self._sasl_response(event)
            else:
                actions += self._command(event)
        return actions

    def _bad(self, tag: bytes, text: str) -> list[Action]:
        reply: list[Action] = [SendToClient(response(tag, b"BAD", text))]
        if self._count_bad_command():
            reply += self._fatal("Too many invalid commands")
        return reply

    def _command(self, command: CommandReceived) -> list[Action]:
        if is_http_request_line(command.segments[0]):
            # A browser sent here (ALPACA): close without echoing a byte of it, not even
            # the tag a BAD would repeat, and read nothing more.
            return [self._close("HTTP request")]
        args = ArgumentReader(command.segments)
        tag = command.tag
        if tag == b"*":
            return self._bad(b"*", "Invalid tag")
        try:
            args.tag()
            args.space()
            name = args.atom().upper()
        except ClientProtocolError:
            return self._bad(tag, "Missing command")
        handler = self._COMMANDS.get(name)
        if handler is None:
            if name in _NEEDS_LOGIN:
                return self._bad(tag, "Log in first")
            return self._bad(tag, "Unknown command")
        try:
            return handler(self, tag, args)
        except ClientProtocolError as e:
            if e.fatal:
                return self._fatal(e.public_text)
            return self._bad(tag, f"{name.decode()}: {e.public_text}")

    def _capability(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.expect_end()
        return [SendToClient(b"* CAPABILITY " + self.capabilities() + b"\r\n"
                             + response(tag, b"OK", "CAPABILITY completed"))]

    def _noop(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.expect_end()
        return [SendToClient(response(tag, b"OK", "NOOP completed"))]

    def _logout(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.expect_end()
        return [SendToClient(b"* BYE Logging out\r\n" + response(tag, b"OK", "LOGOUT completed")),
                self._close("logout")]

    def _id(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.space()
        client_id = args.id_parameters()
        args.expect_end()
        self.client_id = client_id
        return [SendToClient(SERVER_ID + response(tag, b"OK", "ID completed"))]

    def _starttls(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.expect_end()
        if not self.starttls_available:
            return self._bad(tag, "STARTTLS not available")
        # RFC 3501 section 6.2.1 and RFC 2595 section 3.1: whatever the client pipelined
        # after STARTTLS arrived in plaintext and must not be acted on after the handshake.
        self._wire.discard()
        self.tls_active = True
        self.starttls_available = False
        return [SendToClient(response(tag, b"OK", "Begin TLS negotiation now")), StartClientTLS()]

    def _refuse_plaintext(self, tag: bytes) -> list[Action]:
        return [SendToClient(response(tag, b"NO", "Plaintext login is disabled, use STARTTLS",
                                      "PRIVACYREQUIRED"))]

    def _login(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.space()
        user = args.astring()
        args.space()
        password = args.astring()
        args.expect_end()
        if not self.login_allowed:
            return self._refuse_plaintext(tag)
        credentials = Credentials(decode_username(user), Secret(password), "", "LOGIN")
        return self._begin_login(tag, credentials)

    def _authenticate(self, tag: bytes, args: ArgumentReader) -> list[Action]:
        args.space()
        mechanism = args.atom().upper()
        initial: bytes | None = None
        if not args.at_end():
            args.space()
            initial = args.atom()
        args.expect_end()
        name = mechanism.decode("ascii", "replace")
        if name not in self.mechanisms or name not in MECHANISMS:
            return [SendToClient(response(tag, b"NO", "Unsupported authentication mechanism"))]
        if not self.login_allowed:
            return self._refuse_plaintext(tag)
        self._pending_tag = tag
        self._sasl = ServerExchange(name)
        # RFC 4959 section 3: "=" stands for an empty initial response (sasl.py).
        return self._sasl_step(tag, initial, first=True)

    def _sasl_response(self, event: CommandReceived) -> list[Action]:
        tag = self._pending_tag
        self._enter(State.NOT_AUTHENTICATED)
        line = event.segments[0] if len(event.segments) == 1 else b""
        if self._refusal is not None:
            # The dummy response to the backend's error challenge (RFC 7628 section
            # 3.2.3), or "*": either way the login has failed.
            error, self._refusal = self._refusal, None
            return self._login_refused(tag, error)
        if line == b"*":
            # RFC 3501 section 6.2.2: a "*" line cancels, answered with BAD.
            self._sasl = None
            return self._bad(tag, "AUTHENTICATE cancelled")
        return self._sasl_step(tag, line, first=False)

    def _sasl_step(self, tag: bytes, line: bytes | None, *, first: bool) -> list[Action]:
        """One client message of the exchange: a challenge back, or the login begins."""
        assert self._sasl is not None
        try:
            step = self._sasl.start(line) if first else self._sasl.respond(line or b"")
        except ClientProtocolError as e:
            self._sasl = None
            return self._bad(tag, f"AUTHENTICATE: {e.public_text}")
        except ProxyError as e:
            self._sasl = None
            return self._login_refused(tag, e)
        if isinstance(step, Challenge):
            self._enter(State.AUTHENTICATE)
            # RFC 3501 section 7.5: "+" SP base64 (empty for an empty challenge).
            return [SendToClient(b"+ " + b64encode(step.data) + b"\r\n")]
        self._sasl = None
        return self._begin_login(tag, step.credentials)

    def _begin_login(self, tag: bytes, credentials: Credentials) -> list[Action]:
        self._pending_tag = tag
        self._login_mechanism = credentials.mechanism
        self._enter(State.LOGGING_IN)
        return [Login(credentials, self.client_id)]

    # The commands before login: one table for all sessions, not a dict of bound methods
    # in each (about 800 bytes per connection).
    _COMMANDS: ClassVar[dict[bytes, Handler]] = {
        b"CAPABILITY": _capability,
        b"NOOP": _noop,
        b"LOGOUT": _logout,
        b"STARTTLS": _starttls,
        b"LOGIN": _login,
        b"AUTHENTICATE": _authenticate,
        b"ID": _id,
    }

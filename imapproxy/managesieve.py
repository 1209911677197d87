# -*- test-case-name: tests.test_managesieve -*-
"""The ManageSieve dialogue before login (RFC 5804), spoken by the proxy itself: sans-IO.

Same shape as imap.py and pop3.py: bytes go in through ``receive_data``, the outcome
of the login comes back through ``login_succeeded``/``login_failed``, and every
method returns the actions (actions.py) for the adapter to carry out. The session
ends in ``Splice``. Framing (lines, quoted strings, literals) is in sievewire.py,
shared with the backend dialogue (sievebackend.py).

ManageSieve has no tags and no BAD: every command gets one OK, NO or BYE (section
1.3), and the greeting is the capability list (section 1.7). Before login the proxy
answers CAPABILITY, STARTTLS, AUTHENTICATE (the ``[auth] mechanisms``: PLAIN, LOGIN,
OAUTHBEARER, XOAUTH2, through sasl.py), NOOP and LOGOUT; script commands need a login
first.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from typing import ClassVar

from .actions import Action, Close, Login, SendToClient, Splice, StartClientTLS
from .config import Limits
from .credentials import Credentials
from .crossprotocol import is_http_request_line
from .errors import ClientProtocolError, ProxyError
from .prelogin import COMMAND_TRANSITIONS, CommandState, PreLoginSession
from .sasl import DEFAULT_MECHANISMS, MECHANISMS, Challenge, ServerExchange, failure_challenge
from .sievewire import (
    BYE_SHUTDOWN,
    Atom,
    LineTooLong,
    LiteralTooLarge,
    Malformed,
    MessageReader,
    String,
    Token,
    capability_line,
    response,
    string,
    tokens,
)

# RFC 5804 section 2: commands until AUTHENTICATE (its challenges and the SASL response,
# section 2.1) succeeds; every state change goes through ManageSieveSession._enter,
# checked against the table (prelogin.py, shared with IMAP).
State = CommandState
TRANSITIONS = COMMAND_TRANSITIONS

#: Commands of the authenticated state (RFC 5804 sections 2.4-2.11, 2.14), answered
#: with a hint instead of "unknown command".
_NEEDS_LOGIN = frozenset(
    b"HAVESPACE PUTSCRIPT LISTSCRIPTS SETACTIVE GETSCRIPT DELETESCRIPT RENAMESCRIPT "
    b"CHECKSCRIPT UNAUTHENTICATE".split())

#: What the backends' capabilities say that the pre-login list repeats (RFC 5804
#: section 1.7): what the client may write (SIEVE, with NOTIFY's methods and the
#: redirect limit), learnt from the backends since clients choose from it.
LEARNT_CAPABILITIES = (b"SIEVE", b"NOTIFY", b"MAXREDIRECTS")

#: Before any backend has been seen: the extensions RFC 5228 itself defines (section
#: 4.1 fileinto, 5.4 envelope, 2.4.2.4 encoded-character), which every Sieve
#: implementation has. Clients that need more ask CAPABILITY again after login, and
#: that goes to the backend.
BASE_SIEVE = capability_line(b"SIEVE", b"fileinto envelope encoded-character")

Handler = Callable[["ManageSieveSession", list[Token]], list[Action]]

DEFAULT_LIMITS = Limits()


class SieveCapabilities:
    """The backends' SIEVE (NOTIFY, MAXREDIRECTS) capability lines, for the pre-login list.

    One per proxy (runtime.Shared): learnt from every successful backend login (the
    dialogue reads the backend's capability list anyway, so no extra connection), the
    latest one winning. A probe at start-up would need a backend before any user
    names one (the directory routes users, not the proxy), and would go stale the
    same way.
    """

    __slots__ = ("lines",)

    def __init__(self) -> None:
        #: capability lines in wire form (sievewire.capability_line), CRLF-terminated
        self.lines = BASE_SIEVE

    def learn(self, lines: bytes | None) -> None:
        if lines:
            self.lines = lines


class ManageSieveSession(PreLoginSession):
    """One client's pre-login ManageSieve session."""

    __slots__ = ("_reader", "sieve", "mechanisms", "_sasl", "_refusal", "_login_mechanism")

    state: State
    TRANSITIONS = TRANSITIONS
    LOGGING_IN = State.LOGGING_IN
    RELAYING = State.RELAYING
    CLOSED = State.CLOSED
    SHUTDOWN_LINE = BYE_SHUTDOWN
    TIMEOUT_REASON = "pre-auth timeout"
    TOO_MANY_FAILED_LOGINS = response(b"BYE", "Too many failed logins")

    def __init__(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                 limits: Limits = DEFAULT_LIMITS,
                 sieve: SieveCapabilities | None = None,
                 mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS) -> None:
        super().__init__(State.NOT_AUTHENTICATED, tls_active=tls_active,
                         starttls_available=starttls_available, plaintext_auth=plaintext_auth,
                         limits=limits)
        self._reader = MessageReader(limits.max_line, limits.max_preauth_literal)
        self.sieve = sieve if sieve is not None else SieveCapabilities()
        #: the SASL mechanisms offered ([auth] mechanisms)
        self.mechanisms = mechanisms
        #: the AUTHENTICATE under way
        self._sasl: ServerExchange | None = None
        #: a refusal of a token, said once the client answered its error challenge
        self._refusal: ProxyError | None = None
        #: the mechanism of the login under way
        self._login_mechanism = ""

    # -- inputs --------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The greeting: the capability list, then OK (RFC 5804 section 1.7)."""
        return [SendToClient(self.capabilities() + response(b"OK", "ManageSieve proxy ready"))]

    def login_succeeded(self, capabilities: bytes | None) -> list[Action]:
        """The backend accepted the login: answer the client and hand over to the relay.

        ``capabilities`` are the backend's SIEVE lines (sievebackend.py): remembered for
        the next client's greeting. Returns no actions when the session ended meanwhile.
        """
        if self.state is not State.LOGGING_IN:
            return []
        self.sieve.learn(capabilities)
        self._enter(State.RELAYING)
        return [SendToClient(response(b"OK", "Logged in")), Splice(self._reader.take_buffer())]

    def login_failed(self, error: ProxyError) -> list[Action]:
        """The lookup or the backend said no; the client may try again (within limits)."""
        if self.state is not State.LOGGING_IN:
            return []
        challenge = failure_challenge(self._login_mechanism, error)
        if challenge is not None:
            # RFC 7628 section 3.2.2: a token's error challenge goes to the client (a
            # string, RFC 5804 section 2.1), which answers with a dummy response; then
            # the NO (in _process).
            self._refusal = error
            self._enter(State.AUTHENTICATE)
            return [SendToClient(string(challenge) + b"\r\n"), *self._process()]
        self._enter(State.NOT_AUTHENTICATED)
        actions = self._login_refused(error)
        if isinstance(actions[-1], Close):
            return actions
        return actions + self._process()

    def _login_refused(self, error: ProxyError) -> list[Action]:
        code = error.sieve_code.encode() if error.sieve_code else None
        if getattr(error, "bye", False):
            # The backend's BYE (REFERRAL "sieve://..."): RFC 5804 section 1.3, the
            # server closes after BYE; the client follows the referral.
            return [SendToClient(response(b"BYE", error.client_text(), code)),
                    self._close("backend said BYE")]
        return self._refuse_login(response(b"NO", error.client_text(), code))

    # -- capabilities -------------------------------------------------------------------

    def capabilities(self) -> bytes:
        """The capability response's lines (RFC 5804 section 1.7), without the OK."""
        # Section 1.7: SASL lists the mechanisms available now; none while plaintext
        # authentication is refused (like IMAP's LOGINDISABLED).
        lines = (capability_line(b"IMPLEMENTATION", b"imapproxy")
                 + capability_line(b"SASL", self._sasl_list())
                 + self.sieve.lines)
        if self.starttls_available:
            lines += capability_line(b"STARTTLS")
        return lines + capability_line(b"VERSION", b"1.0")

    def _sasl_list(self) -> bytes:
        if not self.login_allowed:
            return b""
        return b" ".join(name.encode("ascii") for name in self.mechanisms)

    # -- processing -----------------------------------------------------------------------

    def _goodbye(self, text: str) -> bytes:
        return response(b"BYE", text)

    @property
    def _input(self) -> MessageReader:
        return self._reader

    @property
    def _max_held(self) -> int:
        return self._reader.max_message

    def _process(self) -> list[Action]:
        actions: list[Action] = []
        while self.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATE):
            message = self._reader.next_message()
            if message is None:
                break
            if isinstance(message, LiteralTooLarge):
                # Its octets are on their way ({n+} needs no go-ahead): the stream
                # cannot be followed any more.
                return actions + self._fatal("Literal too large")
            if self.state is State.AUTHENTICATE and self._refusal is not None:
                # The dummy response to the error challenge (RFC 7628 section 3.2.3),
                # or "*", or anything else: either way the login has failed.
                self._enter(State.NOT_AUTHENTICATED)
                error, self._refusal = self._refusal, None
                actions += self._login_refused(error)
                if isinstance(actions[-1], Close):  # too many failures: read no more
                    return actions
                continue
            if isinstance(message, LineTooLong):
                if self.state is State.AUTHENTICATE:
                    self._enter(State.NOT_AUTHENTICATED)
                    self._sasl = None
                actions += self._bad("Line too long")
                continue
            if self.state is State.AUTHENTICATE:
                self._enter(State.NOT_AUTHENTICATED)
                try:
                    actions += self._sasl_response(tokens(message))
                except Malformed as e:
                    self._sasl = None
                    actions += self._bad(f"AUTHENTICATE: {e}")
                continue
            if is_http_request_line(message.segments[0]):
                # A browser sent here (ALPACA): close without a reply, read nothing more.
                return actions + [self._close("HTTP request")]
            try:
                actions += self._command(tokens(message))
            except Malformed as e:
                actions += self._bad(str(e))
        return actions

    def _bad(self, text: str) -> list[Action]:
        """RFC 5804 has no BAD: a NO for a command we could not act on; too many of
        them end the session."""
        if self._count_bad_command():
            return self._fatal(text + "; too many invalid commands")
        return [SendToClient(response(b"NO", text))]

    def _command(self, words: list[Token]) -> list[Action]:
        if not words or not isinstance(words[0], Atom):
            return self._bad("Missing command")
        name = words[0].value.upper()
        handler = self._COMMANDS.get(name)
        if handler is None:
            if name in _NEEDS_LOGIN:
                return self._bad("Authenticate first")
            return self._bad("Unknown command")
        return handler(self, words[1:])

    def _capability(self, args: list[Token]) -> list[Action]:
        if args:
            return self._bad("CAPABILITY takes no arguments")
        return [SendToClient(self.capabilities() + response(b"OK", "Capability completed"))]

    def _noop(self, args: list[Token]) -> list[Action]:
        if not args:
            return [SendToClient(response(b"OK", "NOOP completed"))]
        if len(args) > 1 or not isinstance(args[0], String):
            return self._bad("NOOP takes one optional string")
        # RFC 5804 section 2.12: the string comes back in a TAG response code (clients
        # use it to find their place in the stream, e.g. after STARTTLS).
        return [SendToClient(response(b"OK", "Done", b"TAG " + string(args[0].value)))]

    def _logout(self, args: list[Token]) -> list[Action]:
        if args:
            return self._bad("LOGOUT takes no arguments")
        # RFC 5804 section 2.3: OK, then the server closes.
        return [SendToClient(response(b"OK", "Logout completed")), self._close("logout")]

    def _starttls(self, args: list[Token]) -> list[Action]:
        if args:
            return self._bad("STARTTLS takes no arguments")
        if not self.starttls_available:
            return self._bad("STARTTLS not available")
        # RFC 5804 section 2.2 (as RFC 3207 reasons): whatever the client pipelined
        # after STARTTLS arrived in plaintext and must not be acted on after the
        # handshake.
        self._reader.discard()
        self.tls_active = True
        self.starttls_available = False
        # Section 2.2: after the handshake the server sends the capabilities again,
        # then OK. Written after startTLS, they go out encrypted, after the handshake.
        return [SendToClient(response(b"OK", "Begin TLS negotiation now")), StartClientTLS(),
                SendToClient(self.capabilities() + response(b"OK", "TLS negotiation done"))]

    def _authenticate(self, args: list[Token]) -> list[Action]:
        # RFC 5804 section 2.1: AUTHENTICATE SP auth-type [SP string]; auth-type is a
        # string ("PLAIN"), also accepted as an atom.
        if not args or len(args) > 2 or (len(args) == 2 and not isinstance(args[1], String)):
            return self._bad("AUTHENTICATE needs a mechanism and at most one response")
        name = args[0].value.upper().decode("ascii", "replace")
        if name not in self.mechanisms or name not in MECHANISMS:
            return [SendToClient(response(b"NO", "Unsupported authentication mechanism"))]
        if not self.login_allowed:
            # Section 1.3: ENCRYPT-NEEDED, "use STARTTLS first".
            return [SendToClient(response(b"NO", "Authentication requires TLS, use STARTTLS",
                                          b"ENCRYPT-NEEDED"))]
        self._sasl = ServerExchange(name)
        return self._sasl_step(args[1].value if len(args) == 2 else None, first=True)

    def _sasl_response(self, words: list[Token]) -> list[Action]:
        if len(words) != 1:
            self._sasl = None
            return self._bad("AUTHENTICATE: expected one string")
        if words[0].value == b"*":
            # RFC 5804 section 2.1: "*" cancels, and the server answers NO.
            self._sasl = None
            return self._bad("Authentication cancelled")
        if not isinstance(words[0], String):
            self._sasl = None
            return self._bad("AUTHENTICATE: expected one string")
        return self._sasl_step(words[0].value, first=False)

    def _sasl_step(self, encoded: bytes | None, *, first: bool) -> list[Action]:
        """One client message of the exchange (base64 in a string): a challenge back,
        or the login begins."""
        assert self._sasl is not None
        try:
            step = self._sasl.start(encoded) if first else self._sasl.respond(encoded or b"")
        except ClientProtocolError as e:
            self._sasl = None
            return self._bad(f"AUTHENTICATE: {e.public_text}")
        except ProxyError as e:
            self._sasl = None
            return self._login_refused(e)
        if isinstance(step, Challenge):
            self._enter(State.AUTHENTICATE)
            # RFC 5804 section 2.1: a challenge is a string holding base64 (PLAIN's
            # empty one is "").
            return [SendToClient(string(b64encode(step.data)) + b"\r\n")]
        self._sasl = None
        return self._begin_login(step.credentials)

    def _begin_login(self, credentials: Credentials) -> list[Action]:
        self._login_mechanism = credentials.mechanism
        self._enter(State.LOGGING_IN)
        return [Login(credentials)]

    # The commands before login: one table for all sessions.
    _COMMANDS: ClassVar[dict[bytes, Handler]] = {
        b"CAPABILITY": _capability,
        b"NOOP": _noop,
        b"LOGOUT": _logout,
        b"STARTTLS": _starttls,
        b"AUTHENTICATE": _authenticate,
    }

# -*- test-case-name: tests.test_sievebackend -*-
"""The proxy's login dialogue with a ManageSieve backend (RFC 5804): sans-IO.

greeting (capabilities, OK) -> [STARTTLS -> TLS -> capabilities, OK] -> [XCLIENT] ->
AUTHENTICATE "PLAIN" with an initial response -> logged in. A password (PLAIN or LOGIN
from the client) goes as PLAIN; a token (OAUTHBEARER, XOAUTH2: sasl.py) goes as the
client sent it, as the initial response of its own mechanism, and a challenge the
backend answers it with is the token's error (RFC 7628 section 3.2.2), relayed to the
client with the failure (errors.TokenRefused). XCLIENT tells the backend
the client's address when it offers the command (Pigeonhole's managesieve-login does,
to its login_trusted_networks), as pop3backend.py does for POP3.
Same interface as imapbackend.ImapBackendLogin. A backend's NO becomes an auth
failure, unless its response code (RFC 5804 section 1.3) tells the user something
true and useful: then the client gets that NO (or BYE) as the backend sent it.
The SIEVE capabilities the backend announced go back with the login, so the proxy's
own pre-login list can repeat them (managesieve.SieveCapabilities).
"""

from __future__ import annotations

from base64 import b64encode
from enum import Enum, auto

from .actions import (
    BackendAction,
    BackendLoggedIn,
    BackendLoginFailed,
    SendToBackend,
    StartBackendTLS,
)
from .credentials import Credentials
from .errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendRefused,
    BackendUnavailable,
    ProxyError,
    TokenRefused,
)
from .pop3backend import xclient_command
from .sasl import TOKEN_MECHANISMS, backend_message, dummy_response, relayable_challenge
from .sievewire import (
    Atom,
    LineTooLong,
    LiteralTooLarge,
    Malformed,
    MessageReader,
    String,
    Token,
    capability_line,
    render,
    string,
    tokens,
)

#: Backend lines before login are short; the SIEVE capability line is the longest
#: (Dovecot's is about 400 octets).
MAX_BACKEND_LINE = 65536
#: A backend may send a capability or a response text as a literal ({n}).
MAX_BACKEND_LITERAL = 65536
#: A capability list has about ten lines (RFC 5804 section 1.7).
MAX_CAPABILITY_LINES = 256

#: RFC 5804 section 1.3 codes passed on to the client with the backend's NO or BYE:
#: they say what to do next (a stronger mechanism, TLS, another server, later).
#: Anything else becomes our own "Authentication failed".
PASS_THROUGH_CODES = frozenset(
    {b"AUTH-TOO-WEAK", b"ENCRYPT-NEEDED", b"REFERRAL", b"TRANSITION-NEEDED", b"TRYLATER"})

#: Capabilities the pre-login list repeats from the backends (RFC 5804 section 1.7):
#: what the client may write in a script.
LEARNT_CAPABILITIES = (b"SIEVE", b"NOTIFY", b"MAXREDIRECTS")


class Step(Enum):
    #: reading the greeting's capability lines up to OK (RFC 5804 section 1.7)
    GREETING = auto()
    #: sent STARTTLS, waiting for its OK (RFC 5804 section 2.2)
    STARTTLS = auto()
    #: told the adapter to start TLS; nothing may arrive until tls_started()
    TLS_HANDSHAKE = auto()
    #: TLS is up; reading the capabilities sent again, up to OK (section 2.2)
    TLS_CAPABILITY = auto()
    #: sent XCLIENT with the client's address, waiting for its answer (any will do)
    XCLIENT = auto()
    #: sent AUTHENTICATE with the initial response (section 2.1); for a token, a
    #: challenge now is the backend's error challenge (RFC 7628 section 3.2.2)
    AUTHENTICATE = auto()
    DONE = auto()


# Rule: every step change goes through SieveBackendLogin._enter, checked against this table.
TRANSITIONS: dict[Step, frozenset[Step]] = {
    Step.GREETING: frozenset({Step.STARTTLS, Step.XCLIENT, Step.AUTHENTICATE, Step.DONE}),
    Step.STARTTLS: frozenset({Step.TLS_HANDSHAKE, Step.DONE}),
    Step.TLS_HANDSHAKE: frozenset({Step.TLS_CAPABILITY, Step.DONE}),
    Step.TLS_CAPABILITY: frozenset({Step.XCLIENT, Step.AUTHENTICATE, Step.DONE}),
    Step.XCLIENT: frozenset({Step.AUTHENTICATE, Step.DONE}),
    Step.AUTHENTICATE: frozenset({Step.DONE}),
    Step.DONE: frozenset(),
}


def parse_response(words: list[Token]) -> tuple[bytes, bytes | None, bytes] | None:
    """``OK/NO/BYE [(code ...)] [string]`` -> (status, code in wire form, text); None
    when the message is no response (a capability line, a challenge)."""
    if not words or not isinstance(words[0], Atom):
        return None
    status = words[0].value.upper()
    if status not in (b"OK", b"NO", b"BYE"):
        return None
    rest = words[1:]
    code: bytes | None = None
    if rest and rest[0] == Atom(b"("):
        try:
            close = rest.index(Atom(b")"))
        except ValueError:
            raise Malformed("unterminated response code") from None
        code = render(rest[1:close])
        rest = rest[close + 1:]
    text = rest[0].value if rest and isinstance(rest[0], String) else b""
    return status, code, text


def refusal(status: bytes, code: bytes | None, text: bytes) -> ProxyError:
    """The error for a backend's NO or BYE to our AUTHENTICATE."""
    name = code.split(b" ", 1)[0].upper() if code else b""
    if name in PASS_THROUGH_CODES:
        assert code is not None
        message = text.decode("utf-8", "replace").strip() or "Login refused"
        return BackendRefused("UNAVAILABLE", message, "SYS/TEMP",
                              sieve_code=code.decode("utf-8", "replace"), bye=status == b"BYE")
    return AuthenticationFailed()


class SieveBackendLogin:
    """Logs in at one ManageSieve backend on behalf of a client."""

    def __init__(self, credentials: Credentials, login: str, *, starttls: bool,
                 client_id: tuple[tuple[str, str | None], ...] = ()) -> None:
        # client_id: ManageSieve has no ID command (IMAP's RFC 2971); the client's
        # address in it (forwarding.py) goes out as XCLIENT if the backend offers it.
        self.step = Step.GREETING
        self._xclient = xclient_command(client_id)
        self._credentials = credentials
        self._login = login.encode("utf-8")
        self._starttls = starttls
        self._reader = MessageReader(MAX_BACKEND_LINE, MAX_BACKEND_LITERAL)
        #: the capability lines read so far (name, value) of the current list
        self._capabilities: list[tuple[bytes, bytes | None]] = []
        #: the backend's error challenge to a token (base64), relayed with the failure
        self._challenge: bytes | None = None

    def receive_data(self, data: bytes) -> list[BackendAction]:
        self._reader.feed(data)
        actions: list[BackendAction] = []
        while self.step is not Step.DONE:
            message = self._reader.next_message()
            if message is None:
                break
            if isinstance(message, LineTooLong | LiteralTooLarge):
                return actions + self._fail(BackendProtocolError("line or literal too long"))
            try:
                actions += self._message(tokens(message))
            except Malformed as e:
                return actions + self._fail(BackendProtocolError(str(e)))
        return actions

    def tls_started(self) -> list[BackendAction]:
        # RFC 5804 section 2.2: the server sends its capabilities again by itself.
        self._capabilities = []
        self._enter(Step.TLS_CAPABILITY)
        return []

    @property
    def credentials_sent(self) -> bool:
        """AUTHENTICATE is on its way: what the backend does now, a closed connection
        included, is its answer to the client's credentials."""
        return self.step is Step.AUTHENTICATE

    def learnt_capabilities(self) -> bytes | None:
        """The SIEVE (NOTIFY, MAXREDIRECTS) lines of the latest list, in wire form."""
        lines = b"".join(capability_line(name, value) for name, value in self._capabilities
                         if name in LEARNT_CAPABILITIES)
        return lines if b'"SIEVE"' in lines else None

    def _enter(self, new: Step) -> None:
        if new not in TRANSITIONS[self.step]:
            raise AssertionError(f"illegal transition {self.step} -> {new}")
        self.step = new

    def _fail(self, error: ProxyError) -> list[BackendAction]:
        self._enter(Step.DONE)
        return [BackendLoginFailed(error)]

    def _message(self, words: list[Token]) -> list[BackendAction]:
        step = self.step
        parsed = parse_response(words)
        if parsed is None:
            if step in (Step.GREETING, Step.TLS_CAPABILITY) and words \
                    and isinstance(words[0], String):
                return self._capability(words)
            if step is Step.AUTHENTICATE and self._challenge is None and len(words) == 1 \
                    and isinstance(words[0], String) \
                    and self._credentials.mechanism in TOKEN_MECHANISMS:
                return self._error_challenge(words[0].value)
            return self._fail(BackendProtocolError(f"unexpected message in step {step.name}"))
        status, code, text = parsed
        if step is Step.TLS_HANDSHAKE:
            return self._fail(BackendProtocolError("data during the TLS handshake"))
        if step in (Step.GREETING, Step.TLS_CAPABILITY):
            if status != b"OK":
                return self._fail(BackendUnavailable(f"greeted with {status.decode()}"))
            if step is Step.GREETING and self._starttls:
                self._enter(Step.STARTTLS)
                return [SendToBackend(b"STARTTLS\r\n")]
            if self._xclient and any(name == b"XCLIENT" for name, _ in self._capabilities):
                self._enter(Step.XCLIENT)
                return [SendToBackend(self._xclient)]
            return self._authenticate()
        if step is Step.XCLIENT:
            # OK "Updated", or NO to an untrusted proxy: the login goes on all the same.
            return self._authenticate()
        if step is Step.STARTTLS:
            if status != b"OK":
                return self._fail(BackendUnavailable("STARTTLS refused"))
            if self._reader.buffered:
                # Plaintext sent behind the OK would be read as if it came over TLS.
                return self._fail(BackendProtocolError("data after the STARTTLS reply"))
            self._enter(Step.TLS_HANDSHAKE)
            return [StartBackendTLS()]
        # Step.AUTHENTICATE: the login's answer.
        if status != b"OK":
            error = refusal(status, code, text)
            if self._challenge and type(error) is AuthenticationFailed:
                error = TokenRefused(self._challenge)
            return self._fail(error)
        self._enter(Step.DONE)
        return [BackendLoggedIn(self.learnt_capabilities(), self._reader.take_buffer())]

    def _capability(self, words: list[Token]) -> list[BackendAction]:
        if len(self._capabilities) >= MAX_CAPABILITY_LINES or len(words) > 2 \
                or not all(isinstance(w, String) for w in words):
            return self._fail(BackendProtocolError("bad capability list"))
        name = words[0].value.upper()
        self._capabilities.append((name, words[1].value if len(words) == 2 else None))
        return []

    def _error_challenge(self, challenge: bytes) -> list[BackendAction]:
        # RFC 7628 section 3.2.2: the token failed; the challenge says why, and the
        # backend waits for the dummy response (section 3.2.3) before its NO. RFC 5804
        # section 2.1: both are strings holding base64.
        self._challenge = relayable_challenge(challenge.strip()) or b""
        dummy = dummy_response(self._credentials.mechanism)
        return [SendToBackend(string(dummy, to_server=True) + b"\r\n")]

    def _authenticate(self) -> list[BackendAction]:
        if self._credentials.mechanism in TOKEN_MECHANISMS:
            return self._authenticate_token()
        password = self._credentials.password.reveal()
        if b"\0" in self._login + password:
            return self._fail(AuthenticationFailed())  # cannot be said in SASL PLAIN
        # RFC 4616 section 2: authzid NUL authcid NUL passwd; we act as the user ourselves.
        # RFC 5804 section 2.1: the initial response is a string (a literal if long).
        token = b64encode(b"\0" + self._login + b"\0" + password)
        self._enter(Step.AUTHENTICATE)
        return [SendToBackend(b'AUTHENTICATE "PLAIN" ' + string(token, to_server=True)
                              + b"\r\n")]

    def _authenticate_token(self) -> list[BackendAction]:
        # The client's own message (naming the backend's login for the user), as the
        # initial response of its mechanism (RFC 5804 section 2.1; Dovecot's
        # managesieve-login takes it, long ones as a literal).
        mechanism = self._credentials.mechanism.encode("ascii")
        encoded = b64encode(backend_message(self._credentials, self._login.decode("utf-8")))
        self._enter(Step.AUTHENTICATE)
        return [SendToBackend(b'AUTHENTICATE "' + mechanism + b'" '
                              + string(encoded, to_server=True) + b"\r\n")]

"""The proxy's login dialogue with a POP3 backend: sans-IO.

greeting -> [STLS -> TLS] -> CAPA -> [XCLIENT] -> AUTH PLAIN (if offered) or USER/PASS
-> logged in. A token (OAUTHBEARER, XOAUTH2: sasl.py) goes as the client sent it, in
AUTH <mechanism>, and a failed one is answered as RFC 7628 section 3.2.2 says.
XCLIENT tells the backend the client's address when it offers the command
(Dovecot does to its login_trusted_networks: "[XCLIENT]" in the greeting).
Same interface as imapbackend.ImapBackendLogin. A backend "-ERR" becomes an auth failure,
unless its response code (RFC 2449 section 8, RFC 3206) says something else worth telling.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
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
from .pop3wire import RFC_COMMAND_LINE, LineReader, LineTooLong
from .respcodes import split_code
from .sasl import TOKEN_MECHANISMS, backend_message, dummy_response, relayable_challenge

#: Backend lines before login are short; 8 KiB leaves room for a long greeting or CAPA line.
MAX_BACKEND_LINE = 8192
#: A CAPA list has about a dozen entries (RFC 2449 section 6); more means something is wrong.
MAX_CAPA_LINES = 256

#: Response codes passed on to the client, as (IMAP code, POP3 code): what the user is
#: told is true and useful. [AUTH] or anything else becomes our own [AUTH] failure.
#: Like IMAP's NO [UNAVAILABLE] (imapbackend.py), a [SYS/TEMP] refusal of one login does not
#: count as the server being down (no failover, no circuit breaker).
PASS_THROUGH_CODES: dict[str, tuple[str, str]] = {
    "IN-USE": ("IN-USE", "IN-USE"),  # RFC 2449 section 8.1.1: maildrop locked
    "LOGIN-DELAY": ("UNAVAILABLE", "LOGIN-DELAY"),  # RFC 2449 section 8.1.2
    "SYS/TEMP": ("UNAVAILABLE", "SYS/TEMP"),  # RFC 3206 section 4
    "SYS/PERM": ("UNAVAILABLE", "SYS/PERM"),  # RFC 3206 section 4
}


class Step(Enum):
    GREETING = auto()
    #: sent STLS, waiting for +OK (RFC 2595 section 4)
    STLS = auto()
    #: told the adapter to start TLS; nothing may arrive until tls_started()
    TLS_HANDSHAKE = auto()
    #: sent CAPA, waiting for +OK or -ERR (RFC 2449 section 5)
    CAPA = auto()
    #: reading the capability lines up to "."
    CAPA_LIST = auto()
    #: sent AUTH PLAIN without initial response, waiting for "+ " (RFC 5034 section 4)
    AUTH_CONTINUATION = auto()
    AUTH = auto()
    #: sent XCLIENT with the client's address, waiting for its answer (any answer will do)
    XCLIENT = auto()
    USER = auto()
    PASS = auto()
    DONE = auto()


# Rule: every step change goes through Pop3BackendLogin._enter, checked against this table.
TRANSITIONS: dict[Step, frozenset[Step]] = {
    Step.GREETING: frozenset({Step.STLS, Step.CAPA, Step.DONE}),
    Step.STLS: frozenset({Step.TLS_HANDSHAKE, Step.DONE}),
    Step.TLS_HANDSHAKE: frozenset({Step.CAPA, Step.DONE}),
    # AUTH from CAPA: a token, when the backend has no CAPA (it is no password for PASS)
    Step.CAPA: frozenset({Step.CAPA_LIST, Step.USER, Step.XCLIENT, Step.AUTH,
                          Step.AUTH_CONTINUATION, Step.DONE}),
    Step.CAPA_LIST: frozenset({Step.AUTH, Step.AUTH_CONTINUATION, Step.USER, Step.XCLIENT,
                               Step.DONE}),
    Step.XCLIENT: frozenset({Step.AUTH, Step.AUTH_CONTINUATION, Step.USER, Step.DONE}),
    Step.AUTH_CONTINUATION: frozenset({Step.AUTH, Step.DONE}),
    Step.AUTH: frozenset({Step.DONE}),
    Step.USER: frozenset({Step.PASS, Step.DONE}),
    Step.PASS: frozenset({Step.DONE}),
    Step.DONE: frozenset(),
}


#: forwarding.origin_params ID keys -> Dovecot's XCLIENT attributes (pop3-login)
XCLIENT_ATTRIBUTES = {"x-originating-ip": b"ADDR", "x-originating-port": b"PORT",
                      "x-session-id": b"SESSION", "x-proxy-ttl": b"TTL"}


def xclient_command(client_id: tuple[tuple[str, str | None], ...]) -> bytes:
    """``XCLIENT ADDR=.. PORT=.. SESSION=..`` from the client's facts; b"" if none."""
    attributes = []
    for key, value in client_id:
        name = XCLIENT_ATTRIBUTES.get(key.lower())
        if name is not None and value and value.isascii() and value.isprintable() \
                and " " not in value:
            attributes.append(name + b"=" + value.encode("ascii"))
    return b"XCLIENT " + b" ".join(attributes) + b"\r\n" if attributes else b""


def parse_status(line: bytes) -> tuple[bool | None, str | None, bytes]:
    """Split "+OK text" / "-ERR [CODE] text" into (ok, code, text); ok None if neither."""
    status, _, text = line.partition(b" ")
    status = status.upper()
    if status == b"+OK":
        return True, None, text
    if status != b"-ERR":
        return None, None, text
    code, text = split_code(text)
    return False, None if code is None else code.decode("ascii", "replace").upper(), text


def refusal(code: str | None, text: bytes) -> ProxyError:
    """The error for a backend's -ERR to our login."""
    if code is not None:
        # RFC 2449 section 8: codes are hierarchical ("SYS/TEMP/..."); match by prefix.
        for known, (imap_code, pop3_code) in PASS_THROUGH_CODES.items():
            if code == known or code.startswith(known + "/"):
                message = text.decode("utf-8", "replace").strip() or "Login refused"
                error = BackendRefused(imap_code, message, pop3_code)
                return error
    return AuthenticationFailed()


class Pop3BackendLogin:
    """Logs in at one POP3 backend on behalf of a client."""

    def __init__(self, credentials: Credentials, login: str, *, starttls: bool,
                 client_id: tuple[tuple[str, str | None], ...] = ()) -> None:
        # client_id: POP3 has no ID (RFC 2971); the client's address in it (see
        # forwarding.py) goes out as XCLIENT if the backend offers it.
        self.step = Step.GREETING
        self._xclient = xclient_command(client_id)
        self._xclient_offered = False
        self._after_xclient: Callable[[], list[BackendAction]] | None = None
        self._credentials = credentials
        self._login = login.encode("utf-8")
        self._starttls = starttls
        self._lines = LineReader(MAX_BACKEND_LINE)
        self._capabilities: list[bytes] = []
        self._pending_response: bytes | None = None
        #: the backend's error challenge to a token, relayed to the client with the -ERR
        self._challenge: bytes | None = None

    def receive_data(self, data: bytes) -> list[BackendAction]:
        self._lines.feed(data)
        actions: list[BackendAction] = []
        while self.step is not Step.DONE:
            line = self._lines.next_line()
            if line is None:
                break
            if isinstance(line, LineTooLong):
                return actions + self._fail(BackendProtocolError("line too long"))
            actions += self._line(line)
        return actions

    def tls_started(self) -> list[BackendAction]:
        # RFC 2595 section 4: capabilities seen before TLS no longer count; ask now.
        self._enter(Step.CAPA)
        return [SendToBackend(b"CAPA\r\n")]

    @property
    def credentials_sent(self) -> bool:
        """USER/PASS or AUTH is on its way: what the backend does now, a closed
        connection included, is its answer to the client's credentials."""
        return self.step in (Step.USER, Step.PASS, Step.AUTH, Step.AUTH_CONTINUATION)

    def _enter(self, new: Step) -> None:
        if new not in TRANSITIONS[self.step]:
            raise AssertionError(f"illegal transition {self.step} -> {new}")
        self.step = new

    def _fail(self, error: ProxyError) -> list[BackendAction]:
        self._enter(Step.DONE)
        return [BackendLoginFailed(error)]

    def _line(self, line: bytes) -> list[BackendAction]:
        step = self.step
        if step is Step.CAPA_LIST:
            return self._capability_line(line)
        if step is Step.AUTH_CONTINUATION and line[:1] == b"+" and line[:3] != b"+OK":
            assert self._pending_response is not None
            response, self._pending_response = self._pending_response, None
            self._enter(Step.AUTH)
            return [SendToBackend(response + b"\r\n")]
        if step is Step.AUTH and line[:1] == b"+" and line[:3] != b"+OK" \
                and self._credentials.mechanism in TOKEN_MECHANISMS and self._challenge is None:
            # RFC 7628 section 3.2.2: the token failed; the challenge says why, and the
            # exchange ends with the client's dummy response and then the -ERR.
            self._challenge = relayable_challenge(line[1:].strip()) or b""
            return [SendToBackend(dummy_response(self._credentials.mechanism) + b"\r\n")]
        ok, code, text = parse_status(line)
        if ok is None or step is Step.TLS_HANDSHAKE:
            return self._fail(BackendProtocolError(f"unexpected line in step {step.name}"))
        if step is Step.GREETING:
            if not ok:
                # e.g. "-ERR [SYS/TEMP] too busy"
                return self._fail(BackendUnavailable("greeted with -ERR"))
            self._xclient_offered = b"[XCLIENT]" in text.upper()
            if self._starttls:
                self._enter(Step.STLS)
                return [SendToBackend(b"STLS\r\n")]
            self._enter(Step.CAPA)
            return [SendToBackend(b"CAPA\r\n")]
        if step is Step.STLS:
            if not ok:
                return self._fail(BackendUnavailable("STLS refused"))
            if self._lines.buffered:
                # Plaintext sent behind the +OK would be read as if it came over TLS.
                return self._fail(BackendProtocolError("data after the STLS reply"))
            self._enter(Step.TLS_HANDSHAKE)
            return [StartBackendTLS()]
        if step is Step.CAPA:
            if not ok:
                # no CAPA (plain RFC 1939): USER/PASS it is, but a token goes in AUTH
                # all the same (it is no password to send in PASS)
                token = self._credentials.mechanism in TOKEN_MECHANISMS
                return self._maybe_xclient(self._send_login if token else self._send_user)
            self._enter(Step.CAPA_LIST)
            return []
        if step is Step.XCLIENT:
            # "-ERR You're not trusted" or the like: the login goes on all the same.
            assert self._after_xclient is not None
            after, self._after_xclient = self._after_xclient, None
            return after()
        if step is Step.USER:
            if not ok:
                return self._fail(refusal(code, text))
            self._enter(Step.PASS)
            return [SendToBackend(b"PASS " + self._credentials.password.reveal() + b"\r\n")]
        # AUTH, AUTH_CONTINUATION (an -ERR instead of "+ ") or PASS: the login's answer.
        if not ok:
            error = refusal(code, text)
            if self._challenge and type(error) is AuthenticationFailed:
                error = TokenRefused(self._challenge)
            return self._fail(error)
        if step is Step.AUTH_CONTINUATION:
            return self._fail(BackendProtocolError("+OK instead of a SASL challenge"))
        self._enter(Step.DONE)
        return [BackendLoggedIn(None, self._lines.take_buffer())]

    def _capability_line(self, line: bytes) -> list[BackendAction]:
        if line == b".":
            return self._maybe_xclient(self._send_login)
        if len(self._capabilities) >= MAX_CAPA_LINES:
            return self._fail(BackendProtocolError("CAPA list too long"))
        # RFC 1939 section 3: lines of a multi-line reply starting with "." are dot-stuffed.
        self._capabilities.append(line[1:] if line.startswith(b".") else line)
        return []

    def _maybe_xclient(self, then: Callable[[], list[BackendAction]]) -> list[BackendAction]:
        offered = self._xclient_offered or any(
            c.split(b" ", 1)[0].upper() == b"XCLIENT" for c in self._capabilities)
        if not (offered and self._xclient):
            return then()
        self._after_xclient = then
        self._enter(Step.XCLIENT)
        return [SendToBackend(self._xclient)]

    def _sasl_mechanisms(self) -> list[bytes]:
        for capability in self._capabilities:
            name, _, arguments = capability.partition(b" ")
            if name.upper() == b"SASL":
                return arguments.upper().split()
        return []

    def _send_login(self) -> list[BackendAction]:
        if self._credentials.mechanism in TOKEN_MECHANISMS:
            message = backend_message(self._credentials, self._login.decode("utf-8"))
            return self._send_auth(self._credentials.mechanism.encode("ascii"),
                                   b64encode(message))
        password = self._credentials.password.reveal()
        if b"PLAIN" not in self._sasl_mechanisms() or b"\0" in self._login + password:
            return self._send_user()
        # RFC 4616 section 2: authzid NUL authcid NUL passwd; we act as the user ourselves.
        return self._send_auth(b"PLAIN", b64encode(b"\0" + self._login + b"\0" + password))

    def _send_auth(self, mechanism: bytes, response: bytes) -> list[BackendAction]:
        command = b"AUTH " + mechanism + b" " + response + b"\r\n"
        if len(command) <= RFC_COMMAND_LINE:
            self._enter(Step.AUTH)
            return [SendToBackend(command)]
        # RFC 5034 section 4: no initial response if it would make the command too long.
        self._pending_response = response
        self._enter(Step.AUTH_CONTINUATION)
        return [SendToBackend(b"AUTH " + mechanism + b"\r\n")]

    def _send_user(self) -> list[BackendAction]:
        password = self._credentials.password.reveal()
        if any(ch in self._login + password for ch in (b"\r", b"\n", b"\0")):
            return self._fail(AuthenticationFailed())  # cannot be sent on a POP3 line
        self._enter(Step.USER)
        return [SendToBackend(b"USER " + self._login + b"\r\n")]

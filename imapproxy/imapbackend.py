"""The proxy's login dialogue with an IMAP backend: sans-IO.

greeting -> [STARTTLS -> TLS -> CAPABILITY] -> [ID] -> LOGIN -> [CAPABILITY] -> logged in.
ID and LOGIN are pipelined (after STARTTLS, ID goes with the CAPABILITY request and
LOGIN waits for its answer); credentials go as quoted strings when they can, as
literals otherwise (non-synchronising when the backend offers LITERAL+, RFC 7888).
A token (OAUTHBEARER, XOAUTH2: sasl.py) goes as the client sent it, in AUTHENTICATE in
place of LOGIN: with SASL-IR when the backend offers it (RFC 4959), else after its "+".
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
    TokenRefused,
)
from .imapwire import quoted
from .respcodes import split_code
from .sasl import TOKEN_MECHANISMS, backend_message, dummy_response, relayable_challenge

#: Backend lines before login are short; a capability list is the longest.
MAX_BACKEND_LINE = 65536

#: RFC 5530 codes that tell the user something true and useful; passed on as they are.
#: Everything else becomes our own AUTHENTICATIONFAILED.
PASS_THROUGH_CODES = frozenset(
    {"UNAVAILABLE", "IN-USE", "EXPIRED", "CONTACTADMIN", "LIMIT", "PRIVACYREQUIRED",
     "SERVERBUG"}
)

class Step(Enum):
    #: waiting for the greeting (RFC 3501 section 7.1.1)
    GREETING = auto()
    #: sent STARTTLS, waiting for its OK; TLS starts in this step (RFC 3501 section 6.2.1)
    STARTTLS = auto()
    #: TLS is up; waiting for the capabilities it may have changed
    TLS_CAPABILITY = auto()
    #: waiting for "+" before sending the password literal (RFC 3501 section 7.5)
    LOGIN_CONTINUATION = auto()
    #: sent LOGIN, waiting for its tagged answer
    LOGIN = auto()
    #: sent AUTHENTICATE without an initial response, waiting for "+" (RFC 3501 6.2.2)
    AUTHENTICATE_CONTINUATION = auto()
    #: sent the token message; a "+" now is the backend's error challenge (RFC 7628
    #: section 3.2.2), answered with the dummy response, before the tagged NO
    AUTHENTICATE = auto()
    #: logged in; asked for the capabilities the OK did not carry (RFC 3501 section 6.2.3)
    CAPABILITY = auto()
    DONE = auto()


# Rule: every step change goes through ImapBackendLogin._enter, checked against this table.
TRANSITIONS: dict[Step, frozenset[Step]] = {
    Step.GREETING: frozenset({Step.STARTTLS, Step.LOGIN, Step.LOGIN_CONTINUATION,
                              Step.AUTHENTICATE, Step.AUTHENTICATE_CONTINUATION, Step.DONE}),
    Step.STARTTLS: frozenset({Step.TLS_CAPABILITY, Step.DONE}),
    Step.TLS_CAPABILITY: frozenset({Step.LOGIN, Step.LOGIN_CONTINUATION, Step.AUTHENTICATE,
                                    Step.AUTHENTICATE_CONTINUATION, Step.DONE}),
    Step.AUTHENTICATE_CONTINUATION: frozenset({Step.AUTHENTICATE, Step.CAPABILITY, Step.DONE}),
    Step.AUTHENTICATE: frozenset({Step.CAPABILITY, Step.DONE}),
    # A tagged answer may come instead of the "+": a refusal, or an OK (odd but harmless).
    Step.LOGIN_CONTINUATION: frozenset({Step.LOGIN, Step.CAPABILITY, Step.DONE}),
    Step.LOGIN: frozenset({Step.CAPABILITY, Step.DONE}),
    Step.CAPABILITY: frozenset({Step.DONE}),
    Step.DONE: frozenset(),
}


def capability_list(code: bytes | None) -> bytes | None:
    if code is None or not code.upper().startswith(b"CAPABILITY "):
        return None
    return code[len(b"CAPABILITY "):]


class ImapBackendLogin:
    """Logs in at one IMAP backend on behalf of a client."""

    def __init__(self, credentials: Credentials, login: str, *, starttls: bool,
                 client_id: tuple[tuple[str, str | None], ...] = ()) -> None:
        self.step = Step.GREETING
        self._credentials = credentials
        self._login = login.encode("utf-8")
        self._starttls = starttls
        self._client_id = client_id
        self._buffer = bytearray()
        self._capabilities: bytes | None = None
        self._literal_plus = False
        self._literal_minus = False
        self._pending_password: bytes | None = None
        self._sasl_ir = False
        #: the backend's error challenge to a token, relayed to the client with the NO
        self._challenge: bytes | None = None

    def receive_data(self, data: bytes) -> list[BackendAction]:
        self._buffer += data
        actions: list[BackendAction] = []
        while self.step is not Step.DONE:
            end = self._buffer.find(b"\n")
            if end < 0 or end > MAX_BACKEND_LINE:
                if len(self._buffer) > MAX_BACKEND_LINE:
                    return actions + self._fail(BackendProtocolError("line too long"))
                break
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            actions += self._line(line)
        return actions

    def tls_started(self) -> list[BackendAction]:
        # RFC 3501 section 6.2.1 (RFC 9051 section 6.2.1 too): capabilities seen before
        # TLS no longer count, and the client should ask for them again. The LOGIN waits
        # for them (LITERAL+ decides how a name or password is sent); ID need not.
        self._literal_plus = self._literal_minus = False
        self._capabilities = None
        self._enter(Step.TLS_CAPABILITY)
        return [SendToBackend(b"P5 CAPABILITY\r\n" + self._id_command())]

    @property
    def credentials_sent(self) -> bool:
        """The LOGIN (with the client's name and password) is on its way: what the
        backend does now, a closed connection included, is its answer to them."""
        return self.step in (Step.LOGIN, Step.LOGIN_CONTINUATION, Step.AUTHENTICATE,
                             Step.AUTHENTICATE_CONTINUATION)

    def _enter(self, new: Step) -> None:
        if new not in TRANSITIONS[self.step]:
            raise AssertionError(f"illegal transition {self.step} -> {new}")
        self.step = new

    def _fail(self, error: Exception) -> list[BackendAction]:
        self._enter(Step.DONE)
        assert isinstance(error, (BackendProtocolError, BackendUnavailable, AuthenticationFailed,
                                  BackendRefused))
        return [BackendLoginFailed(error)]

    def _line(self, line: bytes) -> list[BackendAction]:
        tag, _, rest = line.partition(b" ")
        status, _, text = rest.partition(b" ")
        status = status.upper()
        if self.step is Step.GREETING:
            if tag != b"*" or status not in (b"OK", b"PREAUTH", b"BYE"):
                return self._fail(BackendProtocolError("not an IMAP greeting"))
            if status != b"OK":
                # PREAUTH would log us in as someone unknown; BYE means go away.
                return self._fail(BackendUnavailable(f"greeted with {status.decode()}"))
            code, _ = split_code(text)
            self._note_capabilities(capability_list(code))
            if self._starttls:
                self._enter(Step.STARTTLS)
                return [SendToBackend(b"P1 STARTTLS\r\n")]
            return self._send_login()
        if self.step is Step.LOGIN_CONTINUATION and tag == b"+":
            assert self._pending_password is not None
            password, self._pending_password = self._pending_password, None
            self._enter(Step.LOGIN)
            return [SendToBackend(password + b"\r\n")]
        if self.step is Step.AUTHENTICATE_CONTINUATION and tag == b"+":
            assert self._pending_password is not None
            message, self._pending_password = self._pending_password, None
            self._enter(Step.AUTHENTICATE)
            return [SendToBackend(message + b"\r\n")]
        if self.step is Step.AUTHENTICATE and tag == b"+" and self._challenge is None:
            # RFC 7628 section 3.2.2: the token failed; the challenge says why, and the
            # exchange ends with the client's dummy response and then the NO.
            self._challenge = relayable_challenge(rest.strip()) or b""
            return [SendToBackend(dummy_response(self._credentials.mechanism) + b"\r\n")]
        if tag == b"*":
            if status == b"CAPABILITY":
                self._note_capabilities(text)
            elif status == b"BYE":
                return self._fail(BackendUnavailable("said BYE during the login"))
            return []  # other untagged data (ID replies, ...) is of no interest here
        if self.step is Step.STARTTLS and tag == b"P1":
            if status != b"OK":
                return self._fail(BackendUnavailable("STARTTLS refused"))
            if self._buffer:
                # RFC 3501 section 6.2.1: bytes after the OK arrived in plaintext and would
                # be read as if they came over TLS: a man in the middle's injection.
                return self._fail(BackendProtocolError("data after the STARTTLS reply"))
            return [StartBackendTLS()]
        if self.step is Step.TLS_CAPABILITY and tag == b"P5":
            if status != b"OK":
                return self._fail(BackendProtocolError("CAPABILITY refused after STARTTLS"))
            return self._send_login(with_id=False)
        if tag == b"P2":  # our ID: whatever the answer, login goes on
            return []
        if self.credentials_sent and tag == b"P3":
            return self._login_reply(status, text)
        if self.step is Step.CAPABILITY and tag == b"P4":
            return self._logged_in()
        return self._fail(BackendProtocolError(f"unexpected reply in step {self.step.name}"))

    def _note_capabilities(self, caps: bytes | None) -> None:
        if caps is None:
            return
        self._capabilities = caps
        names = caps.upper().split()
        self._sasl_ir = b"SASL-IR" in names
        self._literal_plus = b"LITERAL+" in names
        # RFC 9051 includes only LITERAL- (RFC 7888 section 4): {n+} up to 4096 octets.
        self._literal_minus = not self._literal_plus and (b"LITERAL-" in names
                                                          or b"IMAP4REV2" in names)

    def _id_command(self) -> bytes:
        return b"P2 ID " + id_list(self._client_id) + b"\r\n" if self._client_id else b""

    def _send_login(self, with_id: bool = True) -> list[BackendAction]:
        out = bytearray(self._id_command() if with_id else b"")
        if self._credentials.mechanism in TOKEN_MECHANISMS:
            return self._send_authenticate(out)
        user = self._astring(self._login)
        if user is None:
            # A synchronising literal for the name would cost another round trip; names
            # with control or 8-bit characters are rare, so they need LITERAL+.
            return self._fail(BackendProtocolError(
                "the name needs a literal and the backend offers no LITERAL+"))
        password = self._credentials.password.reveal()
        encoded_password = quoted(password)
        if encoded_password is not None:
            out += b"P3 LOGIN " + user + b" " + encoded_password + b"\r\n"
            self._enter(Step.LOGIN)
        elif self._non_sync_ok(len(password)):
            out += (b"P3 LOGIN " + user + b" {%d+}\r\n" % len(password)) + password + b"\r\n"
            self._enter(Step.LOGIN)
        else:
            out += b"P3 LOGIN " + user + b" {%d}\r\n" % len(password)
            self._pending_password = password
            self._enter(Step.LOGIN_CONTINUATION)
        return [SendToBackend(bytes(out))]

    def _send_authenticate(self, out: bytearray) -> list[BackendAction]:
        mechanism = self._credentials.mechanism.encode("ascii")
        encoded = b64encode(backend_message(self._credentials, self._login.decode("utf-8")))
        if self._sasl_ir:
            out += b"P3 AUTHENTICATE " + mechanism + b" " + encoded + b"\r\n"
            self._enter(Step.AUTHENTICATE)
        else:
            out += b"P3 AUTHENTICATE " + mechanism + b"\r\n"
            self._pending_password = encoded
            self._enter(Step.AUTHENTICATE_CONTINUATION)
        return [SendToBackend(bytes(out))]

    def _astring(self, value: bytes) -> bytes | None:
        encoded = quoted(value)
        if encoded is not None:
            return encoded
        if self._non_sync_ok(len(value)):
            return b"{%d+}\r\n" % len(value) + value
        return None

    def _non_sync_ok(self, size: int) -> bool:
        return self._literal_plus or (self._literal_minus and size <= 4096)

    def _login_reply(self, status: bytes, text: bytes) -> list[BackendAction]:
        code, message = split_code(text)
        if status == b"OK":
            caps = capability_list(code)
            if caps is not None:
                self._capabilities = caps
                return self._logged_in()
            # RFC 3501 section 6.2.3: capabilities may change at login; ask again.
            self._enter(Step.CAPABILITY)
            self._capabilities = None
            return [SendToBackend(b"P4 CAPABILITY\r\n")]
        if status == b"NO" and code is not None:
            name = code.split(b" ", 1)[0].upper().decode("ascii", "replace")
            if name in PASS_THROUGH_CODES:
                # The backend's words reach the client: no control characters (CR!).
                clean = "".join(c for c in message.decode("utf-8", "replace") if c >= " ")
                text_out = clean.strip() or "Login refused"
                return self._fail(BackendRefused(name, text_out))
        if self._challenge:
            return self._fail(TokenRefused(self._challenge))
        return self._fail(AuthenticationFailed())

    def _logged_in(self) -> list[BackendAction]:
        self._enter(Step.DONE)
        trailing = bytes(self._buffer)
        self._buffer.clear()
        return [BackendLoggedIn(self._capabilities, trailing)]


def id_list(pairs: tuple[tuple[str, str | None], ...]) -> bytes:
    """Render RFC 2971 ID parameters; values that need literals are dropped."""
    items = []
    for key, value in pairs:
        k = quoted(key.encode("utf-8"))
        v = b"NIL" if value is None else quoted(value.encode("utf-8"))
        if k is not None and v is not None:
            items.append(k + b" " + v)
    return b"(" + b" ".join(items) + b")" if items else b"NIL"

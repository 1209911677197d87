"""What the pre-login sessions (IMAP, POP3, ManageSieve) have in common: sans-IO.

imap.py, pop3.py and managesieve.py each speak their own protocol; this base holds what
a pre-login session does the same way in all: state changes checked against the
protocol's table, closing, counting bad commands and failed logins, holding client bytes
back while a login runs, and the two ends the proxy decides (shutdown, pre-auth
timeout). Each protocol gives its states (IMAP and ManageSieve share CommandState and
its table, below; POP3 has its own) and its words (``* BYE ...``, ``-ERR ...``,
``BYE ...``) through the class attributes and hooks marked below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import Enum, auto
from typing import Any, ClassVar, Protocol

from .actions import Action, Close, SendToClient
from .config import Limits


class HeldInput(Protocol):
    """The framing a session reads through (imapwire.CommandAssembler, pop3wire.LineReader)."""

    @property
    def buffered(self) -> int: ...

    def feed(self, data: bytes) -> None: ...


class CommandState(Enum):
    """The states of a session that logs in by a command or a SASL exchange: IMAP
    (RFC 3501 section 3) and ManageSieve (RFC 5804 section 2). POP3 has its own
    (pop3.py: USER then PASS)."""

    #: reading commands before login
    NOT_AUTHENTICATED = auto()
    #: AUTHENTICATE sent a challenge; the next line or message is the SASL response
    #: (RFC 3501 section 6.2.2, RFC 5804 section 2.1), or the dummy response to a
    #: backend's error challenge (RFC 7628 section 3.2.3)
    AUTHENTICATE = auto()
    #: waiting for lookup and backend login; client bytes are held back, unparsed
    LOGGING_IN = auto()
    #: handed over to the relay
    RELAYING = auto()
    CLOSED = auto()


#: Every state change of such a session goes through PreLoginSession._enter, checked
#: against this table.
COMMAND_TRANSITIONS: dict[Enum, frozenset[Enum]] = {
    CommandState.NOT_AUTHENTICATED: frozenset({CommandState.AUTHENTICATE,
                                               CommandState.LOGGING_IN, CommandState.CLOSED}),
    CommandState.AUTHENTICATE: frozenset({CommandState.NOT_AUTHENTICATED,
                                          CommandState.LOGGING_IN, CommandState.CLOSED}),
    CommandState.LOGGING_IN: frozenset({CommandState.NOT_AUTHENTICATED,
                                        CommandState.AUTHENTICATE, CommandState.RELAYING,
                                        CommandState.CLOSED}),
    CommandState.RELAYING: frozenset({CommandState.CLOSED}),
    CommandState.CLOSED: frozenset(),
}


class PreLoginSession(ABC):
    """One client's session before login; subclassed once per protocol."""

    __slots__ = ("state", "tls_active", "starttls_available", "plaintext_auth", "limits",
                 "bad_commands", "failed_logins")

    # -- what each protocol gives ---------------------------------------------------------

    #: Rule: every state change goes through _enter, checked against this table.
    TRANSITIONS: ClassVar[Mapping[Any, frozenset[Any]]]  # keyed by each protocol's State
    #: waiting for lookup and backend login; client bytes are held back, unparsed
    LOGGING_IN: ClassVar[Enum]
    #: handed over to the relay: the session has nothing more to say
    RELAYING: ClassVar[Enum]
    CLOSED: ClassVar[Enum]
    #: the line that sends clients away when the proxy shuts down (or drains)
    SHUTDOWN_LINE: ClassVar[bytes]
    #: the Close reason of a pre-auth timeout
    TIMEOUT_REASON: ClassVar[str]
    #: sent after the refusal that was one failed login too many; b"" for nothing
    TOO_MANY_FAILED_LOGINS: ClassVar[bytes]

    @abstractmethod
    def _goodbye(self, text: str) -> bytes:
        """The line that tells the client why the proxy closes (BYE, -ERR)."""

    @property
    @abstractmethod
    def _input(self) -> HeldInput:
        """The framing client bytes go into."""

    @property
    @abstractmethod
    def _max_held(self) -> int:
        """The most bytes held back during a login."""

    @abstractmethod
    def _process(self) -> list[Action]:
        """Read and answer whatever complete commands the input holds."""

    # -------------------------------------------------------------------------------------

    def __init__(self, initial: Enum, *, tls_active: bool, starttls_available: bool,
                 plaintext_auth: bool, limits: Limits) -> None:
        self.state = initial
        self.tls_active = tls_active
        self.starttls_available = starttls_available and not tls_active
        self.plaintext_auth = plaintext_auth
        self.limits = limits
        self.bad_commands = 0
        self.failed_logins = 0

    @property
    def login_allowed(self) -> bool:
        return self.tls_active or self.plaintext_auth

    @property
    def _finished(self) -> bool:
        return self.state is self.CLOSED or self.state is self.RELAYING

    def receive_data(self, data: bytes) -> list[Action]:
        """Client bytes: commands are answered; during a login they are held, bounded."""
        if self._finished:
            return []
        self._input.feed(data)
        actions = [] if self.state is self.LOGGING_IN else self._process()
        # Held back however TCP split them, and also what came with the command that
        # started the login.
        if self.state is self.LOGGING_IN and self._input.buffered > self._max_held:
            actions += self._fatal("Too much data pipelined during login")
        return actions

    def shutdown(self) -> list[Action]:
        """The proxy is shutting down: tell the client to come back later."""
        if self._finished:
            return []
        return [SendToClient(self.SHUTDOWN_LINE), self._close("shutdown")]

    def timed_out(self) -> list[Action]:
        """No login within the pre-auth timeout: say why, then close."""
        if self._finished:
            return []
        # RFC 3501 section 7.1.5: BYE before closing for inactivity. RFC 1939 section 3
        # lets a POP3 server just close; one -ERR line tells the user why.
        return [SendToClient(self._goodbye("Autologout; idle for too long")),
                self._close(self.TIMEOUT_REASON)]

    def _enter(self, new: Enum) -> None:
        if new not in self.TRANSITIONS[self.state]:
            raise AssertionError(f"illegal transition {self.state} -> {new}")
        self.state = new

    def _close(self, reason: str) -> Close:
        self._enter(self.CLOSED)
        return Close(reason)

    def _fatal(self, text: str) -> list[Action]:
        """Tell the client ``text`` and close; ``text`` is the Close reason too."""
        return [SendToClient(self._goodbye(text)), self._close(text)]

    def _count_bad_command(self) -> bool:
        """Count one command we could not act on; True once that reaches the limit."""
        self.bad_commands += 1
        return self.bad_commands >= self.limits.max_bad_commands

    def _refuse_login(self, line: bytes) -> list[Action]:
        """A failed login's reply, counted; the one too many also ends the session."""
        self.failed_logins += 1
        actions: list[Action] = [SendToClient(line)]
        if self.failed_logins >= self.limits.max_failed_logins:
            if self.TOO_MANY_FAILED_LOGINS:
                actions.append(SendToClient(self.TOO_MANY_FAILED_LOGINS))
            actions.append(self._close("too many failed logins"))
        return actions

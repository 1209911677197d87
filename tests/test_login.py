"""The login's policy (login.py), driven without a reactor: canned answers per action.

``login()`` yields actions and is sent their results (or thrown their errors); the
driver below plays the adapter (frontend.py) with answers from a ``World``: a
directory of routes, backends that can be unreachable or refuse, a penalty admission
that waited some time, and a clock the answers move. The tests check what the login
asks for, in which order, what it logs and counts, and what it ends with.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imapproxy import login
from imapproxy.actions import (
    ClaimSession,
    CloseBackend,
    CountBackendFailure,
    CountLogin,
    CountRefusal,
    CountTurn,
    Dial,
    FinishPenalty,
    LogInAtBackend,
    LoginLog,
    Lookup,
    WaitForPenalty,
    WaitForTurn,
)
from imapproxy.breaker import CircuitBreaker
from imapproxy.config import (
    BackendConfig,
    Config,
    DirectoryConfig,
    Limits,
    Listener,
    SharedConfig,
    TlsConfig,
    UsernameConfig,
)
from imapproxy.credentials import Credentials, Secret
from imapproxy.directory import Route, Server
from imapproxy.errors import (
    AuthenticationFailed,
    BackendProtocolError,
    BackendRefused,
    BackendUnavailable,
    DirectoryUnavailable,
    InvalidUsername,
    LoginDropped,
    LoginQueueFull,
    LoginsRefused,
    ProxyError,
    RoutingLoop,
    TokenRefused,
    TooManyConnections,
    UserNotFound,
)
from imapproxy.imapbackend import ImapBackendLogin
from imapproxy.limits import ConnectionLimiter, Refusal, Ticket
from imapproxy.penalty import Outcome, Penalty
from imapproxy.penaltygate import Admission
from imapproxy.pop3backend import Pop3BackendLogin
from imapproxy.redisurl import parse_redis_url
from imapproxy.sasl import parse_oauthbearer, parse_xoauth2
from imapproxy.sievebackend import SieveBackendLogin

#: distinctive, so that a leak into any log text or field is found by a plain search
PASSWORD = b"Zq7-unique-p4ssw0rd-Xv9"
LISTENERS = (Listener("imap", "127.0.0.1", 1143, "none"),
             Listener("pop3", "127.0.0.1", 1110, "none"))
A, B = Server("10.0.0.1"), Server("10.0.0.2")


class FakeClock:
    """The login's ``clock`` (a function) and the breaker's (``seconds()``) in one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def seconds(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingGate:
    """Where an Admission reports its outcome (penaltygate.LocalGate.finish)."""

    def __init__(self) -> None:
        self.finished: list[tuple[int, Outcome, bytes]] = []

    def finish(self, attempt: int, outcome: Outcome, fingerprint: bytes = b"") -> None:
        self.finished.append((attempt, outcome, fingerprint))


@dataclass(eq=False)
class FakeBackend:
    """A dialled connection as login.Backend sees it."""

    server: Server
    peer_host: str
    peer_port: int
    local_host: str = "10.0.0.100"
    dialogue: Any = None
    closed: bool | None = None  # None: open; else the abort flag it was closed with


@dataclass
class Run:
    """What one login asked for, and what it ended with."""

    actions: list[Any]
    result: login.LoggedIn | login.Refused

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]

    @property
    def kinds(self) -> list[str]:
        return [type(a).__name__ for a in self.actions]

    @property
    def logs(self) -> list[LoginLog]:
        return self.of(LoginLog)


def drive(flow: login.Flow, answers: dict[type, Callable[[Any], Any]]) -> Run:
    """Run the generator as frontend._login does: each action's answer is sent back,
    an answer that raises is thrown in; actions without an answer get None."""
    actions: list[Any] = []
    result: Any = None
    error: Exception | None = None
    while True:
        try:
            step = flow.send(result) if error is None else flow.throw(error)
        except StopIteration as done:
            return Run(actions, done.value)
        actions.append(step)
        result, error = None, None
        answer = answers.get(type(step))
        if answer is not None:
            try:
                result = answer(step)
            except Exception as e:  # noqa: BLE001 - as the adapter does: the flow decides
                error = e


def make_config(*, listeners: tuple[Listener, ...] = LISTENERS, **sections: Any) -> Config:
    backend = sections.pop("backend", BackendConfig(imap_port=10143, pop3_port=10110))
    return Config(path=Path("/nonexistent/test.toml"), listeners=listeners,
                  tls=TlsConfig(plaintext_auth=True), directory=DirectoryConfig(),
                  backend=backend, limits=sections.pop("limits", Limits(login_delay=2.0)),
                  username=sections.pop("username", UsernameConfig()),
                  shared=sections.pop("shared", SharedConfig()))


@dataclass
class World:
    """The adapter's side of a login: directory, backends, penalty, clock."""

    config: Config = field(default_factory=make_config)
    servers: tuple[Server, ...] = (A, B)
    #: the route's login name; None: the name the login asks to log in with
    route_login: str | None = None
    lookup_error: ProxyError | None = None
    #: host -> the error dialling it raises
    unreachable: dict[str, Exception] = field(default_factory=dict)
    #: host -> (peer host, peer port, local host) of the connection, when not the plain one
    peers: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    #: host -> the error its login dialogue ends with
    login_errors: dict[str, ProxyError] = field(default_factory=dict)
    #: seconds the backend takes over the login (the clock moves by it)
    check_time: float = 0.0
    waited: float = 0.0
    penalty_refusal: str | None = None
    #: the answer to WaitForTurn: seconds waited (the clock moves by it), None (pacing
    #: off), or "full" (LoginQueueFull)
    turn: float | str | None = None
    ticket: Any = None
    #: what the shared session count answers (ClaimSession)
    shared_refusal: Refusal | None = None
    clock: FakeClock = field(default_factory=FakeClock)
    gate: RecordingGate = field(default_factory=RecordingGate)

    def __post_init__(self) -> None:
        self.keys = Penalty(self.clock, key=b"k" * 32)
        self.breaker: CircuitBreaker[Server] = CircuitBreaker(
            self.clock, self.config.backend.down_cooldown)
        self.attempts = 0

    def run(self, username: str = "alice", password: bytes = PASSWORD, *,
            protocol: str = "imap", mechanism: str = "LOGIN", tls: bool = True,
            client_id: tuple[tuple[str, str | None], ...] = (),
            credentials: Credentials | None = None) -> Run:
        client = login.Client(protocol=protocol, session_id="4242-7", session_number=7,
                              address=("192.0.2.7", 40000), local=("127.0.0.1", 1143),
                              client_key="192.0.2.7", host="192.0.2.7", tls=tls)
        if credentials is None:
            credentials = Credentials(username, Secret(password), mechanism=mechanism)
        flow = login.login(client, credentials,
                           client_id, config=self.config, breaker=self.breaker, keys=self.keys,
                           clock=self.clock, ticket=self.ticket)
        return drive(flow, {WaitForPenalty: self.wait, WaitForTurn: self.take_turn,
                            FinishPenalty: self.finish,
                            Lookup: self.lookup, Dial: self.dial,
                            LogInAtBackend: self.log_in, CloseBackend: self.close,
                            ClaimSession: lambda _step: self.shared_refusal})

    def wait(self, step: WaitForPenalty) -> Admission:
        if self.penalty_refusal is not None:
            raise LoginsRefused(self.penalty_refusal)
        self.clock.advance(self.waited)
        self.attempts += 1
        return Admission(self.gate, self.attempts, self.waited)

    def take_turn(self, step: WaitForTurn) -> float | None:
        if self.turn == "full":
            raise LoginQueueFull()
        assert not isinstance(self.turn, str)
        if self.turn is not None:
            self.clock.advance(self.turn)
        return self.turn

    def finish(self, step: FinishPenalty) -> None:
        step.admission.finish(step.outcome, step.fingerprint)  # type: ignore[attr-defined]

    def lookup(self, step: Lookup) -> Route:
        if self.lookup_error is not None:
            raise self.lookup_error
        return Route(self.route_login or step.backend_login, self.servers)

    def dial(self, step: Dial) -> FakeBackend:
        server: Server = step.server  # type: ignore[assignment]
        if server.host in self.unreachable:
            raise self.unreachable[server.host]
        peer_host, peer_port, local = self.peers.get(server.host,
                                                     (server.host, step.port, "10.0.0.100"))
        return FakeBackend(server, peer_host, peer_port, local)

    def log_in(self, step: LogInAtBackend) -> FakeBackend:
        backend: FakeBackend = step.backend  # type: ignore[assignment]
        backend.dialogue = step.dialogue
        self.clock.advance(self.check_time)
        if backend.server.host in self.login_errors:
            raise self.login_errors[backend.server.host]
        return backend

    def close(self, step: CloseBackend) -> None:
        step.backend.closed = step.abort  # type: ignore[attr-defined]


def dialled(run: Run) -> list[tuple[str, int]]:
    return [(d.server.host, d.port) for d in run.of(Dial)]


# -- the order: penalty first ---------------------------------------------------------------


def test_a_login_waits_for_the_penalty_then_looks_up_dials_and_logs_in() -> None:
    world = World()
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "Lookup", "Dial", "LogInAtBackend",
                         "FinishPenalty", "LoginLog", "CountLogin"]
    wait = run.actions[0]
    assert wait == WaitForPenalty("192.0.2.7", world.keys.user_key("alice"))
    assert run.of(Lookup) == [Lookup("alice", "imap", "alice")]
    assert isinstance(run.result, login.LoggedIn)
    assert run.result.backend.server == A and run.result.user == "alice"
    assert run.result.mechanism == "LOGIN"
    # The admission was finished exactly once, as a success, with no fingerprint kept.
    assert world.gate.finished == [(1, Outcome.SUCCESS, b"")]


def test_the_penalty_and_the_lookup_use_the_rewritten_name_the_logs_the_one_sent() -> None:
    world = World(config=make_config(username=UsernameConfig(
        lowercase=True, default_domain="example.org", strip_domain_for_backend=True)))
    run = world.run("Alice")
    assert run.actions[0].user_key == world.keys.user_key("alice@example.org")
    assert run.of(Lookup) == [Lookup("alice@example.org", "imap", "alice")]
    assert "user=<Alice>" in run.logs[-1].text
    assert isinstance(run.result, login.LoggedIn) and run.result.user == "Alice"


def test_a_penalty_refusal_ends_the_login_unchecked() -> None:
    world = World(penalty_refusal="too many attempts waiting for this address")
    run = world.run()
    # Neither the directory nor a backend saw the credentials.
    assert run.kinds == ["WaitForPenalty", "LoginLog", "CountLogin", "CountRefusal"]
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, LoginsRefused) and run.result.delay == 0.0
    assert run.of(CountLogin) == [CountLogin("failed", "LoginsRefused")]
    assert run.of(CountRefusal) == [CountRefusal("penalty")]
    assert run.logs[0].text == ("login failed id=7 client=192.0.2.7 user=<alice> "
                                "reason=LoginsRefused (too many attempts waiting for this "
                                "address)")
    assert world.gate.finished == []  # nothing was admitted, so nothing to finish


@pytest.mark.parametrize(("waited", "logged"), [
    (0.0, None), (0.0009, None), (0.001, "waited=0.001s"), (4.25, "waited=4.250s")])
def test_a_wait_of_a_millisecond_or_more_is_logged(waited: float, logged: str | None) -> None:
    run = World(waited=waited).run()
    delayed = [log for log in run.logs if log.text.startswith("login delayed")]
    if logged is None:
        assert delayed == []
    else:
        assert [log.text for log in delayed] == [
            f"login delayed id=7 client=192.0.2.7 user=<alice> {logged}"]
        assert ("waited", waited) in delayed[0].fields
        assert run.kinds[:2] == ["WaitForPenalty", "LoginLog"]  # before the lookup
    assert isinstance(run.result, login.LoggedIn)


# -- its turn: admission pacing, after the penalty and before the lookup ------------------


def test_the_turn_comes_after_the_penalty_and_before_anything_costs() -> None:
    world = World(waited=1.0, turn=0.0)
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "LoginLog", "WaitForTurn", "CountTurn", "Lookup",
                         "Dial", "LogInAtBackend", "FinishPenalty", "LoginLog", "CountLogin"]
    assert run.of(CountTurn) == [CountTurn(0.0)]
    assert not [log for log in run.logs if log.text.startswith("login paced")]
    assert isinstance(run.result, login.LoggedIn)


@pytest.mark.parametrize(("waited", "logged"), [
    (0.0009, None), (0.001, "waited=0.001s"), (12.5, "waited=12.500s")])
def test_a_turn_waited_for_is_counted_and_logged_from_a_millisecond(
        waited: float, logged: str | None) -> None:
    run = World(turn=waited).run()
    assert run.of(CountTurn) == [CountTurn(waited)]
    paced = [log for log in run.logs if log.text.startswith("login paced")]
    if logged is None:
        assert paced == []
    else:
        assert [log.text for log in paced] == [
            f"login paced id=7 client=192.0.2.7 user=<alice> {logged}"]
        assert ("waited", waited) in paced[0].fields
        assert run.kinds.index("LoginLog") < run.kinds.index("Lookup")


def test_with_pacing_off_nothing_is_counted() -> None:
    run = World(turn=None).run()
    assert "WaitForTurn" in run.kinds and run.of(CountTurn) == []


def test_a_full_queue_refuses_before_the_lookup_and_gives_the_admission_back() -> None:
    world = World(turn="full")
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "FinishPenalty", "LoginLog",
                         "CountRefusal"]
    assert isinstance(run.result, login.Refused) and run.result.delay == 0.0
    error = run.result.error
    assert isinstance(error, LoginQueueFull) and isinstance(error, TooManyConnections)
    assert (error.imap_code, error.pop3_code, error.sieve_code) == (
        "UNAVAILABLE", "SYS/TEMP", "TRYLATER")
    # Nothing was checked: the penalty learns nothing from it.
    assert world.gate.finished == [(1, Outcome.NEUTRAL, b"")]
    assert [log.text for log in run.logs] == [
        "login refused id=7 client=192.0.2.7 user=<alice> "
        "reason=too many logins waiting for their turn"]
    assert run.of(CountRefusal) == [CountRefusal("login_queue")]


def test_a_failed_guess_is_answered_login_delay_after_its_turn_not_after_the_penalty() -> None:
    """The check begins when the turn comes: a wait in the queue does not make an
    unknown user's answer come sooner than a wrong password's."""
    run = World(lookup_error=UserNotFound(), turn=5.0).run()
    assert isinstance(run.result, login.Refused) and run.result.delay == 2.0


# -- names refused before the lookup --------------------------------------------------------


@pytest.mark.parametrize(("username", "problem"), [
    ("a" * 321, "username longer than 320 bytes"),
    ("", "empty username"),
    ("al\x00ice", "control character in username"),
    ("eve\u2028x", "control character in username"),
    ("\udcff", "username is not UTF-8"),
])
def test_a_bad_name_is_a_failed_guess_without_a_lookup(username: str, problem: str) -> None:
    world = World()
    run = world.run(username)
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "FinishPenalty", "LoginLog", "CountLogin"]
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, InvalidUsername)
    # InvalidUsername is an AuthenticationFailed: "answered like a wrong password" (its
    # docstring) and counted by the penalty (tests/integration/test_hostile.py), so a
    # FAILURE with the pair's fingerprint, answered after login_delay like any guess.
    assert world.gate.finished == [(1, Outcome.FAILURE,
                                    world.keys.fingerprint(username, PASSWORD))]
    assert run.result.delay == 2.0
    assert f"reason=InvalidUsername ({problem})" in run.logs[0].text
    assert run.of(CountLogin) == [CountLogin("failed", "InvalidUsername")]


def test_max_username_counts_utf8_bytes() -> None:
    world = World(config=make_config(limits=Limits(max_username=8)))
    assert isinstance(world.run("abcdefgh").result, login.LoggedIn)
    for name in ("abcdefghi", "\u00e9" * 5):  # 9 bytes; 5 characters but 10 bytes
        run = world.run(name)
        assert isinstance(run.result, login.Refused) and not run.of(Lookup)


# -- failures: a guess or not, and how long the answer waits --------------------------------


def test_a_wrong_password_is_a_failure_answered_login_delay_after_the_check_began() -> None:
    world = World(login_errors={"10.0.0.1": AuthenticationFailed()}, check_time=0.5,
                  waited=5.0)
    run = world.run()
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, AuthenticationFailed)
    # The 5 s the penalty took are not part of the check: 2.0 - 0.5.
    assert run.result.delay == pytest.approx(1.5)
    finish = run.of(FinishPenalty)
    assert len(finish) == 1 and finish[0].outcome is Outcome.FAILURE
    assert finish[0].fingerprint == world.keys.fingerprint("alice", PASSWORD)
    assert world.gate.finished == [(1, Outcome.FAILURE, finish[0].fingerprint)]
    assert run.of(CountLogin) == [CountLogin("failed", "AuthenticationFailed")]
    # A refused password says nothing against the server: it stays first, B untried.
    assert dialled(run) == [("10.0.0.1", 10143)]
    assert world.breaker.down() == []


def test_a_slow_check_is_answered_at_once_never_with_a_negative_delay() -> None:
    world = World(login_errors={"10.0.0.1": LoginDropped()}, check_time=2.5)
    run = world.run()
    assert isinstance(run.result, login.Refused) and run.result.delay == 0.0
    assert run.of(FinishPenalty)[0].outcome is Outcome.FAILURE


def test_an_unknown_user_takes_as_long_as_a_wrong_password() -> None:
    world = World(lookup_error=UserNotFound())
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "Lookup", "FinishPenalty", "LoginLog",
                         "CountLogin"]
    assert isinstance(run.result, login.Refused) and run.result.delay == 2.0
    assert run.of(FinishPenalty)[0].outcome is Outcome.FAILURE


@pytest.mark.parametrize("world", [
    World(lookup_error=DirectoryUnavailable()),
    World(login_errors={"10.0.0.1": BackendRefused("UNAVAILABLE", "Maintenance")}),
    World(unreachable={"10.0.0.1": BackendUnavailable("connection refused"),
                       "10.0.0.2": BackendUnavailable("connect timed out")}),
], ids=["directory-down", "backend-refused", "all-unreachable"])
def test_other_failures_teach_the_penalty_nothing_and_are_answered_at_once(
        world: World) -> None:
    world.check_time = 0.25
    run = world.run()
    assert isinstance(run.result, login.Refused) and run.result.delay == 0.0
    finish = run.of(FinishPenalty)
    assert len(finish) == 1 and finish[0].outcome is Outcome.NEUTRAL
    assert world.gate.finished[0][:2] == (1, Outcome.NEUTRAL)
    assert run.of(CountLogin) == [CountLogin("failed", type(run.result.error).__name__)]


def test_an_unexpected_error_comes_out_of_the_flow_for_the_adapter() -> None:
    # frontend._login logs it, finishes the admission NEUTRAL and answers UNAVAILABLE.
    world = World(unreachable={"10.0.0.1": RuntimeError("bug")})
    with pytest.raises(RuntimeError, match="bug"):
        world.run()
    assert world.gate.finished == []


# -- servers: the breaker's order, failover, routing loops ----------------------------------


def test_an_unreachable_server_is_counted_logged_and_the_next_one_dialled() -> None:
    world = World(unreachable={"10.0.0.1": BackendUnavailable("connection refused")})
    run = world.run()
    assert dialled(run) == [("10.0.0.1", 10143), ("10.0.0.2", 10143)]
    assert run.of(CountBackendFailure) == [
        CountBackendFailure("10.0.0.1:10143", "BackendUnavailable")]
    warn = [log for log in run.logs if log.level == "warn"]
    assert [log.text for log in warn] == [
        "backend 10.0.0.1 unavailable for <alice>: connection refused"]
    assert warn[0].fields == (("server", "10.0.0.1"), ("user_raw", "alice"))
    assert isinstance(run.result, login.LoggedIn) and run.result.backend.server == B
    assert "backend=10.0.0.2 " in run.logs[-1].text
    assert run.of(FinishPenalty)[0].outcome is Outcome.SUCCESS


def test_the_breaker_puts_a_failed_server_last_until_its_cooldown_ends() -> None:
    world = World(unreachable={"10.0.0.1": BackendUnavailable("connection refused")})
    world.run()
    assert world.breaker.down() == [A]
    world.unreachable.clear()
    assert dialled(world.run()) == [("10.0.0.2", 10143)]  # the good one first
    world.clock.advance(30.0)  # [backend] down_cooldown
    second = world.run()
    assert dialled(second) == [("10.0.0.1", 10143)]
    assert second.of(CountBackendFailure) == []
    assert world.breaker.down() == []


def test_a_backend_protocol_error_or_login_timeout_also_fails_over() -> None:
    world = World(login_errors={"10.0.0.1": BackendProtocolError("unexpected greeting")})
    run = world.run()
    assert dialled(run) == [("10.0.0.1", 10143), ("10.0.0.2", 10143)]
    assert run.of(CountBackendFailure) == [
        CountBackendFailure("10.0.0.1:10143", "BackendProtocolError")]
    assert "unavailable for <alice>: protocol error: unexpected greeting" in run.logs[0].text
    assert isinstance(run.result, login.LoggedIn) and run.result.backend.server == B
    assert world.breaker.down() == [A]


def test_every_server_down_is_a_backend_unavailable_refusal() -> None:
    world = World(unreachable={"10.0.0.1": BackendUnavailable("connection refused"),
                               "10.0.0.2": BackendUnavailable("")})
    run = world.run()
    assert dialled(run) == [("10.0.0.1", 10143), ("10.0.0.2", 10143)]
    assert isinstance(run.result, login.Refused)
    assert type(run.result.error) is BackendUnavailable
    # An empty detail is replaced by the error's name in the warning.
    assert [log.text for log in run.logs if log.level == "warn"] == [
        "backend 10.0.0.1 unavailable for <alice>: connection refused",
        "backend 10.0.0.2 unavailable for <alice>: BackendUnavailable"]
    assert run.logs[-1].text == ("login failed id=7 client=192.0.2.7 user=<alice> "
                                 "reason=BackendUnavailable (no server of the route could "
                                 "be reached)")
    assert sorted(world.breaker.down(), key=str) == [A, B]


@pytest.mark.parametrize("server", [Server("127.0.0.1", 1143), Server("127.0.0.1")])
def test_a_server_naming_our_listener_is_never_dialled(server: Server) -> None:
    # Server("127.0.0.1") takes [backend] imap_port, here our listener's port.
    config = make_config(backend=BackendConfig(imap_port=1143))
    world = World(config=config, servers=(server, B))
    run = world.run()
    assert dialled(run) == [("10.0.0.2", 1143)]
    assert run.of(CountBackendFailure) == [CountBackendFailure("127.0.0.1:1143", "RoutingLoop")]
    errors = [log for log in run.logs if log.level == "error"]
    assert len(errors) == 1 and "one of this proxy's own listeners" in errors[0].text
    assert isinstance(run.result, login.LoggedIn) and run.result.backend.server == B


@pytest.mark.parametrize(("listener", "peer"), [
    (Listener("imap", "127.0.0.1", 1143, "none"), ("127.0.0.1", 1143, "127.0.0.1")),
    # A wildcard listener is ours on every local address: the kernel picks the peer's own
    # address as our source when the peer is this machine (routingloops.py).
    (Listener("imap", "0.0.0.0", 1143, "none"), ("192.0.2.50", 1143, "192.0.2.50")),
])
def test_a_connection_that_comes_back_to_us_is_aborted_before_the_credentials(
        listener: Listener, peer: tuple[str, int, str]) -> None:
    world = World(config=make_config(listeners=(listener,)),
                  servers=(Server("mail.example.net", 1143),), peers={"mail.example.net": peer})
    run = world.run()
    assert run.kinds[:5] == ["WaitForPenalty", "WaitForTurn", "Lookup", "Dial", "CloseBackend"]
    closed = run.of(CloseBackend)
    assert len(closed) == 1 and closed[0].abort is True and closed[0].backend.closed is True
    assert run.of(LogInAtBackend) == []  # not a byte of the credentials went out
    assert run.of(CountBackendFailure) == [
        CountBackendFailure("mail.example.net:1143", "RoutingLoop")]
    assert isinstance(run.result, login.Refused)
    # The loop is reported in the log and the count; the login ends, like any route whose
    # servers all failed, with BackendUnavailable (RoutingLoop is one too).
    assert isinstance(run.result.error, BackendUnavailable)
    assert run.of(FinishPenalty)[0].outcome is Outcome.NEUTRAL


def test_a_peer_of_ours_on_another_port_is_not_a_loop() -> None:
    world = World(servers=(Server("mail.example.net", 1144),),
                  peers={"mail.example.net": ("127.0.0.1", 1144, "127.0.0.1")})
    run = world.run()
    assert isinstance(run.result, login.LoggedIn) and run.of(CloseBackend) == []


def test_a_proxy_chain_out_of_ttl_is_refused_before_any_dial() -> None:
    # Another proxy passed on x-proxy-ttl 1: nothing left for us (forwarding.py).
    world = World()
    run = world.run(client_id=(("x-proxy-ttl", "1"),))
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, RoutingLoop) and run.result.delay == 0.0
    assert run.of(Dial) == [] and world.breaker.down() == []
    assert run.of(FinishPenalty)[0].outcome is Outcome.NEUTRAL


# -- the connection limits, after the backend accepted ---------------------------------------


def test_a_user_over_its_connection_limit_is_refused_and_its_backend_closed() -> None:
    limiter = ConnectionLimiter(max_per_user_client=1)
    first = limiter.admit("192.0.2.7")
    assert isinstance(first, Ticket) and first.login("alice") is None
    world = World(ticket=limiter.admit("192.0.2.7"))
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "Lookup", "Dial", "LogInAtBackend",
                         "FinishPenalty", "LoginLog", "CountRefusal", "CloseBackend"]
    # The password was right: the penalty learns a success, whatever the limit says.
    assert world.gate.finished == [(1, Outcome.SUCCESS, b"")]
    assert run.logs[0].text == ("login refused id=7 client=192.0.2.7 user=<alice> "
                                "reason=too many connections for this user from this address")
    assert run.of(CountRefusal) == [CountRefusal("per_user_client")]
    closed = run.of(CloseBackend)[0]
    assert closed.abort is False and closed.backend.server == A
    assert isinstance(run.result, login.Refused) and run.result.delay == 0.0
    assert isinstance(run.result.error, TooManyConnections)
    assert run.result.error.client_text() == \
        "Too many connections for this user from this address"
    assert CountLogin("ok") not in run.actions
    assert limiter.sessions_of("alice", "192.0.2.7") == 1


def test_the_ticket_counts_the_rewritten_name() -> None:
    limiter = ConnectionLimiter(max_per_user_client=1)
    config = make_config(username=UsernameConfig(lowercase=True))
    ticket = limiter.admit("192.0.2.7")
    world = World(config=config, ticket=ticket)
    assert isinstance(world.run("ALICE").result, login.LoggedIn)
    assert ticket.user == "alice"  # type: ignore[union-attr]
    again = World(config=config, ticket=limiter.admit("192.0.2.7")).run("Alice")
    assert isinstance(again.result, login.Refused)


SHARED = SharedConfig(redis="redis://127.0.0.1", url=parse_redis_url("redis://127.0.0.1"))


def test_with_shared_state_the_session_is_counted_over_every_instance() -> None:
    limiter = ConnectionLimiter(max_per_user_client=20)
    config = make_config(shared=SHARED, username=UsernameConfig(lowercase=True))
    world = World(config=config, ticket=limiter.admit("192.0.2.7"))
    run = world.run("Alice")
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "Lookup", "Dial", "LogInAtBackend",
                         "FinishPenalty", "ClaimSession", "LoginLog", "CountLogin"]
    assert run.of(ClaimSession) == [ClaimSession("alice", "192.0.2.7", 20)]
    assert isinstance(run.result, login.LoggedIn)
    assert limiter.sessions_of("alice", "192.0.2.7") == 1


def test_over_the_limit_on_every_instance_together() -> None:
    limiter = ConnectionLimiter(max_per_user_client=20)
    ticket = limiter.admit("192.0.2.7")
    world = World(config=make_config(shared=SHARED), ticket=ticket,
                  shared_refusal=Refusal.PER_USER_CLIENT)
    run = world.run()
    assert run.kinds == ["WaitForPenalty", "WaitForTurn", "Lookup", "Dial", "LogInAtBackend",
                         "FinishPenalty", "ClaimSession", "LoginLog", "CountRefusal",
                         "CloseBackend"]
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, TooManyConnections)
    assert run.of(CountRefusal) == [CountRefusal("per_user_client")]
    # Not counted here either: the connection may log in again (another user, later).
    assert limiter.sessions_of("alice", "192.0.2.7") == 0
    assert ticket.user is None  # type: ignore[union-attr]


def test_no_shared_count_without_redis_a_limit_or_a_ticket() -> None:
    limiter = ConnectionLimiter(max_per_user_client=20)
    for world in (World(ticket=limiter.admit("192.0.2.7")),
                  World(config=make_config(shared=SHARED,
                                           limits=Limits(max_connections_per_user_ip=0)),
                        ticket=limiter.admit("192.0.2.7")),
                  World(config=make_config(shared=SHARED))):
        run = world.run()
        assert isinstance(run.result, login.LoggedIn)
        assert run.of(ClaimSession) == []
    # Over the limit here already: Redis is not asked.
    full = ConnectionLimiter(max_per_user_client=1)
    assert isinstance(full.admit("192.0.2.7"), Ticket)
    full_ticket = full.admit("192.0.2.7")
    full_ticket.login("alice")  # type: ignore[union-attr]
    run = World(config=make_config(shared=SHARED), ticket=full.admit("192.0.2.7")).run()
    assert isinstance(run.result, login.Refused) and run.of(ClaimSession) == []


# -- success --------------------------------------------------------------------------------


@pytest.mark.parametrize(("mechanism", "tls"), [("LOGIN", True), ("PLAIN", False)])
def test_success_is_finished_logged_and_counted(mechanism: str, tls: bool) -> None:
    world = World(servers=(Server("10.0.0.1", 993),))
    run = world.run(mechanism=mechanism, tls=tls)
    assert run.of(FinishPenalty) == [FinishPenalty(run.of(FinishPenalty)[0].admission,
                                                   Outcome.SUCCESS)]
    line = run.logs[-1]
    assert line.level == "info"
    assert line.text == (f"login id=7 client=192.0.2.7 user=<alice> backend=10.0.0.1:993 "
                         f"mechanism={mechanism} tls={tls} pid=4242")
    assert dict(line.fields) == {"session_id": 7, "client": "192.0.2.7", "user": "alice",
                                 "backend": "10.0.0.1:993", "mechanism": mechanism,
                                 "tls": tls, "pid": "4242"}
    assert run.actions[-1] == CountLogin("ok")
    assert run.result == login.LoggedIn(run.result.backend, "alice", mechanism)  # type: ignore[union-attr]


# -- what the log lines may hold -------------------------------------------------------------


def every_path() -> list[Run]:
    over = ConnectionLimiter(max_per_user_client=1)
    held = over.admit("192.0.2.7")
    held.login("alice")  # type: ignore[union-attr]
    return [
        World().run(),
        World(waited=3.0).run(),
        World(penalty_refusal="queue full").run(),
        World(turn=2.0).run(),
        World(turn="full").run(),
        World().run("al\nice"),
        World(lookup_error=UserNotFound()).run(),
        World(lookup_error=DirectoryUnavailable()).run(),
        World(login_errors={"10.0.0.1": AuthenticationFailed()}).run(),
        World(login_errors={"10.0.0.1": BackendProtocolError("bad")}).run(),
        World(unreachable={"10.0.0.1": BackendUnavailable("x"),
                           "10.0.0.2": BackendUnavailable("y")}).run(),
        World(servers=(Server("127.0.0.1", 1143),)).run(),
        World(ticket=over.admit("192.0.2.7")).run(),
        World().run(protocol="pop3", mechanism="USER"),
    ]


def test_no_log_line_and_no_action_carries_the_password() -> None:
    secret = PASSWORD.decode()
    runs = every_path()
    assert sum(len(run.logs) for run in runs) >= 15
    for run in runs:
        for log in run.logs:
            assert secret not in log.text
            assert all(secret not in str(value) and secret not in repr(value)
                       for _name, value in log.fields)
        for action in run.actions:
            assert secret not in repr(action)
            if isinstance(action, FinishPenalty):
                assert PASSWORD not in action.fingerprint


def test_a_name_that_would_forge_a_log_line_is_quoted() -> None:
    forged = "eve\r\nlogin id=1 client=203.0.113.9 user=<admin> backend=x"
    run = World().run(forged)
    text = run.logs[0].text
    assert "\r" not in text and "\n" not in text
    assert text.count("user=<") == 1 and "user=<eve\\x0d\\x0alogin id=1" in text
    assert "user=\\x3cadmin\\x3e" in text
    assert ("user", forged) in run.logs[0].fields  # raw, for JSON (its own escaping)


def test_quotes_and_brackets_in_a_name_cannot_end_the_field() -> None:
    name = 'x" user=<root> "y'  # no control character: a valid name
    world = World(unreachable={"10.0.0.1": BackendUnavailable("connection refused")})
    run = world.run(name)
    assert isinstance(run.result, login.LoggedIn)
    quoted = 'user=<x" user=\\x3croot\\x3e "y>'
    assert quoted in run.logs[-1].text and run.logs[-1].text.count("user=<") == 1
    warn = [log.text for log in run.logs if log.level == "warn"]
    assert warn == ['backend 10.0.0.1 unavailable for <x" user=\\x3croot\\x3e "y>: '
                    'connection refused']


# -- the port and the dialogue ----------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "server", "port", "dialogue", "first"), [
    ("imap", Server("10.0.0.1"), 10143, ImapBackendLogin, b"P3 LOGIN"),
    ("pop3", Server("10.0.0.1"), 10110, Pop3BackendLogin, b"CAPA"),
    ("imap", Server("10.0.0.1", 1993), 1993, ImapBackendLogin, b"P3 LOGIN"),
    ("pop3", Server("10.0.0.1", 1995), 1995, Pop3BackendLogin, b"CAPA"),
    ("managesieve", Server("10.0.0.1"), 14190, SieveBackendLogin, b'AUTHENTICATE "PLAIN"'),
    ("managesieve", Server("10.0.0.1", 2000), 2000, SieveBackendLogin,
     b'AUTHENTICATE "PLAIN"'),
])
def test_the_port_and_the_dialogue_follow_the_protocol(
        protocol: str, server: Server, port: int, dialogue: type, first: bytes) -> None:
    config = make_config(backend=BackendConfig(imap_port=10143, pop3_port=10110,
                                               managesieve_port=14190, forward_client="none"))
    run = World(config=config, servers=(server,)).run(protocol=protocol)
    assert dialled(run) == [("10.0.0.1", port)]
    assert login.BACKEND_DIALOGUES[protocol] is dialogue
    (step,) = run.of(LogInAtBackend)
    assert type(step.dialogue) is dialogue
    greeting = {"imap": b"* OK [CAPABILITY IMAP4rev1] hi\r\n", "pop3": b"+OK hi\r\n",
                "managesieve": b'"SIEVE" "fileinto"\r\nOK "hi"\r\n'}[protocol]
    sent = b"".join(a.data for a in step.dialogue.receive_data(greeting))
    assert sent.startswith(first)


def test_the_dialogue_logs_in_as_the_route_says_with_the_client_forwarded() -> None:
    world = World(route_login="alice.mbox", servers=(A,))
    run = world.run()
    (step,) = run.of(LogInAtBackend)
    sent = b"".join(a.data for a in step.dialogue.receive_data(
        b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n"))
    # forward_client = "id" (the default): the client's address in ID (RFC 2971).
    assert b'"x-originating-ip" "192.0.2.7"' in sent and b'"x-session-id" "4242-7"' in sent
    assert sent.endswith(b'LOGIN "alice.mbox" "' + PASSWORD + b'"\r\n')
    assert run.of(Dial)[0].proxy_header == b""


def test_starttls_and_proxy_v2_reach_the_dial_and_the_dialogue() -> None:
    config = make_config(backend=BackendConfig(imap_port=10143, tls="starttls",
                                               forward_client="proxy-v2"))
    run = World(config=config, servers=(A,)).run()
    # The PROXY v2 signature (proxy-protocol.txt section 2.2) goes first on the dial.
    assert run.of(Dial)[0].proxy_header.startswith(b"\r\n\r\n\x00\r\nQUIT\n")
    (step,) = run.of(LogInAtBackend)
    sent = b"".join(a.data for a in step.dialogue.receive_data(
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"))
    assert sent == b"P1 STARTTLS\r\n"


# -- tokens (issue 16) --------------------------------------------------------------------------


def test_a_refused_token_is_a_failed_guess_fingerprinted_over_the_token() -> None:
    token = b"ya29.Secret-Token_1"
    credentials = parse_oauthbearer(b"n,a=alice,\x01auth=Bearer " + token + b"\x01\x01")
    world = World(login_errors={"10.0.0.1": TokenRefused(b"eyJ9")})
    run = world.run(credentials=credentials)
    assert isinstance(run.result, login.Refused)
    assert isinstance(run.result.error, TokenRefused)
    (finish,) = run.of(FinishPenalty)
    # The same token again is the same credential: the penalty counts it once.
    assert finish.outcome is Outcome.FAILURE
    assert finish.fingerprint == world.keys.fingerprint("alice", token)
    for log in run.logs:
        assert token.decode() not in log.text and token.decode() not in repr(log.fields)
    assert all(token not in repr(action).encode() for action in run.actions)


def test_a_token_login_is_logged_with_its_mechanism_and_replayed_to_the_route_login() -> None:
    credentials = parse_xoauth2(b"user=alice\x01auth=Bearer t0k\x01\x01")
    world = World(route_login="alice@example.org")
    run = world.run(credentials=credentials)
    assert isinstance(run.result, login.LoggedIn) and run.result.mechanism == "XOAUTH2"
    assert any("mechanism=XOAUTH2" in log.text for log in run.logs)
    (step,) = run.of(LogInAtBackend)
    out = step.dialogue.receive_data(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n")
    assert out[0].data.endswith(b"P3 AUTHENTICATE XOAUTH2 " + base64.b64encode(
        b"user=alice@example.org\x01auth=Bearer t0k\x01\x01") + b"\r\n")

"""The shared state against a real redis-server (tests/rig/redis.py): the scripts'
penalty and session counts as two instances see them, the hashing key, the fallback
when Redis is away or slow, the recovery, TLS, passwords, reload.

Times given to the scripts are explicit (RedisState's ``now``), so what they compute
(the waits, the expiry) is checked exactly, without waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from rig.certs import CertPair, TestCA
from rig.redis import RedisServer
from twisted.internet import defer, reactor, task
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from imapproxy.config import SharedConfig
from imapproxy.credentials import Secret
from imapproxy.metrics import Metrics
from imapproxy.penalty import Refused, fingerprint, user_key
from imapproxy.redisstate import RedisState
from imapproxy.redisurl import parse_redis_url
from imapproxy.sharedstate import BUSY, LEASE, PenaltySettings, Verdict

SETTINGS = PenaltySettings(base=2.0, cap=15.0, memory=900.0, known_memory=86400.0)
ADDRESS, OTHER = "192.0.2.7", "198.51.100.9"
KEY = Secret(b"k" * 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the tests that do not stop it; each test uses a prefix of its own."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis_server:
        yield redis_server


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test may stop, pause and start again."""
    with RedisServer(tmp_path / "redis") as redis_server:
        yield redis_server


class Log:
    """The log lines seen while it is open."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines())


@pytest.fixture
def log() -> Iterator[Log]:
    opened = Log()
    yield opened
    opened.close()


def config(url: str, prefix: str, **keys: Any) -> SharedConfig:
    keys.setdefault("key", KEY)
    return SharedConfig(redis=url, url=parse_redis_url(url), prefix=prefix, **keys)


class Clock:
    """The time the scripts are given."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Wait (a generous deadline, a guard against hanging: never a timing) for it."""
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"never: {what}"
        await sleep(0.02)


_started: list[RedisState] = []


async def started(shared: SharedConfig, name: str, clock: Clock | None = None,
                  **options: Any) -> RedisState:
    state = RedisState(reactor, shared, instance=name, now=clock, **options)
    state.startService()
    _started.append(state)
    await until(lambda: state.key is not None and state.up, f"{name} knows the key")
    return state


@pytest.fixture(autouse=True)
def stop_states() -> Iterator[None]:
    yield
    states = list(_started)
    _started.clear()
    for state in states:
        if state.running:
            pytest_twisted.blockon(state.stopService())


def hget(server: RedisServer, key: str, field: str) -> str:
    return server.cli("HGET", key, field).strip()


# -- the penalty ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_failures_on_one_instance_hold_back_the_next_guess_on_another(
        server: RedisServer) -> None:
    clock = Clock()
    t0 = clock.now
    a = await started(config(server.url, "p1:"), "A", clock)
    b = await started(config(server.url, "p1:"), "B", clock)
    assert a.key == b.key is not None
    alice = user_key(a.key, "alice")
    assert await a.enter(ADDRESS, alice, "t1", SETTINGS) == Verdict(False, 0, 0, 0.0, 0)
    await a.finish(ADDRESS, alice, "t1", "failure", fingerprint(a.key, "alice", b"guess1"),
                   SETTINGS)
    clock.now = t0 + 0.5
    # B learns the failure, and its turn is login_delay after A's check ended, in both
    # the address's lane and the user's.
    assert await b.enter(ADDRESS, alice, "t2", SETTINGS) == Verdict(False, 1, 1, 1.5, 2)
    # The next one from elsewhere queues behind it in the user's lane only.
    assert await a.enter(OTHER, alice, "t3", SETTINGS) == Verdict(False, 0, 1, 3.5, 1)
    # A guess that leaves gives its turn back: the next one gets it.
    assert (await b.enter("203.0.113.5", alice, "t4", SETTINGS)).wait == 5.5  # type: ignore[union-attr]
    await b.leave("203.0.113.5", alice, "t4")
    assert (await b.enter("203.0.113.5", alice, "t5", SETTINGS)).wait == 5.5  # type: ignore[union-attr]
    # Nothing in clear in Redis: no name, no password.
    dump = server.cli("KEYS", "p1:*") + "".join(
        server.cli("HGETALL", k) for k in server.cli("KEYS", "p1:*").split())
    assert "alice" not in dump and "guess1" not in dump


@pytest_twisted.ensureDeferred
async def test_one_check_at_a_time_each_the_penalty_after_the_last_one_ended(
        server: RedisServer) -> None:
    """A turn that comes while the check before it runs (on another instance) waits for
    its end, then for the penalty from there: as one process's queue does."""
    clock = Clock()
    t0 = clock.now
    a = await started(config(server.url, "p6:"), "A", clock)
    b = await started(config(server.url, "p6:"), "B", clock)
    erin = user_key(a.key, "erin")  # type: ignore[arg-type]
    await a.finish(ADDRESS, erin, "0", "failure", b"\x01" * 16, SETTINGS)  # next: t0 + 2
    clock.now = t0 + 0.5
    assert (await a.enter(ADDRESS, erin, "ta", SETTINGS)).wait == 1.5  # type: ignore[union-attr]
    assert (await b.enter(ADDRESS, erin, "tb", SETTINGS)).wait == 3.5  # type: ignore[union-attr]
    clock.now = t0 + 2
    assert await a.start(ADDRESS, erin, "ta") == 0.0, "its turn: it starts"
    clock.now = t0 + 4
    assert await b.start(ADDRESS, erin, "tb") == BUSY, "A's check has not ended"
    clock.now = t0 + 4.5  # A's check ends: a second failure, 4 s from now
    await a.finish(ADDRESS, erin, "ta", "failure", b"\x02" * 16, SETTINGS)
    clock.now = t0 + 4.6
    assert await b.start(ADDRESS, erin, "tb") == pytest.approx(3.9)
    clock.now = t0 + 8.5
    assert await b.start(ADDRESS, erin, "tb") == 0.0


@pytest_twisted.ensureDeferred
async def test_distinct_failures_double_the_delay_the_same_one_does_not(
        server: RedisServer) -> None:
    clock = Clock()
    t0 = clock.now
    a = await started(config(server.url, "p2:"), "A", clock)
    bob = user_key(a.key, "bob")  # type: ignore[arg-type]
    stale = fingerprint(a.key, "bob", b"old-password")  # type: ignore[arg-type]
    for i in range(3):  # a phone with a stale password, three times
        clock.now = t0 + 10 * i
        await a.finish(ADDRESS, bob, f"s{i}", "failure", stale, SETTINGS)
    clock.now = t0 + 20.5
    verdict = await a.enter(ADDRESS, bob, "x", SETTINGS)
    assert verdict == Verdict(False, 1, 1, 1.5, 2), "one failure, not three"
    await a.leave(ADDRESS, bob, "x")
    for i, guess in enumerate([b"g1", b"g2", b"g3", b"g4", b"g5"]):
        clock.now = t0 + 30 + i
        await a.finish(ADDRESS, bob, f"g{i}", "failure",
                       fingerprint(a.key, "bob", guess), SETTINGS)  # type: ignore[arg-type]
    # Six distinct failures: 2, 4, 8, then the cap of 15 s after the last one ended.
    clock.now = t0 + 34
    assert await a.enter(OTHER, bob, "y", SETTINGS) == Verdict(False, 0, 6, 15.0, 1)


@pytest_twisted.ensureDeferred
async def test_a_success_clears_the_users_failures_and_makes_the_address_known(
        server: RedisServer) -> None:
    clock = Clock()
    a = await started(config(server.url, "p3:"), "A", clock)
    b = await started(config(server.url, "p3:"), "B", clock)
    carol = user_key(a.key, "carol")  # type: ignore[arg-type]
    dave = user_key(a.key, "dave")  # type: ignore[arg-type]
    await a.finish(ADDRESS, carol, "1", "failure", b"\x01" * 16, SETTINGS)
    await a.finish(ADDRESS, dave, "2", "failure", b"\x02" * 16, SETTINGS)
    await a.finish(ADDRESS, carol, "3", "success", b"", SETTINGS)
    # Carol's failure is forgotten, dave's stays; carol is known at the address, so her
    # next login there (on any instance) waits in no lane, though the address has one.
    assert await b.enter(ADDRESS, carol, "4", SETTINGS) == Verdict(True, 1, 0, 0.0, 0)
    verdict = await b.enter(ADDRESS, dave, "5", SETTINGS)
    assert isinstance(verdict, Verdict) and verdict.turns == 2 and verdict.wait == 2.0
    # From elsewhere carol is not known.
    assert await b.enter(OTHER, carol, "6", SETTINGS) == Verdict(False, 0, 0, 0.0, 0)


@pytest_twisted.ensureDeferred
async def test_full_lanes_refuse_as_the_local_queues_do(server: RedisServer) -> None:
    clock = Clock()
    a = await started(config(server.url, "p4:"), "A", clock)
    erin = user_key(a.key, "erin")  # type: ignore[arg-type]
    await a.finish(ADDRESS, erin, "0", "failure", b"\x01" * 16, SETTINGS)
    for i in range(4):  # MAX_WAITING_USER turns from four fresh addresses
        verdict = await a.enter(f"203.0.113.{i}", erin, f"u{i}", SETTINGS)
        assert isinstance(verdict, Verdict) and verdict.turns == 1
    assert await a.enter("203.0.113.9", erin, "u9", SETTINGS) == Refused(
        "too many login attempts waiting for this user")
    for i in range(16):  # MAX_WAITING for the address (other users, no failures of theirs)
        verdict = await a.enter(ADDRESS, user_key(a.key, f"mate{i}"), f"a{i}",  # type: ignore[arg-type]
                                SETTINGS)
        assert isinstance(verdict, Verdict) and verdict.turns == 1
    assert await a.enter(ADDRESS, user_key(a.key, "mate99"), "a99", SETTINGS) == Refused(  # type: ignore[arg-type]
        "too many login attempts waiting for this address")


@pytest_twisted.ensureDeferred
async def test_failures_are_forgotten_and_dead_turns_let_go(server: RedisServer) -> None:
    clock = Clock()
    t0 = clock.now
    a = await started(config(server.url, "p5:"), "A", clock)
    frank = user_key(a.key, "frank")  # type: ignore[arg-type]
    await a.finish(ADDRESS, frank, "0", "failure", b"\x01" * 16, SETTINGS)
    clock.now = t0 + 1
    first = await a.enter(ADDRESS, frank, "1", SETTINGS)
    assert isinstance(first, Verdict) and first.wait == 1.0
    # Its instance died before the end of its check: its turn holds the lanes for LEASE.
    clock.now = t0 + 2 + LEASE + 1
    assert await a.enter(OTHER, frank, "2", SETTINGS) == Verdict(False, 0, 1, 0.0, 1)
    clock.now = t0 + SETTINGS.memory + 1
    assert await a.enter(ADDRESS, frank, "3", SETTINGS) == Verdict(False, 0, 0, 0.0, 0)
    assert "f:" not in server.cli("HGETALL", "p5:a:" + ADDRESS), "expired failures go"


# -- the session counts ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sessions_of_a_user_and_address_are_counted_over_instances(
        server: RedisServer) -> None:
    clock = Clock()
    t0 = clock.now
    a = await started(config(server.url, "s1:"), "A", clock)
    b_clock = Clock(t0)
    b = await started(config(server.url, "s1:"), "B", b_clock)
    claims = [await a.claim("Alice", ADDRESS, 3), await a.claim("alice", ADDRESS, 3),
              await b.claim("ALICE", ADDRESS, 3)]
    assert all(c is not None for c in claims)
    assert await b.claim("alice", ADDRESS, 3) is None, "the fourth, on either instance"
    assert await a.claim("alice", OTHER, 3) is not None, "another address counts apart"
    await a.release(claims[0])  # type: ignore[arg-type]
    assert await b.claim("alice", ADDRESS, 3) is not None
    counts = NAMES(a, "alice", ADDRESS)
    assert (hget(server, counts, "A"), hget(server, counts, "B")) == ("1", "2")
    # A goes silent (crashed): once its heartbeat is INSTANCE_TTL old, its sessions stop
    # counting, and B's heartbeat clears them.
    b_clock.now = t0 + 30
    assert await b.claim("alice", ADDRESS, 3) is not None
    await b.heartbeat()
    assert hget(server, counts, "A") == ""
    # A comes back: told it was taken for dead, it writes its counts whole again.
    clock.now = t0 + 31
    assert await a.claim("bob", ADDRESS, 3) is not None
    await until(lambda: hget(server, counts, "A") == "1", "A's count written again")
    # A clean stop takes its counts away at once.
    await a.stopService()
    assert hget(server, counts, "A") == "" and hget(server, counts, "B") == "3"


def NAMES(state: RedisState, user: str, client: str) -> str:  # noqa: N802
    assert state.key is not None
    return f"{state.config.prefix}s:{user_key(state.key, user).hex()}:{client}"


@pytest_twisted.ensureDeferred
async def test_the_hashing_key_is_shared_through_redis_without_a_key_file(
        server: RedisServer) -> None:
    a = await started(config(server.url, "k1:", key=None), "A")
    b = await started(config(server.url, "k1:", key=None), "B")
    assert a.key == b.key and a.key is not None
    assert server.cli("GET", "k1:key").strip() == a.key.hex()
    c = await started(config(server.url, "k2:"), "C")
    assert server.cli("EXISTS", "k2:key").strip() == "0", "a key_file's key stays out"
    assert c.key != a.key


# -- Redis away, slow, back -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_away_counts_locally_says_so_once_and_comes_back(
        own_server: RedisServer, log: Log) -> None:
    metrics = Metrics()
    state = RedisState(reactor, config(own_server.url, "f:", timeout=0.2), metrics,
                       instance="A", retry_after=0.3)
    state.startService()
    _started.append(state)
    await until(lambda: state.up and state.key is not None, "up")
    alice = user_key(state.key, "alice")  # type: ignore[arg-type]
    held = await state.claim("alice", ADDRESS, 5)
    assert held is not None and held.counted
    own_server.stop()
    # Each login is answered: counted locally (None), as are the sessions.
    assert await state.enter(ADDRESS, alice, "1", SETTINGS) is None
    assert await state.enter(ADDRESS, alice, "2", SETTINGS) is None
    local = await state.claim("alice", ADDRESS, 5)
    assert local is not None and not local.counted
    assert log.count("shared state unavailable, counting locally") == 1
    line = next(line for line in log.lines() if "counting locally" in line)
    assert f"redis://127.0.0.1:{own_server.port}/0" in line
    sample = metrics.registry.get_sample_value
    assert sample("imapproxy_shared_state_fallbacks_total", {"what": "penalty"}) == 2
    assert sample("imapproxy_shared_state_fallbacks_total", {"what": "sessions"}) == 1
    assert sample("imapproxy_shared_state_up") == 0
    # Back (empty: it keeps nothing); a login or the heartbeat finds it again.
    own_server.start()
    give_up = time.monotonic() + 15
    while await state.enter(ADDRESS, alice, "3", SETTINGS) is None:  # logins find it
        assert time.monotonic() < give_up, "never back"
        await sleep(0.05)
    assert state.up
    assert log.count("shared state available again") == 1
    assert sample("imapproxy_shared_state_up") == 1
    # Its sessions, the one counted locally included, are written whole.
    await until(lambda: hget(own_server, NAMES(state, "alice", ADDRESS), "A") == "2",
                "counts written again")
    assert isinstance(await state.enter(ADDRESS, alice, "4", SETTINGS), Verdict)
    assert log.count("shared state unavailable") == 1


@pytest_twisted.ensureDeferred
async def test_a_slow_redis_costs_a_login_the_timeout_at_most(own_server: RedisServer,
                                                              log: Log) -> None:
    state = await started(config(own_server.url, "slow:", timeout=0.2), "A",
                          retry_after=60)
    alice = user_key(state.key, "alice")  # type: ignore[arg-type]
    own_server.pause()  # accepts, answers nothing
    try:
        started_at = time.monotonic()
        assert await state.enter(ADDRESS, alice, "1", SETTINGS) is None
        took = time.monotonic() - started_at
        started_at = time.monotonic()
        # Down now: the next ones do not ask (until retry_after), so they cost nothing.
        assert await state.enter(ADDRESS, alice, "2", SETTINGS) is None
        claim = await state.claim("alice", ADDRESS, 5)
        assert claim is not None and not claim.counted
        assert time.monotonic() - started_at < 5, "a guard against hanging, not a timing"
        assert took < 5
        print(f"\nFIGURE: a login's wait on a Redis that answers nothing: {took:.3f} s "
              "(timeout 0.2 s); the next ones: none")
        assert log.count("shared state unavailable, counting locally: no answer within "
                         "0.2 s") == 1
    finally:
        own_server.resume()


@pytest_twisted.ensureDeferred
async def test_busy_threads_cost_a_login_the_timeout_at_most_and_late_calls_are_dropped(
        server: RedisServer, log: Log) -> None:
    """Every thread busy (here: the one of the session counts, held by a sleep): the
    reactor side gives up at the timeout, and the call, when a thread is free at last,
    is not run."""
    state = await started(config(server.url, "busy:", timeout=0.2), "A", retry_after=0.1)
    link = state._link
    assert link is not None
    link.sessions_pool.callInThread(time.sleep, 0.6)
    claim = await state.claim("alice", ADDRESS, 5)
    assert claim is not None and not claim.counted, "counted locally"
    assert log.count("no answer within 0.2 s") == 1
    await sleep(0.8)  # the thread is free: the late CLAIM was dropped, not run
    # (The next heartbeat, 5 s after the first, is still to come.)
    assert hget(server, NAMES(state, "alice", ADDRESS), "A") == ""
    await until(lambda: hget(server, NAMES(state, "alice", ADDRESS), "A") == "1",
                "written whole once Redis answers again (the heartbeat)")


# -- connecting ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_password_and_a_wrong_one(tmp_path: Path, log: Log) -> None:
    with RedisServer(tmp_path / "redis", password="Pa55-word-xyz") as guarded:
        state = await started(config(guarded.url, "pw:"), "A")
        assert isinstance(await state.enter(ADDRESS, b"\x01" * 16, "1", SETTINGS), Verdict)
        wrong = RedisState(reactor, config(guarded.url.replace("Pa55", "Fa11"), "pw:"),
                           instance="B")
        wrong.startService()
        _started.append(wrong)
        await until(lambda: log.count("counting locally") == 1, "the failure said")
        assert "Fa11-word-xyz" not in "\n".join(log.lines())
        assert "Pa55-word-xyz" not in "\n".join(log.lines())
        assert "***" in next(line for line in log.lines() if "counting locally" in line)


@pytest_twisted.ensureDeferred
async def test_tls(tmp_path: Path, test_ca: TestCA, server_cert: CertPair, log: Log) -> None:
    with RedisServer(tmp_path / "redis", cert=server_cert) as tls_server:
        assert tls_server.url.startswith("rediss://localhost:")
        state = await started(config(tls_server.url, "tls:", ca_file=test_ca.ca_path), "A")
        assert isinstance(await state.enter(ADDRESS, b"\x01" * 16, "1", SETTINGS), Verdict)
        # Without the CA, the certificate is not trusted: counted locally.
        untrusted = RedisState(reactor, config(tls_server.url, "tls:"), instance="B")
        untrusted.startService()
        _started.append(untrusted)
        await until(lambda: log.count("counting locally") == 1, "the failure said")
        assert "certificate" in next(line for line in log.lines() if "locally" in line).lower()


@pytest_twisted.ensureDeferred
async def test_a_unix_socket(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", unix=True) as local:
        state = await started(config(f"unix://{local.socket_path}?db=2", "ux:"), "A")
        assert await state.claim("alice", ADDRESS, 1) is not None
        assert await state.claim("alice", ADDRESS, 1) is None


@pytest_twisted.ensureDeferred
async def test_reconfigure_moves_the_counts_and_turning_off_stops(server: RedisServer,
                                                                  log: Log) -> None:
    state = await started(config(server.url, "r1:"), "A")
    assert await state.claim("alice", ADDRESS, 5) is not None
    old = NAMES(state, "alice", ADDRESS)
    assert hget(server, old, "A") == "1"
    state.reconfigure(config(server.url, "r2:"))
    await until(lambda: state.key is not None, "the key", 10)
    await until(lambda: hget(server, NAMES(state, "alice", ADDRESS), "A") == "1", "moved")
    assert hget(server, old, "A") == "", "gone from the old place"
    assert log.count(f"shared state through redis://127.0.0.1:{server.port}/0, this "
                     "instance A") == 2, "at the start, and again"
    state.reconfigure(SharedConfig())
    assert not state.enabled and state.key is None
    assert log.count("shared state: off") == 1
    await until(lambda: hget(server, NAMES_WITH(state, "r2:", "alice"), "A") == "", "gone")


def NAMES_WITH(state: RedisState, prefix: str, user: str) -> str:  # noqa: N802
    key = state._file_key(config("redis://h", prefix))
    assert key is not None
    return f"{prefix}s:{user_key(key, user).hex()}:{ADDRESS}"

"""Two proxy instances sharing one redis-server ([shared] redis) in front of one Dovecot:
the brute-force penalty and the per-user+address session limit hold across them, and a
Redis that goes away costs logins nothing but the sharing, until it comes back.

Everything real: two ``twistd imapproxy`` processes, Debian's redis-server and Dovecot,
on 127.0.0.0/8.
"""

from __future__ import annotations

import re
import socket
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port, free_port_pair
from rig.proxy import ProxyProcess, imap_config
from rig.redis import RedisServer

HOST = "127.0.0.1"
USERS = [MailUser("victim", "the-right-one", 4601), MailUser("owner", "owner-pw", 4602),
         MailUser("phone", "phone-pw", 4603)]
#: a small penalty, so that waiting for it costs the test little
DELAY = 0.8


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    dovecot = Dovecot(tmp_path_factory.mktemp("shared-dovecot"), USERS, name="shared")
    dovecot.start()
    yield dovecot
    dovecot.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("shared-redis")) as server:
        yield server


def config(port: int, metrics: int, redis_url: str, *, prefix: str, per_user_ip: int = 100,
           top: str = "") -> str:
    extra = (f"[limits]\nlogin_delay = {DELAY}\nlogin_delay_max = {DELAY}\n"
             f"max_connections_per_user_ip = {per_user_ip}\npreauth_timeout = 60\n\n"
             f'[shared]\nredis = "{redis_url}"\ntimeout = 0.25\nprefix = "{prefix}"\n\n'
             f'[metrics]\naddress = "127.0.0.1:{metrics}"\n')
    return imap_config(port, top=top, extra=extra)


class Pair:
    """Instances A and B of the proxy: ``make(name, port, metrics port)`` their configs."""

    def __init__(self, folder: Path, backend: Dovecot,
                 make: Callable[[str, int, int], str]) -> None:
        self.proxies: list[ProxyProcess] = []
        self.metrics: list[int] = []
        for name in ("a", "b"):
            # A pair: with workers, worker 1's metrics are on the next port.
            port, metrics = free_port(), free_port_pair()
            self.metrics.append(metrics)
            self.proxies.append(ProxyProcess(
                folder / name, make(name, port, metrics), [port],
                {"users.map": f"*  127.0.0.1:{backend.imap_port}\n"}))

    def start(self) -> Pair:
        for proxy in self.proxies:
            proxy.start()
        # Both reached Redis and know the shared hashing key before logins come.
        for metrics in self.metrics:
            wait_for(lambda m=metrics: metric(m, "imapproxy_shared_state_up") == 1, "up")
        return self

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()

    @property
    def a(self) -> ProxyProcess:
        return self.proxies[0]

    @property
    def b(self) -> ProxyProcess:
        return self.proxies[1]


@pytest.fixture
def pairs(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(backend: Dovecot, build: Callable[[str, int, int], str]) -> Pair:
        pair = Pair(tmp_path, backend, build)
        made.append(pair)
        return pair.start()

    yield make
    for pair in made:
        pair.stop()


def wait_for(condition: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"never: {what}"
        time.sleep(0.05)


class Client:
    """One IMAP connection from a chosen source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=60,
                                             source_address=(source, 0))
        self.buffer = b""
        self.line()  # the greeting

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, tag: bytes, text: bytes) -> bytes:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return line

    def login(self, user: str, password: str) -> bytes:
        return self.command(b"a", f'LOGIN {user} "{password}"'.encode())

    def close(self) -> None:
        self.sock.close()


def login(port: int, source: str, user: str, password: str) -> tuple[bytes, float, float]:
    """One LOGIN on a fresh connection: the reply, and when it was sent and answered."""
    client = Client(port, source)
    try:
        sent = time.monotonic()
        reply = client.login(user, password)
        return reply, sent, time.monotonic()
    finally:
        client.close()


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") \
        + r" ([0-9.e+-]+)$"
    found = re.search(pattern.encode(), text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def delayed(proxy: ProxyProcess, source: str, user: str) -> list[float]:
    return [float(w) for w in re.findall(
        rf"login delayed id=\S+ client={re.escape(source)} user=<{user}> waited=([0-9.]+)s",
        proxy.log())]


# -- the penalty ------------------------------------------------------------------------


def test_a_failure_on_one_instance_holds_back_the_next_guess_on_the_other(
        backend: Dovecot, redis: RedisServer, pairs: Callable[..., Pair]) -> None:
    pair = pairs(backend, lambda _name, port, metrics: config(port, metrics, redis.url,
                                                             prefix="p1:"))
    source = "127.0.0.50"
    reply, _sent, _answered = login(pair.a.port, source, "victim", "guess-1")
    assert b"a NO" in reply
    # The right password, on the other instance: it waits for the penalty A learnt.
    reply, sent, answered = login(pair.b.port, source, "victim", "the-right-one")
    assert reply.startswith(b"a OK"), reply
    waited = delayed(pair.b, source, "victim")
    assert waited and waited[0] >= DELAY / 2, pair.b.log()[-2000:]
    print(f"\nFIGURE: after a failure on A, B held the next login {waited[0]:.3f} s "
          f"(login_delay {DELAY} s); answered in {answered - sent:.3f} s")


def test_guesses_spread_over_both_instances_are_checked_one_after_the_other(
        backend: Dovecot, redis: RedisServer, pairs: Callable[..., Pair]) -> None:
    pair = pairs(backend, lambda _name, port, metrics: config(port, metrics, redis.url,
                                                             prefix="p2:"))
    source = "127.0.0.51"
    assert b"a NO" in login(pair.a.port, source, "victim", "guess-0")[0]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(login, proxy.port, source, "victim", f"guess-{i}")
                   for i, proxy in enumerate(pair.proxies * 3, start=1)]
        replies = [f.result() for f in futures]
    # The user's lane holds 4 turns at most (on both instances together): the others
    # are told to come back later, unchecked.
    refused = [r for r, _s, _a in replies if b"[UNAVAILABLE]" in r]
    checked = sorted(answered for r, _s, answered in replies if b"[AUTHENTICATIONFAILED]" in r)
    assert len(refused) >= 2 and len(checked) <= 4, replies
    # Checked one at a time, whichever instance had them, each login_delay after the
    # previous check ended (a failed check takes Dovecot 0.5 s): where two instances
    # counting alone would check two at once.
    gaps = [b - a for a, b in zip(checked, checked[1:], strict=False)]
    assert all(gap >= DELAY for gap in gaps), gaps
    print(f"\nFIGURE: 6 parallel guesses over 2 instances: {len(checked)} checked, "
          f"{len(refused)} refused; gaps between answers "
          f"{', '.join(f'{g:.2f}' for g in gaps)} s (login_delay {DELAY} s)")


# -- the session counts -------------------------------------------------------------------


def test_the_per_user_address_limit_counts_the_sessions_of_both_instances(
        backend: Dovecot, redis: RedisServer, pairs: Callable[..., Pair]) -> None:
    """B runs two workers: each counts its own sessions in Redis too."""
    pair = pairs(backend, lambda name, port, metrics: config(
        port, metrics, redis.url, prefix="s1:", per_user_ip=3,
        top="workers = 2\n" if name == "b" else ""))
    source = "127.0.0.60"
    held = []
    try:
        for proxy in (pair.a, pair.b, pair.a):
            client = Client(proxy.port, source)
            assert client.login("phone", "phone-pw").startswith(b"a OK")
            held.append(client)
        for proxy in pair.proxies:
            reply = login(proxy.port, source, "phone", "phone-pw")[0]
            assert b"Too many connections for this user from this address" in reply, reply
        # Another address, another user: not counted together.
        assert login(pair.b.port, "127.0.0.61", "phone", "phone-pw")[0].startswith(b"a OK")
        assert login(pair.b.port, source, "owner", "owner-pw")[0].startswith(b"a OK")
        # One leaves A: B may take one more.
        held.pop(0).command(b"z", b"LOGOUT")
        wait_for(lambda: login(pair.b.port, source, "phone", "phone-pw")[0]
                 .startswith(b"a OK"), "a place freed on A counts on B")
    finally:
        for client in held:
            client.close()
    assert "shared state unavailable" not in pair.a.log() + pair.b.log()


# -- Redis away and back ------------------------------------------------------------------


def test_redis_away_logins_go_on_said_once_counted_and_shared_again_when_back(
        backend: Dovecot, tmp_path: Path, pairs: Callable[..., Pair]) -> None:
    own = RedisServer(tmp_path / "redis").start()
    try:
        pair = pairs(backend, lambda _name, port, metrics: config(port, metrics, own.url,
                                                                 prefix="f:"))
        metrics_a = pair.metrics[0]
        wait_for(lambda: metric(metrics_a, "imapproxy_shared_state_up") == 1, "A up")
        shared = [login(pair.a.port, "127.0.0.70", "owner", "owner-pw") for _ in range(20)]
        own.stop()
        down = [login(pair.a.port, "127.0.0.70", "owner", "owner-pw") for _ in range(20)]
        assert all(r.startswith(b"a OK") for r, _s, _a in down)
        log_a = pair.a.log()
        assert log_a.count("shared state unavailable, counting locally") == 1, log_a
        assert "Connection refused" in log_a
        assert metric(metrics_a, "imapproxy_shared_state_fallbacks_total", what="penalty") >= 19
        assert metric(metrics_a, "imapproxy_shared_state_fallbacks_total",
                      what="sessions") >= 19
        assert metric(metrics_a, "imapproxy_shared_state_up") == 0
        # Back (empty: it keeps nothing), A finds it (B, idle, may never have missed it).
        own.start()
        wait_for(lambda: "shared state available again" in pair.a.log(), "A finds it back")
        # Slow rather than away: it accepts and answers nothing.
        own.pause()
        try:
            slow = [login(pair.a.port, "127.0.0.71", "owner", "owner-pw") for _ in range(20)]
        finally:
            own.resume()
        assert all(r.startswith(b"a OK") for r, _s, _a in slow)
        wait_for(lambda: pair.a.log().count("shared state available again") == 2, "back")
        # Shared again: a failure on A holds back B.
        assert b"a NO" in login(pair.a.port, "127.0.0.72", "victim", "nope")[0]
        assert login(pair.b.port, "127.0.0.72", "victim", "the-right-one")[0].startswith(b"a OK")
        assert delayed(pair.b, "127.0.0.72", "victim"), pair.b.log()[-2000:]
        times = {name: statistics.median(a - s for _r, s, a in runs) * 1000
                 for name, runs in (("shared", shared), ("redis stopped", down),
                                    ("redis unresponsive", slow))}
        worst = max(a - s for _r, s, a in slow) * 1000
        print("\nFIGURE: login time, median of 20: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in times.items())
            + f"; unresponsive, the worst: {worst:.0f} ms (timeout 250 ms)")
    finally:
        own.stop()

"""Reconnect storms (issue 17, part 4): admission pacing in front of the rig's Dovecot.

Many clients log in at once through a proxy with ``[limits] max_login_rate``: the
ones that fit in the queue all get in, none times out, the logins reach Dovecot at
about the rate, the ones over the queue's bound are told to come back later
(``NO [UNAVAILABLE]``, ``-ERR [SYS/TEMP]``), and the metrics show the line. Timings
are asserted loosely (lower bounds with slack, generous deadlines): the machine is
shared.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rig.imapraw import RawImap
from rig.ports import free_port

HOST = "127.0.0.1"
#: the storm's clients, its rate and the queue's bound
STORM = 90
RATE = 20
QUEUE = 40
#: a login waits at most this long in the test (the proxy's preauth_timeout is 60 s)
DEADLINE = 30.0
REFUSED_IMAP = b"NO [UNAVAILABLE] Too many logins at once, try again later"
REFUSED_POP3 = b"-ERR [SYS/TEMP] Too many logins at once, try again later"


def config(imap: int, pop3: int, metrics: int, *, rate: float, queue: int,
           preauth_timeout: float = 60.0) -> str:
    # The map names no port: [backend] gives each protocol's.
    return f"""
[[listen]]
protocol = "imap"
address = "{HOST}:{imap}"
tls = "none"

[[listen]]
protocol = "pop3"
address = "{HOST}:{pop3}"
tls = "none"

[tls]
plaintext_auth = true

[directory]
type = "static"
map = "users.map"

[backend]
imap_port = {{imap_port}}
pop3_port = {{pop3_port}}

[metrics]
address = "{HOST}:{metrics}"

[log]
format = "json"

[limits]
login_delay = 0.01
login_delay_max = 0.05
max_connections_per_user_ip = 1000
preauth_timeout = {preauth_timeout}
max_login_rate = {rate}
max_login_queue = {queue}
"""


def start(start_proxy: Callable[..., Any], store: Any, **settings: Any) -> tuple[Any, int,
                                                                                   int, int]:
    imap, pop3, metrics = free_port(), free_port(), free_port()
    text = config(imap, pop3, metrics, **settings).replace(
        "{imap_port}", str(store.imap_port)).replace("{pop3_port}", str(store.pop3_port))
    proxy = start_proxy(text, [imap, pop3, metrics], {"users.map": f"*  {HOST}\n"})
    return proxy, imap, pop3, metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def events(proxy: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def warm_up(port: int, mail_users: list[Any]) -> None:
    """Each user logs in once from here first: a phone coming back is known at its
    address, so the penalty lets its logins through at once (penalty.py), and the
    storm meets the pacer as it would in production."""
    for user in mail_users:
        raw = RawImap(HOST, port)
        assert raw.command(b"w", b"LOGIN " + user.name.encode() + b" {%d+}\r\n"
                           % len(user.password.encode()) + user.password.encode()
                           )[-1].startswith(b"w OK")
        raw.command(b"z", b"LOGOUT")
        raw.close()


class Watcher(threading.Thread):
    """Scrapes the metrics while the storm lasts: the most logins seen waiting."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.most = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.most = max(self.most, metric(scrape(self.port), "imapproxy_logins_waiting"))
            time.sleep(0.02)


def storm(count: int, connect: Callable[[], Any], log_in: Callable[[Any, int], bytes],
          ) -> tuple[list[tuple[bytes, float]], float]:
    """``count`` clients connected first, then all logging in at once (a barrier); each
    result is (the reply to the login, when it came); and when the barrier fell."""
    clients = [connect() for _ in range(count)]
    barrier = threading.Barrier(count + 1)
    results: list[Any] = [None] * count

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = (log_in(clients[i], i), time.monotonic())
        except OSError as e:  # a timeout or a closed connection: what must not happen
            results[i] = (repr(e).encode(), time.monotonic())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    released = time.monotonic()
    for thread in threads:
        thread.join(DEADLINE)
    for c in clients:
        c.close()
    return results, released


def test_an_imap_storm_is_served_at_the_rate_and_what_does_not_fit_is_refused(
        store1, mail_users, start_proxy) -> None:
    proxy, imap, _pop3, metrics = start(start_proxy, store1, rate=RATE, queue=QUEUE)
    warm_up(imap, mail_users)
    time.sleep(1.0)  # the bucket (one second's worth) fills again
    watcher = Watcher(metrics)
    watcher.start()

    def log_in(raw: RawImap, i: int) -> bytes:
        user = mail_users[i % len(mail_users)]
        password = user.password.encode()
        reply = raw.command(b"a", b"LOGIN " + user.name.encode() + b" {%d+}\r\n"
                            % len(password) + password)[-1]
        if reply.startswith(b"a OK"):
            raw.command(b"z", b"LOGOUT")
        return reply

    results, released = storm(STORM, lambda: RawImap(HOST, imap, timeout=DEADLINE), log_in)
    watcher.done.set()
    watcher.join()
    replies = [reply for reply, _when in results]
    ok = [when for reply, when in results if reply.startswith(b"a OK")]
    refused = [reply for reply in replies if reply.startswith(b"a " + REFUSED_IMAP)]
    assert len(ok) + len(refused) == STORM, [r for r in replies if not (
        r.startswith(b"a OK") or r.startswith(b"a " + REFUSED_IMAP))]
    # Everyone that fitted got in (one second's worth at once, then the queue), none
    # timed out; the rest were told at once to come back later.
    assert len(ok) >= RATE + QUEUE, len(ok)
    assert refused, "90 at once must overflow a bucket of 20 and a queue of 40"
    # At the rate: the last login came no sooner than its turn (loosely: 80 %).
    assert max(ok) - released >= 0.8 * (len(ok) - RATE) / RATE, (max(ok) - released, len(ok))
    # What Dovecot saw, from the proxy's login lines (JSON, to the millisecond): never
    # the whole storm at once; in any half second at most the burst and half a second's
    # worth, and some slack for the backend's own jitter (unpaced, all 60 and more
    # come within half a second).
    stamps = sorted(datetime.fromisoformat(e["time"]).timestamp() for e in events(proxy)
                    if e["text"].startswith("login id="))[len(mail_users):]
    assert len(stamps) == len(ok)
    busiest = max(sum(1 for t in stamps if start <= t < start + 0.5) for start in stamps)
    assert busiest <= RATE + RATE * 0.5 + 8, busiest
    assert stamps[-1] - stamps[0] >= 0.8 * (len(ok) - RATE) / RATE
    texts = [e["text"] for e in events(proxy)]
    assert sum(t.startswith("login paced id=") for t in texts) >= QUEUE
    assert sum(t.startswith("login refused id=") and t.endswith(
        "reason=too many logins waiting for their turn") for t in texts) == len(refused)
    # The metrics showed the line, and count what it did.
    assert watcher.most >= 1
    found = scrape(metrics)
    assert metric(found, "imapproxy_logins_waiting") == 0
    assert metric(found, "imapproxy_refused_total", limit="login_queue") == len(refused)
    assert metric(found, "imapproxy_logins_paced_total") >= QUEUE
    assert metric(found, "imapproxy_login_wait_seconds_count") == len(ok) + len(mail_users)
    assert metric(found, "imapproxy_logins_total", protocol="imap", result="ok",
                  reason="") == len(ok) + len(mail_users)


def test_a_pop3_storm_too(store1, mail_users, start_proxy) -> None:
    proxy, imap, pop3, metrics = start(start_proxy, store1, rate=5, queue=3)
    warm_up(imap, mail_users)  # the penalty does not care which protocol logged in
    time.sleep(1.0)

    def connect() -> socket.socket:
        sock = socket.create_connection((HOST, pop3), timeout=DEADLINE)
        assert sock.makefile("rb").readline().startswith(b"+OK")
        return sock

    def log_in(sock: socket.socket, i: int) -> bytes:
        user = mail_users[i % len(mail_users)]
        lines = sock.makefile("rb")
        sock.sendall(b"USER " + user.name.encode() + b"\r\n")
        assert lines.readline().startswith(b"+OK")
        sock.sendall(b"PASS " + user.password.encode() + b"\r\n")
        reply = lines.readline()
        if reply.startswith(b"+OK"):
            sock.sendall(b"QUIT\r\n")
            lines.readline()
        return reply

    results, _released = storm(15, connect, log_in)
    replies = [reply for reply, _when in results]
    ok = [r for r in replies if r.startswith(b"+OK")]
    refused = [r for r in replies if r.startswith(REFUSED_POP3)]
    assert len(ok) + len(refused) == 15, replies
    assert len(ok) >= 5 + 3 and refused
    assert metric(scrape(metrics), "imapproxy_refused_total",
                  limit="login_queue") == len(refused)


def test_a_queued_login_whose_preauth_time_runs_out_is_told_so_and_leaves_the_line(
        store1, mail_users, start_proxy) -> None:
    """The pre-login timeout bounds the wait: the session never hangs in the line."""
    proxy, imap, _pop3, metrics = start(start_proxy, store1, rate=0.25, queue=5,
                                        preauth_timeout=6.0)
    alice = mail_users[0]
    login = b"LOGIN " + alice.name.encode() + b" " + alice.password.encode()
    first, second, third = (RawImap(HOST, imap, timeout=DEADLINE) for _ in range(3))
    began = time.monotonic()
    assert first.command(b"a", login)[-1].startswith(b"a OK")  # the one turn at once
    second.send(b"a " + login + b"\r\n")  # its turn in 4 s: inside its 6 s
    third.send(b"a " + login + b"\r\n")  # its turn in 8 s: after them
    assert second.until_tagged(b"a")[-1].startswith(b"a OK")
    assert third.readline() == b"* BYE Autologout; idle for too long\r\n"
    assert third.at_eof()
    assert 5.0 <= time.monotonic() - began < DEADLINE
    assert metric(scrape(metrics), "imapproxy_logins_waiting") == 0
    for raw in (first, second, third):
        raw.close()

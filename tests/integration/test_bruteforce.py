"""The brute-force penalty against the real proxy and a real Dovecot, as an attacker meets it.

What reaches the backend is counted in Dovecot's own log (auth_verbose: one line per
password it checked), not in ours.
"""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import ProxyProcess, imap_config

HOST = "127.0.0.1"
USERS = [MailUser("victim", "the-right-one", 4501), MailUser("other", "other-pw", 4502),
         *(MailUser(f"mate{i}", f"mate{i}-pw", 4510 + i) for i in range(6))]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    dovecot = Dovecot(tmp_path_factory.mktemp("penalty-dovecot"), USERS, name="penalty")
    dovecot.start()
    yield dovecot
    dovecot.close()


def limits(delay: float, cap: float, parallel: int = 4) -> str:
    return (f"[limits]\nlogin_delay = {delay}\nlogin_delay_max = {cap}\n"
            f"max_parallel_logins_per_ip = {parallel}\npreauth_timeout = 120\n"
            "max_connections_per_user_ip = 100\n")


def checked_by_dovecot(dovecot: Dovecot, user: str) -> int:
    """Passwords Dovecot checked for ``user`` so far (failed and right ones)."""
    text = dovecot.log_path.read_text(errors="replace")
    failed = len(re.findall(rf"passwd-file\({user},[^)]*\).*Password mismatch", text))
    return failed + len(re.findall(rf"Login: user=<{user}>", text))


def login(port: int, source: str, user: str, password: str) -> tuple[bytes, float]:
    """One LOGIN on a fresh connection from ``source``; the reply and when it came."""
    with socket.create_connection((HOST, port), timeout=120,
                                  source_address=(source, 0)) as sock:
        buffer = b""
        while b"\r\n" not in buffer:
            buffer += sock.recv(4096)
        sock.sendall(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
        buffer = b""
        while b"\r\na " not in b"\r\n" + buffer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buffer += chunk
        line = next((line for line in buffer.split(b"\r\n") if line.startswith(b"a ")), b"")
        return line, time.monotonic()


def test_150_guesses_in_parallel_reach_the_backend_a_few_at_a_time(backend, tmp_path):
    """The attack of issue 12: 150 guesses at once from one address, the right password
    among them. Before, all 150 reached Dovecot at once and the right one was answered
    at once; now a handful are checked, then one per penalty, in one queue (16 waiting
    at most: the rest are refused unchecked), and a right guess waits like the others."""
    port = free_port()
    # The default penalty (2 s, doubling to 15 s) for the first seconds that count; the
    # queue then drains at 2 s per check instead of 15 to keep the test short.
    proxy = ProxyProcess(tmp_path / "proxy", imap_config(port, extra=limits(2, 2)), [port],
                         {"users.map": f"*  127.0.0.1:{backend.imap_port}\n"}).start()
    try:
        before = checked_by_dovecot(backend, "victim")
        passwords = [f"guess-{i}" for i in range(150)]
        passwords[100] = "the-right-one"
        started = time.monotonic()
        with ThreadPoolExecutor(150) as pool:
            futures = [pool.submit(login, port, "127.0.0.20", "victim", pw)
                       for pw in passwords]
            time.sleep(3.0)
            reached_in_3s = checked_by_dovecot(backend, "victim") - before
            replies = [f.result() for f in futures]
        elapsed = time.monotonic() - started
        reached = checked_by_dovecot(backend, "victim") - before
        assert reached_in_3s <= 4 + 1, reached_in_3s
        refused = [r for r, _t in replies if b"[UNAVAILABLE]" in r]
        # Refused unchecked: over the address's queue (16) or the user's (4), whichever
        # filled first.
        assert len(refused) >= 150 - 4 - 16, len(refused)
        assert reached <= 4 + 16, reached
        right = replies[100][0]
        if right.startswith(b"a OK"):
            assert replies[100][1] - started >= 2, "a right guess waits like the others"
        print(f"\nFIGURE: 150 parallel guesses from one address: {reached_in_3s} reached "
              f"the backend in 3 s, {reached} in all ({elapsed:.1f} s); "
              f"{len(refused)} refused unchecked")
    finally:
        proxy.stop()


def test_the_owner_gets_in_from_elsewhere_during_an_attack(backend, tmp_path):
    port = free_port()
    proxy = ProxyProcess(tmp_path / "proxy", imap_config(port, extra=limits(2, 15)), [port],
                         {"users.map": f"*  127.0.0.1:{backend.imap_port}\n"}).start()
    try:
        # The owner's phone logged in from its usual address before.
        assert login(port, "127.0.0.30", "other", "other-pw")[0].startswith(b"a OK")
        with ThreadPoolExecutor(8) as pool:
            attack = [pool.submit(login, port, f"127.0.1.{i}", "other", f"guess-{i}")
                      for i in range(1, 9)]
            time.sleep(1.0)  # the attack is under way: the user has failures now
            started = time.monotonic()
            reply, answered = login(port, "127.0.0.30", "other", "other-pw")
            known_address = answered - started
            started = time.monotonic()
            reply_new, answered = login(port, "127.0.0.31", "other", "other-pw")
            new_address = answered - started
            for f in attack:
                f.result()
        assert reply.startswith(b"a OK"), reply
        assert known_address < 1.0, "known address: not held back at all"
        # From a new address it waits its turn behind the guesses (4 at most) or is told
        # to come back later: a guesser cannot be told from the owner there.
        assert reply_new.startswith(b"a OK") or b"[UNAVAILABLE]" in reply_new, reply_new
        print(f"\nFIGURE: owner during an attack on the account: in after "
              f"{known_address:.3f} s from a known address; from a new one "
              f"{reply_new[:24]!r} after {new_address:.1f} s")
        log = proxy.log()
        assert re.search(r"login id=\S+ client=127\.0\.0\.30 user=<other>", log)
    finally:
        proxy.stop()


def test_workers_share_one_penalty(backend, tmp_path):
    """workers = 2: a failure on one holds back the next logins from that address on
    both (the penalty lives in the main process; the other worker asks it)."""
    port = free_port()
    proxy = ProxyProcess(tmp_path / "proxy",
                         imap_config(port, top="workers = 2\n",
                                     extra=limits(0.6, 0.6, parallel=1)),
                         [port], {"users.map": f"*  127.0.0.1:{backend.imap_port}\n"}).start()
    try:
        deadline = time.monotonic() + 30
        while "worker 1 started" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # let worker 1 bind and reach the main process
        source = "127.0.0.40"
        for round_ in range(20):
            reply, _ = login(port, source, "victim", f"wrong-{round_}")
            assert b"NO" in reply
            mates = [login(port, source, f"mate{i}", f"mate{i}-pw") for i in range(6)]
            assert all(r.startswith(b"a OK") for r, _t in mates)
            delayed = re.findall(rf"\[imapproxy#info\] login delayed id=\S+ "
                                 rf"client={re.escape(source)} user=<mate\d> "
                                 r"waited=([0-9.]+)s", proxy.log())
            pids = set(re.findall(rf"login id=\S+ client={re.escape(source)} user=<mate\d> "
                                  r".* pid=(\d+)", proxy.log()))
            if len(pids) == 2:
                break
        assert len(pids) == 2, "logins came through both workers"
        waited = [float(w) for w in delayed]
        # Every mate's first login from there waited for the address's penalty, on
        # whichever worker it landed.
        assert len([w for w in waited if w >= 0.3]) >= 6, waited
        assert "counts on its own" not in proxy.log()
    finally:
        proxy.stop()

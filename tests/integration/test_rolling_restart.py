"""A rolling restart of two instances behind a real HAProxy loses no push (issue 17).

Phones hold IDLE through HAProxy (send-proxy-v2, ``option httpchk GET /readyz``),
spread over two instances. Instance A restarts (SIGTERM: a drain, /readyz 503, every
session ends with BYE): its phones come back through HAProxy to B and IDLE again.
Then B is killed outright (SIGKILL, no drain): its phones come back to A. Mail is
delivered all along; at the end every phone must have seen every message, as EXISTS in
IDLE or at its reconnect's SELECT, and a last message must reach each one as a push.
bench/rolling.py runs the same with 2,000 phones and reports the times.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from rig.certs import CertPair
from rig.dovecot import Dovecot, make_users
from rig.fleet import Fleet, Mailman, Phone
from rig.pool import Pool

HOST = "127.0.0.1"
PHONES = 40


@pytest.fixture(scope="module")
def phones_store(tmp_path_factory: pytest.TempPathFactory) -> Dovecot:
    users = make_users(PHONES, prefix="phone", first_uid=5000)
    store = Dovecot(tmp_path_factory.mktemp("phones"), users, name="phones",
                    max_sessions=4 * PHONES)
    store.start()
    yield store
    store.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "implicit-tls"])
def test_rolling_restart_then_a_crash_loses_no_push(phones_store: Dovecot, tmp_path: Path,
                                                    server_cert: CertPair,
                                                    client_tls: ssl.SSLContext, tls: bool
                                                    ) -> None:
    users = [u for u in phones_store.users.values()]
    phones = [Phone(u.name, u.password, source=f"127.0.0.{2 + i % 4}")
              for i, u in enumerate(users)]
    with Pool(tmp_path, phones_store.imap_port, cert=server_cert if tls else None) as pool, \
            Fleet(HOST, pool.port, phones, jitter=0.5, tls=client_tls if tls else None
                  ) as fleet:
        a, b = pool.instances
        fleet.start(60)
        on_a = pool.status()[a.name][1]
        assert on_a and pool.status()[b.name][1], "leastconn spread the phones over both"
        mailman = Mailman(phones_store, [u.name for u in users])
        with mailman:
            # A rolling restart: A drains, its phones go to B; then A comes back empty.
            started = time.monotonic()
            failed = sum(p.failed for p in phones)
            drain_seconds = pool.drain(a)
            fleet.wait(lambda: fleet.idling() == PHONES and sum(p.dropped for p in phones)
                       == on_a, "A's phones back in IDLE on B", 60)
            first_switch = time.monotonic() - started
            assert pool.status()[b.name][1] == PHONES, pool.status()
            assert drain_seconds < 15, "the drain ended well before its deadline"
            # [timeouts] drain_notice: HAProxy had A out of the pool before the drain, so
            # no phone was sent back to A on its way out.
            assert sum(p.failed for p in phones) == failed, [p.errors for p in phones]
            pool.bring_back(a)
            # Then a crash: B is killed without a drain; all its phones come back to A.
            dropped = sum(p.dropped for p in phones)
            killed = time.monotonic()
            pool.kill(b)
            fleet.wait(lambda: sum(p.dropped for p in phones) == dropped + PHONES
                       and fleet.all_idle_since(killed), "every phone back in IDLE on A", 60)
            assert pool.status()[a.name][1] == PHONES, pool.status()
        # Everything delivered during the switches was seen; and a last message reaches
        # every phone as a push, so each really is in IDLE on a live session.
        for user in users:
            mailman.deliver(user.name)
        expected = mailman.expected()
        fleet.wait(lambda: fleet.missed(expected) == 0, "every message seen", 60)
        assert fleet.missed(expected) == 0
        assert sum(expected.values()) > PHONES, "mail arrived during the switches too"
        assert all(p.errors == [] or p.failed for p in phones)
        # No session was refused for a limit, no traceback anywhere.
        for instance in (a, b):
            assert "Traceback" not in instance.process.log()
    print(f"first switch {first_switch:.2f}s (drain {drain_seconds:.2f}s)")

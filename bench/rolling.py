"""Issue 17's figures: a rolling restart and a crash under N phones holding IDLE.

    python bench/rolling.py                  # N = 2,000 phones, about 3 minutes
    python bench/rolling.py --phones 500

Two instances behind a real HAProxy (tests/rig/pool.py: send-proxy-v2, leastconn,
httpchk on /readyz), one Dovecot, N phones (tests/rig/fleet.py) in IDLE through
HAProxy, mail delivered all along. Steps and what is measured:

1. All N open (LOGIN, SELECT, IDLE) through HAProxy: seconds; each instance's memory
   per session.
2. Instance A restarts (SIGTERM: drain; then started again): seconds until every one of
   A's phones is back in IDLE on B, and how long the drain took.
3. Instance B is killed (SIGKILL, no drain): seconds until all N are back in IDLE on A
   (the reconnect storm: N logins at once), and the logins per second that makes.
4. A last message to every user: seconds until every phone saw it as a push; messages
   missed over the whole run (must be 0).

The result goes to stdout and, as JSON, to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import ssl
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from rig.certs import TestCA  # noqa: E402
from rig.dovecot import Dovecot, make_users  # noqa: E402
from rig.fleet import Fleet, Mailman, Phone  # noqa: E402
from rig.pool import Instance, Pool  # noqa: E402

from bench import procmem  # noqa: E402
from bench.run import cpu_seconds  # noqa: E402

HOST = "127.0.0.1"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def address(index: int) -> str:
    """The index-th client address: 127.0.0.2, 127.0.0.3, ... (Linux routes 127/8 to lo)."""
    return f"127.0.{index // 250}.{2 + index % 250}"


def memory_per_session(instance: Instance, sessions: int, baseline: dict[str, Any]
                       ) -> float | None:
    process = instance.process.process
    if process is None or sessions == 0:
        return None
    now = procmem.tree_memory([process.pid])
    return (now["pss_private_kib"] - baseline["pss_private_kib"]) / sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=2000)
    parser.add_argument("--jitter", type=float, default=2.0,
                        help="seconds over which a dropped phone comes back (random)")
    parser.add_argument("--per-address", type=int, default=100,
                        help="phones per client address (127.0.0.2, .3, ...): a penalty lane "
                             "checks 32 logins at once per address (max_parallel_logins_per_ip)")
    parser.add_argument("--tls", action="store_true",
                        help="phones use implicit TLS (993), terminated by the instances")
    parser.add_argument("--max-login-rate", type=float, default=0,
                        help="[limits] max_login_rate of each instance (0: unlimited)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the working folder (logs of HAProxy, the instances, Dovecot)")
    args = parser.parse_args(argv)
    n = args.phones
    figures: dict[str, Any] = {"phones": n, "jitter_s": args.jitter, "tls": args.tls,
                               "phones_per_address": args.per_address,
                               "max_login_rate": args.max_login_rate}
    work = Path(tempfile.mkdtemp(prefix="rolling-"))
    if args.keep:
        log(f"working folder {work}")
    try:
        users = make_users(n, prefix="phone", first_uid=20000)
        log(f"starting Dovecot with {n} users")
        store = Dovecot(work / "store", users, name="store", max_sessions=2 * n + 100)
        store.start()
        cert = context = None
        if args.tls:
            ca = TestCA(work / "ca")
            cert = ca.issue("localhost")
            context = ssl.create_default_context(cafile=str(ca.ca_path))
        # The baseline: the same phones all at once straight to Dovecot, as a storm
        # without a proxy (plaintext: Dovecot's own TLS is not what the proxies add to).
        direct = Fleet(HOST, store.imap_port,
                       [Phone(u.name, u.password, source=address(i // args.per_address))
                        for i, u in enumerate(users)], open_concurrency=n)
        try:
            figures["direct_storm_s"] = direct.start(max(120.0, n / 10))
        finally:
            direct.stop()
        log(f"{n} phones at once straight to Dovecot: in IDLE after "
            f"{figures['direct_storm_s']:.2f}s")
        time.sleep(2.0)  # Dovecot reaps those sessions
        pool = Pool(work / "pool", store.imap_port, cert=cert,
                    limits=f"max_login_rate = {args.max_login_rate}\n")
        fleet = None
        try:
            pool.start()
            a, b = pool.instances
            baselines = {i.name: procmem.tree_memory([i.process.process.pid])  # type: ignore[union-attr]
                         for i in pool.instances}
            phones = [Phone(u.name, u.password, source=address(i // args.per_address))
                      for i, u in enumerate(users)]
            fleet = Fleet(HOST, pool.port, phones, jitter=args.jitter, tls=context)
            figures["open_s"] = fleet.start(max(120.0, n / 10))
            time.sleep(1.0)
            status = pool.status()
            figures["spread"] = {name: scur for name, (_s, scur) in status.items()}
            figures["pss_kib_per_session"] = {
                i.name: memory_per_session(i, status[i.name][1], baselines[i.name])
                for i in pool.instances}
            log(f"{n} phones in IDLE in {figures['open_s']:.1f}s, spread {figures['spread']},"
                f" PSS per session {figures['pss_kib_per_session']}")
            mailman = Mailman(store, [u.name for u in users], interval=0.02)
            mailman.start()
            try:
                on_a = status[a.name][1]
                failed = sum(p.failed for p in phones)
                started = time.monotonic()
                figures["drain_s"] = pool.drain(a)
                fleet.wait(lambda: fleet.idling() == n  # type: ignore[union-attr]
                           and sum(p.dropped for p in phones) == on_a,
                           "A's phones back in IDLE", 300)
                figures["restart_back_in_idle_s"] = time.monotonic() - started
                figures["restart_moved"] = on_a
                figures["restart_failed_attempts"] = sum(p.failed for p in phones) - failed
                log(f"restart of A: drain {figures['drain_s']:.2f}s; {on_a} phones back in "
                    f"IDLE on B after {figures['restart_back_in_idle_s']:.2f}s "
                    f"({figures['restart_failed_attempts']} attempts refused on the way)")
                figures["bring_back_s"] = pool.bring_back(a)
                dropped = sum(p.dropped for p in phones)
                failed = sum(p.failed for p in phones)
                on_b = pool.status()[b.name][1]
                pid_a = a.process.process.pid  # type: ignore[union-attr]
                cpu_a = cpu_seconds([pid_a])
                killed = time.monotonic()
                pool.kill(b)
                fleet.wait(lambda: sum(p.dropped for p in phones) == dropped + on_b
                           and fleet.all_idle_since(killed),  # type: ignore[union-attr]
                           "every phone back in IDLE after the kill", 300)
                figures["crash_back_in_idle_s"] = time.monotonic() - killed
                figures["crash_moved"] = on_b
                figures["crash_failed_attempts"] = sum(p.failed for p in phones) - failed
                figures["crash_logins_per_s"] = on_b / figures["crash_back_in_idle_s"]
                # What the storm cost the instance that took it: logins per CPU second
                # of its process, a capacity per core whatever else the machine ran.
                figures["crash_cpu_s"] = cpu_seconds([pid_a]) - cpu_a
                figures["logins_per_cpu_s"] = on_b / figures["crash_cpu_s"]
                log(f"kill of B: {on_b} phones back in IDLE on A after "
                    f"{figures['crash_back_in_idle_s']:.2f}s "
                    f"({figures['crash_logins_per_s']:.0f} logins/s; A spent "
                    f"{figures['crash_cpu_s']:.1f} CPU s: {figures['logins_per_cpu_s']:.0f} "
                    f"logins per CPU second; "
                    f"{figures['crash_failed_attempts']} attempts refused on the way)")
            finally:
                mailman.stop()
            figures["delivered_during"] = sum(mailman.delivered.values())
            probe = time.monotonic()
            with ThreadPoolExecutor(4) as pool_ex:
                list(pool_ex.map(mailman.deliver, [u.name for u in users]))
            expected = mailman.expected()
            with contextlib.suppress(AssertionError):  # counted as missed below
                fleet.wait(lambda: fleet.missed(expected) == 0,  # type: ignore[union-attr]
                           "every message seen", 120)
            figures["final_push_s"] = time.monotonic() - probe
            figures["missed"] = fleet.missed(expected)
            figures["refusal_samples"] = Counter(
                e.split(":")[0] + ":" + e.split(":", 1)[1][:60] for p in phones
                for e in p.errors).most_common(5)
            log(f"{figures['delivered_during']} messages delivered during the switches, "
                f"{n} more after; missed: {figures['missed']}")
        finally:
            if fleet is not None:
                fleet.stop()
            pool.stop()
            store.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures.get("missed") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""What admission pacing costs (issue 17, part 4): the pacer per login, and the proxy's
logins/s with pacing off against pacing on at a rate far above what it sustains.

    python bench/pacing.py [--logins 1000] [--rounds 3] [--concurrency 32]

1. The pure module (imapproxy/pacing.py) and its adapter (pacinggate.py), timed in
   this process: ns per login let through at once, per login that waits its turn
   (submit + poll), and per PacingGate.enter() with pacing off and on.
2. One Dovecot (tests/rig) behind two proxies started the same way but for
   ``[limits] max_login_rate`` (0, and 100000 so that every login passes at once),
   measured in alternating rounds with bench/client.py's "logins" (LOGIN + LOGOUT on
   a new connection each, ``--concurrency`` at a time): logins/s and the proxy's CPU
   ms per login. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.ports import free_port  # noqa: E402
from rig.proxy import ProxyProcess  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from bench.run import cpu_seconds, run_client  # noqa: E402
from imapproxy.config import Limits  # noqa: E402
from imapproxy.pacing import Pacer  # noqa: E402
from imapproxy.pacinggate import PacingGate  # noqa: E402


def _ns_per(count: int, seconds: float) -> float:
    return seconds * 1e9 / count


class _HandClock:
    """A clock the micro-benchmark moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed(results: dict[str, list[float]], name: str, run: Any, n: int) -> None:
    t0 = time.perf_counter()
    run(n)
    results.setdefault(name, []).append(_ns_per(n, time.perf_counter() - t0))


def _let_through(pacer: Pacer, n: int) -> None:
    submit = pacer.submit
    for i in range(n):
        submit(i)


def _wait_then_poll(pacer: Pacer, clock: _HandClock, n: int) -> None:
    """A line of n, let through one per poll as the gate's timer would."""
    for i in range(n):
        pacer.submit(i)
    while pacer.waiting:
        wakeup = pacer.next_wakeup()
        assert wakeup is not None
        clock.now = wakeup
        pacer.poll()


def _enter(gate: PacingGate, n: int) -> None:
    enter = gate.enter
    for _ in range(n):
        enter()


def micro(count: int = 1_000_000) -> dict[str, float]:
    """ns per operation, best of 5."""
    results: dict[str, list[float]] = {}
    for _ in range(5):
        clock = _HandClock()
        at_once = Pacer(clock, rate=1e12, max_waiting=10)
        _timed(results, "pacer_submit_at_once_ns", lambda n, p=at_once: _let_through(p, n),
               count)
        off = Pacer(clock, rate=0.0)
        _timed(results, "pacer_submit_off_ns", lambda n, p=off: _let_through(p, n), count)
        queued = Pacer(clock, rate=1000.0, max_waiting=count)
        _timed(results, "pacer_wait_submit_poll_ns",
               lambda n, p=queued, c=clock: _wait_then_poll(p, c, n), count // 10)
        reactor = Clock()
        gate_off = PacingGate.from_limits(Limits(), reactor)
        _timed(results, "gate_enter_off_ns", lambda n, g=gate_off: _enter(g, n), count)
        gate_on = PacingGate.from_limits(Limits(max_login_rate=1e12, max_login_queue=10),
                                         reactor)
        _timed(results, "gate_enter_at_once_ns", lambda n, g=gate_on: _enter(g, n), count)
    return {name: min(values) for name, values in results.items()}


CONFIG = """
[[listen]]
protocol = "imap"
address = "127.0.0.1:{port}"
tls = "none"

[tls]
plaintext_auth = true

[directory]
type = "static"
map = "users.map"

[limits]
max_connections_per_user_ip = 0
max_login_rate = {rate}
"""


def proxies(work: Path, store: Dovecot, logins: int, rounds: int,
            concurrency: int, users: list[MailUser]) -> dict[str, Any]:
    started = {}
    for name, rate in (("off", 0), ("on", 100000)):
        port = free_port()
        proxy = ProxyProcess(work / f"proxy-{name}", CONFIG.format(port=port, rate=rate), [port],
                             {"users.map": f"*  127.0.0.1:{store.imap_port}\n"})
        started[name] = (proxy.start(), port)
    figures: dict[str, dict[str, list[float]]] = {name: {"per_s": [], "cpu_ms": []}
                                                  for name in started}
    try:
        entries_of = {name: [["127.0.0.1", port, users[i % len(users)].name,
                              users[i % len(users)].password] for i in range(logins)]
                      for name, (_proxy, port) in started.items()}
        for name in started:  # warm up: imports, the known addresses of the penalty
            run_client({"kind": "logins", "entries": entries_of[name][:100],
                        "concurrency": concurrency}, work)
        for rnd in range(rounds):
            order = list(started) if rnd % 2 == 0 else list(reversed(started))
            for name in order:
                proxy, _port = started[name]
                assert proxy.process is not None
                pids = [proxy.process.pid]
                c0 = cpu_seconds(pids)
                r = run_client({"kind": "logins", "entries": entries_of[name],
                                "concurrency": concurrency}, work)
                cpu = cpu_seconds(pids) - c0
                if r["errors"]:
                    raise RuntimeError(f"{name}: {r['errors']} errors: {r['first_errors']}")
                figures[name]["per_s"].append(r["per_s"])
                figures[name]["cpu_ms"].append(cpu * 1e3 / r["count"])
                print(f"round {rnd + 1} pacing {name:3}: {r['per_s']:7.1f} logins/s, "
                      f"{cpu * 1e3 / r['count']:.3f} ms CPU per login", file=sys.stderr)
    finally:
        for proxy, _port in started.values():
            proxy.stop()
    return {name: {"logins_per_s_median": statistics.median(f["per_s"]),
                   "cpu_ms_per_login_median": statistics.median(f["cpu_ms"]),
                   "rounds": f}
            for name, f in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--micro-only", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"micro_ns": micro()}
    print(json.dumps(out["micro_ns"], indent=1), file=sys.stderr)
    if not args.micro_only:
        users = [MailUser(f"pace{i}", f"pace{i}-secret", 3000 + i) for i in range(8)]
        with tempfile.TemporaryDirectory(prefix="imapproxy-pacing-") as folder:
            work = Path(folder)
            store = Dovecot(work / "store", users, name="pacing", max_sessions=400)
            store.start()
            try:
                out["proxy"] = proxies(work, store, args.logins, args.rounds,
                                       args.concurrency, users)
            finally:
                store.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

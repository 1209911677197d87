"""imapproxy benchmark: the proxy side by side with direct Dovecot and with Perdition.

    python bench/run.py [--quick] [--sessions N] [--rounds R] [--out FILE]

Starts two Dovecot stores, slapd (the directory both proxies use), imapproxy and
Perdition, then measures every path in alternating rounds (direct, proxy,
Perdition, rotated each round), so that ratios to direct hold on a noisy 2-core
machine: each ratio is the median of per-round ratios. Progress goes to stderr,
the table (Markdown) to stdout, every figure plus versions and settings to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import procmem  # noqa: E402
from bench.profiling import HeapSnapshots, PySpy  # noqa: E402
from bench.stack import SIEVE_SCRIPT, BenchPath, Sizes, Stack, machine  # noqa: E402

CLIENT = str(ROOT / "bench" / "client.py")
#: seconds a client waits on one read before it calls the run failed (--quick: 15)
IO_TIMEOUT = 60.0
T0 = time.monotonic()

# key, group, label, unit, how to compare with direct ("ratio" | "added" | None), direct too?
FIGURES: list[tuple[str, str, str, str, str | None, bool]] = [
    ("bulk_plain_mb_s", "bulk", "bulk FETCH, plaintext", "MB/s", "ratio", True),
    ("bulk_tls_mb_s", "bulk", "bulk FETCH, implicit TLS", "MB/s", "ratio", True),
    ("login_seq_cold_per_s", "logins", "logins/s, sequential, cold cache", "/s", "ratio", True),
    ("login_seq_warm_per_s", "logins", "logins/s, sequential, warm cache", "/s", "ratio", True),
    ("login_c32_cold_per_s", "logins", "logins/s, {c} concurrent, cold cache", "/s", "ratio", True),
    ("login_c32_warm_per_s", "logins", "logins/s, {c} concurrent, warm cache", "/s", "ratio", True),
    ("noop_median_ms", "noop", "NOOP round trip, median", "ms", "added", True),
    ("noop_p99_ms", "noop", "NOOP round trip, p99", "ms", "added", True),
    ("pop3_c32_per_s", "pop3", "POP3 login+RETR all, {c} concurrent", "sessions/s", "ratio", True),
    ("sieve_c32_per_s", "sieve", "ManageSieve login+LISTSCRIPTS+GETSCRIPT+LOGOUT, {c} concurrent",
     "sessions/s", "ratio", True),
]
for _t, _tl in (("plain", "plaintext"), ("tls", "TLS")):
    FIGURES += [
        (f"idle_{_t}_open_s", "push", f"IDLE {_tl}: time to open {{n}} sessions", "s", "ratio",
         True),
        (f"idle_{_t}_rss_kib", "push", f"IDLE {_tl}: proxy RSS per session", "KiB", None, False),
        (f"idle_{_t}_pss_kib", "push", f"IDLE {_tl}: proxy PSS per session (private+PTE)", "KiB",
         None, False),
        (f"idle_{_t}_push_median_ms", "push", f"IDLE {_tl}: push latency, median", "ms", "added",
         True),
        (f"idle_{_t}_push_max_ms", "push", f"IDLE {_tl}: push latency, max", "ms", "added", True),
    ]
GROUPS = ("bulk", "logins", "noop", "pop3", "sieve", "push")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --- clients -----------------------------------------------------------------


def run_client(spec: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
    """Run one client process on ``spec`` and return its JSON result."""
    path = workdir / f"spec-{os.getpid()}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"io_timeout": IO_TIMEOUT, **spec}))
    try:
        res = subprocess.run([sys.executable, CLIENT, str(path)], capture_output=True,
                             text=True, timeout=timeout)
    finally:
        path.unlink(missing_ok=True)
    if res.returncode != 0:
        raise RuntimeError(f"client {spec['kind']} failed: {res.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


class IdleClients:
    """Several client processes holding IDLE sessions; see client.py's idle protocol."""

    def __init__(self, entries: list[list[Any]], tls: bool, ca: str, workdir: Path,
                 processes: int, open_concurrency: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.specs: list[Path] = []
        chunks = [entries[i::processes] for i in range(processes)]
        per = max(1, open_concurrency // processes)
        for i, chunk in enumerate(chunks):
            spec = {"kind": "idle", "entries": chunk, "tls": tls, "ca": ca,
                    "open_concurrency": per}
            p = workdir / f"idle-{i}-{time.monotonic_ns()}.json"
            p.write_text(json.dumps(spec))
            self.specs.append(p)
            self.procs.append(subprocess.Popen([sys.executable, CLIENT, str(p)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               text=True, bufsize=1))

    def _read(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(proc.stdout.readline()))  # type: ignore[union-attr]
        t.daemon = True
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            raise RuntimeError(f"IDLE client gave no answer (exit {proc.poll()})")
        r: dict[str, Any] = json.loads(out[0])
        return r

    def opened(self, timeout: float) -> dict[str, Any]:
        res = [self._read(p, timeout) for p in self.procs]
        return {"ok": sum(r["ok"] for r in res), "failed": sum(r["failed"] for r in res),
                "first_errors": [e for r in res for e in r["first_errors"]][:3],
                "seconds": max(r["end"] for r in res) - min(r["start"] for r in res)}

    def report(self) -> tuple[dict[str, float], int]:
        seen: dict[str, float] = {}
        alive = 0
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("report\n")
            p.stdin.flush()
        for p in self.procs:
            r = self._read(p, 30)
            seen.update(r["seen"])
            alive += r["alive"]
        return seen, alive

    def close(self) -> None:
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write("quit\n")
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.specs:
            s.unlink(missing_ok=True)


# --- process accounting ------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the trees at ``pids``, with reaped children (cutime+cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    seen: set[int] = set()
    for root in pids:
        for p in procmem.children(root):
            if p in seen:
                continue
            seen.add(p)
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15])
    return total / tick


# --- results -------------------------------------------------------------------


class Results:
    """Every run of every figure, by round; summarised with medians at the end."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.errors: list[dict[str, str]] = []

    def add(self, key: str, path: str, rnd: int, value: float | None, **extra: Any) -> None:
        self.runs.setdefault(key, {}).setdefault(path, []).append(
            {"round": rnd, "value": value, **extra})

    def error(self, path: str, what: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.errors.append({"path": path, "what": what, "error": msg[:2000]})
        log(f"ERROR {path} {what}: {msg[:500]}")

    def summary(self, key: str, compare: str | None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        by_path = self.runs.get(key, {})
        direct = {r["round"]: r["value"] for r in by_path.get("direct", [])
                  if r["value"] is not None}
        for path, runs in by_path.items():
            vals = [r["value"] for r in runs if r["value"] is not None]
            entry: dict[str, Any] = {"value": statistics.median(vals) if vals else None,
                                     "runs": runs}
            if path != "direct" and compare and vals:
                per = [r["value"] for r in runs if r["value"] is not None]
                pairs = [(r["value"], direct[r["round"]]) for r in runs
                         if r["value"] is not None and r["round"] in direct]
                if compare == "ratio" and pairs:
                    entry["ratio_to_direct"] = statistics.median(
                        v / d for v, d in pairs if d)
                elif compare == "added" and pairs:
                    entry["added_to_direct"] = statistics.median(v - d for v, d in pairs)
                del per
            out[path] = entry
        return out


# --- measurements ------------------------------------------------------------------


class Bench:
    def __init__(self, stack: Stack, sizes: Sizes, args: argparse.Namespace) -> None:
        self.stack = stack
        self.sizes = sizes
        self.args = args
        self.results = Results()
        self.work = stack.workdir
        self.pyspy = PySpy(Path(args.profile)) if args.profile else None
        self.heap = HeapSnapshots(stack.workdir / "heap") if args.tracemalloc else None
        self.heap_diffs: dict[str, Any] = {}
        if self.heap is not None and "imapproxy" in stack.proxies:
            proxy = stack.proxies["imapproxy"]
            proxy.env_extra.update(self.heap.env())
            proxy.stop()
            proxy.start()

    def main_proxy_pid(self) -> int | None:
        p = self.stack.proxies.get("imapproxy")
        return p.pid if p is not None and p.running else None

    def run_group(self, group: str) -> None:
        pid = self.main_proxy_pid()
        if self.pyspy is not None and pid is not None and group != "push":
            self.pyspy.start(pid, group)
        try:
            getattr(self, group)()
        finally:
            if self.pyspy is not None:
                self.pyspy.stop()

    def paths_for(self, group: str, rnd: int = 0) -> list[BenchPath]:
        ps = [p for p in self.stack.paths if group in p.groups and group not in p.unsupported]
        k = rnd % len(ps) if ps else 0
        return ps[k:] + ps[:k]

    def guarded(self, path: BenchPath, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed run must not end the bench
            self.results.error(path.name, what, e)

    def proxy_pids(self, path: BenchPath, proto: str) -> list[int]:
        return path.pids(proto)

    # bulk ----------------------------------------------------------------------

    def bulk(self) -> None:
        st, s = self.stack, self.sizes
        user = st.bulk_user
        # Warm the page cache and Dovecot's index before any timed run.
        host, port = st.paths[0].imap(user, False)  # type: ignore[misc]
        run_client({"kind": "bulk", "host": host, "port": port, "tls": False, "ca": st.ca_path,
                    "user": user, "password": st.password(user)}, self.work)
        for rnd in range(s.rounds):
            for path in self.paths_for("bulk", rnd):
                for tls in (False, True):
                    key = "bulk_tls_mb_s" if tls else "bulk_plain_mb_s"

                    def one(path: BenchPath = path, tls: bool = tls, key: str = key,
                            rnd: int = rnd) -> None:
                        ep = path.imap(user, tls)
                        assert ep is not None
                        pids = path.pids("imaps" if tls else "imap")
                        c0 = cpu_seconds(pids)
                        r = run_client({"kind": "bulk", "host": ep[0], "port": ep[1],
                                        "tls": tls, "ca": st.ca_path, "user": user,
                                        "password": st.password(user)}, self.work)
                        cpu = cpu_seconds(pids) - c0 if pids else None
                        if r["bytes"] < st.bulk_bytes:
                            raise RuntimeError(f"short FETCH: {r['bytes']} < {st.bulk_bytes}")
                        self.results.add(key, path.name, rnd, r["mb_per_s"], bytes=r["bytes"],
                                         seconds=r["seconds"], proxy_cpu_s=cpu,
                                         cipher=r["cipher"], client_cpu_s=r["client_cpu_s"],
                                         recv_calls=r["recv_calls"])
                        log(f"bulk {'TLS  ' if tls else 'plain'} r{rnd + 1} {path.name:17}"
                            f" {r['mb_per_s']:8.1f} MB/s"
                            + (f"  proxy CPU {cpu:.2f}s" if cpu is not None else "")
                            + f"  client CPU {r['client_cpu_s']:.2f}s/{r['seconds']:.2f}s"
                            f" ({r['bytes'] / r['recv_calls'] / 1024:.1f} KiB/read)")

                    self.guarded(path, key, one)

    # logins ----------------------------------------------------------------------

    def logins(self) -> None:
        st, s = self.stack, self.sizes
        per_round = s.login_seq + s.login_conc
        for rnd in range(s.rounds):
            users = st.pool[rnd * per_round:(rnd + 1) * per_round]
            seq_users, conc_users = users[:s.login_seq], users[s.login_seq:]
            for path in self.paths_for("logins", rnd):
                for mode, group_users, conc in (("seq", seq_users, 1),
                                                ("c32", conc_users, s.concurrency)):
                    for cache in ("cold", "warm"):
                        key = f"login_{mode}_{cache}_per_s"

                        def one(path: BenchPath = path, key: str = key, conc: int = conc,
                                group_users: list[str] = group_users, rnd: int = rnd) -> None:
                            entries = []
                            for u in group_users:
                                ep = path.imap(u, False)
                                assert ep is not None
                                entries.append([ep[0], ep[1], u, st.password(u)])
                            pids = path.pids("imap")
                            c0 = cpu_seconds(pids)
                            r = run_client({"kind": "logins", "entries": entries,
                                            "concurrency": conc}, self.work)
                            cpu = cpu_seconds(pids) - c0 if pids else None
                            if r["errors"]:
                                raise RuntimeError(f"{r['errors']} of {len(entries)} logins "
                                                   f"failed: {r['first_errors']}")
                            self.results.add(key, path.name, rnd, r["per_s"], count=r["count"],
                                             seconds=r["seconds"],
                                             latency_median_ms=r["latency_median_ms"],
                                             latency_p99_ms=r["latency_p99_ms"],
                                             proxy_cpu_ms_per_login=(cpu * 1e3 / r["count"]
                                                                     if cpu is not None
                                                                     and r["count"] else None))
                            log(f"logins {key[6:-6]:9} r{rnd + 1} {path.name:17} "
                                f"{r['per_s']:8.1f}/s  (median {r['latency_median_ms']:.2f} ms)")

                        self.guarded(path, key, one)

    # NOOP ------------------------------------------------------------------------

    def noop(self) -> None:
        st, s = self.stack, self.sizes
        user = st.noop_user
        # A NOOP run takes well under a second, so a burst of load elsewhere on the
        # machine can swamp one; three times the rounds cost little.
        for rnd in range(s.rounds * 3):
            for path in self.paths_for("noop", rnd):
                def one(path: BenchPath = path, rnd: int = rnd) -> None:
                    ep = path.imap(user, False)
                    assert ep is not None
                    r = run_client({"kind": "noop", "host": ep[0], "port": ep[1], "tls": False,
                                    "ca": st.ca_path, "user": user,
                                    "password": st.password(user), "count": s.noop}, self.work)
                    self.results.add("noop_median_ms", path.name, rnd, r["median_ms"],
                                     count=r["count"], mean_ms=r["mean_ms"], min_ms=r["min_ms"])
                    self.results.add("noop_p99_ms", path.name, rnd, r["p99_ms"],
                                     max_ms=r["max_ms"])
                    log(f"NOOP r{rnd + 1} {path.name:17} median {r['median_ms']:.3f} ms"
                        f"  p99 {r['p99_ms']:.3f} ms")

                self.guarded(path, "noop", one)

    # POP3 ------------------------------------------------------------------------

    def pop3(self) -> None:
        st, s = self.stack, self.sizes
        users = st.pop3_users
        for rnd in range(s.rounds):
            for path in self.paths_for("pop3", rnd):
                def one(path: BenchPath = path, rnd: int = rnd) -> None:
                    entries = []
                    for i in range(s.pop3_sessions):
                        u = users[i % len(users)]
                        ep = path.pop3(u)
                        assert ep is not None
                        entries.append([ep[0], ep[1], u, st.password(u)])
                    pids = path.pids("pop3")
                    c0 = cpu_seconds(pids)
                    r = run_client({"kind": "pop3", "entries": entries,
                                    "concurrency": min(s.concurrency, len(entries))}, self.work)
                    cpu = cpu_seconds(pids) - c0 if pids else None
                    if r["errors"]:
                        raise RuntimeError(f"{r['errors']} of {len(entries)} POP3 sessions "
                                           f"failed: {r['first_errors']}")
                    self.results.add("pop3_c32_per_s", path.name, rnd, r["per_s"],
                                     count=r["count"], seconds=r["seconds"],
                                     latency_median_ms=r["latency_median_ms"],
                                     proxy_cpu_ms_per_session=(cpu * 1e3 / r["count"]
                                                               if cpu is not None and r["count"]
                                                               else None))
                    log(f"POP3 r{rnd + 1} {path.name:17} {r['per_s']:8.1f} sessions/s")

                self.guarded(path, "pop3", one)

    # ManageSieve -------------------------------------------------------------------

    def sieve(self) -> None:
        """As many sessions as the POP3 group, over its users (each has one script)."""
        st, s = self.stack, self.sizes
        users = st.pop3_users
        for rnd in range(s.rounds):
            for path in self.paths_for("sieve", rnd):
                def one(path: BenchPath = path, rnd: int = rnd) -> None:
                    entries = []
                    for i in range(s.pop3_sessions):
                        u = users[i % len(users)]
                        ep = path.sieve(u)
                        if ep is None:
                            raise RuntimeError("no ManageSieve on this path")
                        entries.append([ep[0], ep[1], u, st.password(u), SIEVE_SCRIPT])
                    pids = path.pids("managesieve")
                    c0 = cpu_seconds(pids)
                    r = run_client({"kind": "sieve", "entries": entries,
                                    "concurrency": min(s.concurrency, len(entries))}, self.work)
                    cpu = cpu_seconds(pids) - c0 if pids else None
                    if r["errors"]:
                        raise RuntimeError(f"{r['errors']} of {len(entries)} ManageSieve "
                                           f"sessions failed: {r['first_errors']}")
                    self.results.add("sieve_c32_per_s", path.name, rnd, r["per_s"],
                                     count=r["count"], seconds=r["seconds"],
                                     latency_median_ms=r["latency_median_ms"],
                                     proxy_cpu_ms_per_session=(cpu * 1e3 / r["count"]
                                                               if cpu is not None and r["count"]
                                                               else None))
                    log(f"sieve r{rnd + 1} {path.name:17} {r['per_s']:8.1f} sessions/s")

                self.guarded(path, "sieve", one)

    # push at scale -------------------------------------------------------------------

    def push(self) -> None:
        st, s = self.stack, self.sizes
        n = s.sessions
        users = st.pool[:n]
        processes = 1 if n <= 1500 else 2
        for tls in (False, True):
            t = "tls" if tls else "plain"
            for path in self.paths_for("push", 1 if tls else 0):
                self.guarded(path, f"idle_{t}",
                             lambda path=path, tls=tls, t=t: self._push_one(  # type: ignore[misc]
                                 path, tls, t, users, processes))

    def _push_one(self, path: BenchPath, tls: bool, t: str, users: list[str],
                  processes: int) -> None:
        st, s = self.stack, self.sizes
        proto = "imaps" if tls else "imap"
        if path.kind != "direct":
            path.restart()  # a fresh process: the baseline is not the bulk run's leftovers
        entries = []
        for i, u in enumerate(users):
            ep = path.imap(u, tls)
            assert ep is not None
            # Phones come from many addresses: at most SESSIONS_PER_SOURCE per client
            # address (127.0.0.2, .3, ...), below any sane per-IP cap of a proxy.
            entries.append([ep[0], ep[1], u, st.password(u),
                            f"127.0.0.{2 + i // SESSIONS_PER_SOURCE}"])
        # Warm-up: a few sessions so that lazy set-up (imports, TLS contexts, LDAP
        # connections) is in the baseline, not in the per-session figure.
        warm = IdleClients(entries[:8], tls, st.ca_path, self.work, 1, 8)
        try:
            warm.opened(60)
        finally:
            warm.close()
        self._wait_backends_idle()
        time.sleep(1.0)
        pids = path.pids(proto)
        main_proxy = path.name == "imapproxy"
        heap_before = (self.heap.snapshot(pids[0]) if self.heap is not None and main_proxy
                       else None)
        if self.pyspy is not None and main_proxy:
            self.pyspy.start(pids[0], f"push_{t}")
        base = procmem.tree_memory(pids) if pids else None
        c0 = cpu_seconds(pids)
        clients = IdleClients(entries, tls, st.ca_path, self.work, processes, s.concurrency)
        try:
            opened = clients.opened(max(120.0, len(entries) / 20))
            cpu_open = cpu_seconds(pids) - c0 if pids else None
            log(f"IDLE {t:5} {path.name:17} opened {opened['ok']}/{len(entries)} in "
                f"{opened['seconds']:.2f}s" + (f" errors {opened['first_errors']}"
                                                if opened["failed"] else ""))
            if opened["failed"]:
                raise RuntimeError(f"{opened['failed']} of {len(entries)} IDLE sessions failed:"
                                   f" {opened['first_errors']}")
            time.sleep(1.0)
            mem = procmem.tree_memory(pids) if pids else None
            key = f"idle_{t}"
            self.results.add(f"{key}_open_s", path.name, 0, opened["seconds"],
                             sessions=opened["ok"], proxy_cpu_s=cpu_open)
            if mem is not None and base is not None:
                rss = (mem["rss_kib"] - base["rss_kib"]) / opened["ok"]
                # PSS without file-backed pages (see procmem.tree_memory), plus page
                # tables, which a fork-per-session proxy pays once per process.
                pss = (mem["pss_private_kib"] + mem["pte_kib"] - base["pss_private_kib"]
                       - base["pte_kib"]) / opened["ok"]
                self.results.add(f"{key}_rss_kib", path.name, 0, rss, baseline=base, loaded=mem)
                self.results.add(f"{key}_pss_kib", path.name, 0, pss, baseline=base, loaded=mem)
                log(f"IDLE {t:5} {path.name:17} per session: RSS {rss:.1f} KiB, PSS {pss:.1f} "
                    f"KiB ({mem['processes']} processes)")
            if heap_before is not None and self.heap is not None:
                heap_after = self.heap.snapshot(pids[0])
                if heap_after is not None:
                    d = self.heap.diff(heap_before, heap_after, opened["ok"])
                    self.heap_diffs[f"idle_{t}"] = d
                    log(f"IDLE {t:5} tracemalloc: {d['total_bytes_per_session']:.0f} B/session;"
                        f" top: {d['lineno'][0]['where']} "
                        f"{d['lineno'][0]['bytes_per_session']:.0f} B/session")
            # Deliver to a spread of the idling users and time each EXISTS.
            targets = users[::max(1, len(users) // s.push_users)][:s.push_users]
            delivered: dict[str, float] = {}

            def deliver(u: str) -> None:
                st.store(u).deliver(u, PUSH_MESSAGE)
                delivered[u] = time.monotonic()

            with ThreadPoolExecutor(4) as ex:
                list(ex.map(deliver, targets))
            deadline = time.monotonic() + 40
            while True:
                seen, alive = clients.report()
                if all(u in seen for u in targets) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            lat = sorted((seen[u] - delivered[u]) * 1e3 for u in targets if u in seen)
            missing = [u for u in targets if u not in seen]
            if missing:
                raise RuntimeError(f"{len(missing)} of {len(targets)} IDLE clients never saw "
                                   f"EXISTS (alive {alive}/{opened['ok']})")
            self.results.add(f"{key}_push_median_ms", path.name, 0, statistics.median(lat),
                             deliveries=len(targets), alive=alive)
            self.results.add(f"{key}_push_max_ms", path.name, 0, lat[-1])
            log(f"IDLE {t:5} {path.name:17} push latency median {statistics.median(lat):.0f} ms"
                f", max {lat[-1]:.0f} ms over {len(targets)} deliveries")
        finally:
            if self.pyspy is not None and main_proxy:
                self.pyspy.stop()
            clients.close()
            self._wait_backends_idle()

    def _wait_backends_idle(self, timeout: float = 60.0) -> None:
        """Wait until the stores have reaped the sessions of the previous step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = 0
            for d in self.stack.dovecots.values():
                proc = getattr(d, "_process", None)
                if proc is None:
                    continue
                for p in procmem.children(proc.pid):
                    try:
                        name = Path(f"/proc/{p}/comm").read_text().strip()
                    except OSError:
                        continue
                    if name == "imap" or name == "pop3":
                        count += 1
            if count == 0:
                return
            time.sleep(0.2)


SESSIONS_PER_SOURCE = 1000
PUSH_MESSAGE = (b"From: push@example.org\r\nTo: bench@example.org\r\n"
                b"Subject: push\r\nMessage-ID: <push@example.org>\r\n\r\nnew mail\r\n")


# --- output ------------------------------------------------------------------------


def summarise(results: Results, stack: Stack, sizes: Sizes) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    for key, group, label, unit, compare, _direct_too in FIGURES:
        entry = {"label": label.format(c=sizes.concurrency, n=sizes.sessions), "unit": unit,
                 "group": group, "compare": compare, "paths": results.summary(key, compare)}
        figs[key] = entry
    return figs


def path_figures(path: BenchPath) -> list[str]:
    """The figure keys a path must have in a complete run."""
    out = []
    for key, group, *_rest, direct_too in FIGURES:
        if group in path.groups and (direct_too or path.kind != "direct"):
            out.append(key)
    return out


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "ms":
        return f"{v:.3f}" if v < 10 else f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(figs: dict[str, Any], paths: list[BenchPath]) -> str:
    names = [p.name for p in paths]
    head = ["figure", "unit"]
    for n in names:
        head.append(n)
        if n != "direct":
            head.append("vs direct")
    rows = [head, ["---"] * len(head)]
    for _key, f in figs.items():
        if not f["paths"]:
            continue
        row = [f["label"], f["unit"]]
        for n in names:
            e = f["paths"].get(n)
            row.append(fmt(e["value"], f["unit"]) if e else "–")
            if n != "direct":
                if e and "ratio_to_direct" in e:
                    row.append(f"{e['ratio_to_direct']:.2f}×")
                elif e and "added_to_direct" in e:
                    row.append(f"{e['added_to_direct']:+.3f} ms" if f["unit"] == "ms"
                               else f"{e['added_to_direct']:+.2f}")
                else:
                    row.append("")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# --- main ----------------------------------------------------------------------------


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.quick:
        s = Sizes(mailbox_bytes=2_000_000, rounds=1, login_seq=20, login_conc=20, concurrency=32,
                  noop=50, sessions=10, push_users=10, pop3_sessions=2, pop3_users=2,
                  pop3_messages=3, pop3_message_bytes=20_000)
    else:
        s = Sizes(mailbox_bytes=200_000_000, rounds=3, login_seq=300, login_conc=1000,
                  concurrency=32, noop=2000, sessions=1000, push_users=100, pop3_sessions=600,
                  pop3_users=64, pop3_messages=10, pop3_message_bytes=20_000)
    for name in ("rounds", "sessions", "mailbox_bytes", "noop", "login_seq", "login_conc",
                 "pop3_sessions"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(s, name, v)
    s.push_users = min(s.push_users, s.sessions)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--sessions", type=int, help="IDLE sessions per path (default 1000)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3)")
    ap.add_argument("--mailbox-bytes", dest="mailbox_bytes", type=int)
    ap.add_argument("--noop", type=int, help="NOOPs per session (default 2000)")
    ap.add_argument("--login-seq", dest="login_seq", type=int)
    ap.add_argument("--login-conc", dest="login_conc", type=int)
    ap.add_argument("--pop3-sessions", dest="pop3_sessions", type=int)
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma list of groups to run ({','.join(GROUPS)})")
    ap.add_argument("--paths", default="", help="comma list of paths to keep (default all)")
    ap.add_argument("--proxy-toml", default="",
                    help="extra TOML appended to the proxy config (e.g. 'workers = 2')")
    ap.add_argument("--proxy-python", default="",
                    help="interpreter for imapproxy (default: this one), "
                    "e.g. .venv-debian/bin/python")
    ap.add_argument("--proxy-pythonpath", default="",
                    help="put this first on the proxy's PYTHONPATH (packages for --proxy-python)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--profile", metavar="DIR",
                    help="run py-spy on the proxy during each group; collapsed stacks to DIR")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the proxy's heap and diff it around the IDLE sessions")
    args = ap.parse_args(argv)
    sizes = sizes_from(args)
    global IO_TIMEOUT
    if args.quick:
        IO_TIMEOUT = 15.0
    if args.proxy_python:
        os.environ["BENCH_PROXY_PYTHON"] = args.proxy_python
    if args.proxy_pythonpath:
        os.environ["BENCH_PROXY_PATH"] = args.proxy_pythonpath
    only = [g for g in args.only.split(",") if g]
    for g in only:
        if g not in GROUPS:
            ap.error(f"unknown group {g}")

    # SIGTERM (a test's timeout, a CI job cancelled) must still stop every daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="imapproxy-bench-"))
    log(f"work directory {workdir}")
    started = datetime.datetime.now(datetime.UTC)
    stack = Stack(workdir, sizes, log, proxy_extra_toml=args.proxy_toml.replace("\\n", "\n"))
    bench: Bench | None = None
    try:
        stack.start()
        if args.paths:
            keep = set(args.paths.split(","))
            stack.paths = [p for p in stack.paths if p.name in keep]
        for n in stack.notes:
            log(f"note: {n}")
        bench = Bench(stack, sizes, args)
        for group in GROUPS:
            if group in only:
                log(f"--- {group} ---")
                bench.run_group(group)
        figs = summarise(bench.results, stack, sizes)
        out = {
            "date": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - T0, 1),
            "machine": machine(),
            "versions": stack.versions(),
            "settings": {**vars(sizes), "quick": args.quick, "groups": only,
                         "proxy_extra_toml": args.proxy_toml,
                         "proxy_python": args.proxy_python or sys.executable,
                         "diagnostics": {"py_spy": bool(args.profile),
                                         "tracemalloc": args.tracemalloc},
                         "perdition_argv": {m: p.argv() for m, p in stack.perditions.items()},
                         "bulk_messages": stack.bulk_messages, "bulk_bytes": stack.bulk_bytes},
            "paths": {p.name: {"kind": p.kind, "figures": [k for k in path_figures(p)
                                                           if _group(k) in only],
                               "unsupported": {_k: v for _k, v in p.unsupported.items()},
                               "notes": p.notes} for p in stack.paths},
            "notes": stack.notes,
            "errors": bench.results.errors,
            "profiles": bench.pyspy.summaries if bench.pyspy else {},
            "heap": bench.heap_diffs,
            "figures": figs,
        }
        for p in stack.paths:
            # a figure group the path cannot do is listed, not silently missing
            out["paths"][p.name]["figures"] = [
                k for k in out["paths"][p.name]["figures"] if _group(k) not in p.unsupported]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
        text = table(figs, stack.paths)
        host = out["machine"]
        print(f"\nimapproxy bench, {started:%Y-%m-%d %H:%M} UTC, {host.get('cpus')} CPUs "
              f"({host.get('cpu', '?')}), {host.get('mem_gib', '?')} GiB, {sizes.sessions} IDLE "
              f"sessions, {sizes.rounds} rounds{' (quick)' if args.quick else ''}\n")
        print(text)
        for n in stack.notes:
            print(f"\nnote: {n}")
        if bench.results.errors:
            print(f"\n{len(bench.results.errors)} errors (see {args.out}):")
            for e in bench.results.errors:
                print(f"  {e['path']} {e['what']}: {e['error'][-400:]}")
        log(f"results written to {args.out}")
        return 1 if bench.results.errors else 0
    finally:
        stack.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")


def _group(key: str) -> str:
    for k, g, *_ in FIGURES:
        if k == key:
            return g
    raise KeyError(key)


if __name__ == "__main__":
    sys.exit(main())

"""Optional diagnostics of the proxy during a bench run: py-spy and tracemalloc.

Figures from a profiled run are not comparable (py-spy samples the process, and
tracemalloc slows every allocation and adds to the heap), so ``run.py`` marks such
runs in the JSON settings.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any


class PySpy:
    """``py-spy record`` attached to one process, writing collapsed stacks."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        # bench/install-deps puts py-spy into .venv/bin, beside this interpreter.
        here = os.path.dirname(sys.executable)
        self.exe = shutil.which("py-spy", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
        self.proc: subprocess.Popen[bytes] | None = None
        self.current: Path | None = None
        self.summaries: dict[str, Any] = {}

    def start(self, pid: int, label: str) -> None:
        if self.exe is None:
            return
        self.stop()
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.current = self.outdir / f"{label}.collapsed"
        self.label = label
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
             "--format", "raw", "--output", str(self.current), "--subprocesses"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if self.current is not None and self.current.exists():
            self.summaries[self.label] = summarise_collapsed(self.current)


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares of the hottest functions in a collapsed-stack file."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self": [(f, round(c / total, 3)) for f, c in own.most_common(top)],
        "inclusive": [(f, round(c / total, 3)) for f, c in incl.most_common(top * 2)],
    }


def _short(frame: str) -> str:
    # "func (/long/path/module.py:123)" -> "func (module.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')'))})" if where else name


class HeapSnapshots:
    """Ask a process started with sitehooks/ on PYTHONPATH for tracemalloc snapshots."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.taken = 0

    def env(self) -> dict[str, str]:
        hooks = str(Path(__file__).resolve().parent / "sitehooks")
        return {"BENCH_TRACEMALLOC_DIR": str(self.directory), "BENCH_SITEHOOKS": hooks}

    def snapshot(self, pid: int, timeout: float = 60.0) -> tracemalloc.Snapshot | None:
        path = self.directory / f"snapshot-{self.taken}.pickle"
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not path.exists():
            return None
        self.taken += 1
        return tracemalloc.Snapshot.load(str(path))

    @staticmethod
    def diff(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, sessions: int,
             top: int = 20) -> dict[str, Any]:
        """Where the heap grew, per session: by line and by allocating traceback."""
        out: dict[str, Any] = {}
        for key in ("lineno", "traceback"):
            stats = after.compare_to(before, key)
            rows = []
            for s in stats[:top]:
                if key == "lineno":
                    where = str(s.traceback[0])
                else:
                    where = " <- ".join(str(f) for f in list(s.traceback)[:6])
                rows.append({"where": where.replace(str(Path.home()), "~"),
                             "bytes_per_session": round(s.size_diff / max(1, sessions), 1),
                             "blocks_per_session": round(s.count_diff / max(1, sessions), 2)})
            out[key] = rows
        total = sum(s.size_diff for s in after.compare_to(before, "filename"))
        out["total_bytes_per_session"] = round(total / max(1, sessions), 1)
        return out

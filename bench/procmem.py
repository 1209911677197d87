"""Memory of a process tree from /proc: RSS and PSS (smaps_rollup), in KiB."""

from __future__ import annotations

import contextlib
from pathlib import Path


def children(pid: int) -> list[int]:
    """``pid`` and all its descendants (walks /proc/*/task/*/children)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue  # the process is gone
        for task in tasks:
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, ... in KiB for one process; empty if it is gone."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return fields
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            fields[parts[0][:-1]] = int(parts[1])
    return fields


def page_tables(pid: int) -> int:
    """Kernel page-table memory of one process (VmPTE, KiB): a per-process cost smaps omits."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmPTE:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(pids: list[int]) -> dict[str, int]:
    """Summed memory (KiB) and the process count over the trees rooted at ``pids``.

    ``pss_private_kib`` is PSS without file-backed pages (Pss_Anon + Pss_Shmem):
    the shares of mapped libraries move whenever any other process maps the same
    files (our own client processes do), which is noise, not session cost.
    """
    rss = pss = pss_priv = pte = n = 0
    seen: set[int] = set()
    for root in pids:
        for p in children(root):
            if p in seen:
                continue
            seen.add(p)
            r = rollup(p)
            if r:
                rss += r.get("Rss", 0)
                pss += r.get("Pss", 0)
                pss_priv += r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)
                pte += page_tables(p)
                n += 1
    return {"rss_kib": rss, "pss_kib": pss, "pss_private_kib": pss_priv, "pte_kib": pte,
            "processes": n}

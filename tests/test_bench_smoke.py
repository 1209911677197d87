"""The benchmark runs end to end on tiny sizes, so it cannot rot.

No timing is asserted: only that every path produced every figure it is meant
to. Perdition is part of the comparison, so a machine without it fails here
loudly: run ``bench/install-deps`` first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_has_every_figure(tmp_path: Path) -> None:
    assert os.path.exists("/usr/sbin/perdition.imap4"), (
        "Perdition is not installed; the bench compares against it: run bench/install-deps"
    )
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as bench:
        try:
            stdout, stderr = bench.communicate(timeout=170)
        except subprocess.TimeoutExpired:
            bench.terminate()  # run.py stops its daemons on SIGTERM
            stdout, stderr = bench.communicate(timeout=60)
            raise AssertionError(f"bench --quick hung:\n{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, bench.returncode, stdout, stderr)
    assert out.exists(), f"no JSON written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert data["errors"] == [], json.dumps(data["errors"], indent=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"direct", "imapproxy", "perdition"} <= set(data["paths"]), data["notes"]
    for key in ("python", "perdition", "dovecot-core", "twisted", "imapproxy_git"):
        assert data["versions"].get(key), key
    missing = []
    for path, info in data["paths"].items():
        assert info["figures"], path
        for key in info["figures"]:
            value = data["figures"][key]["paths"].get(path, {}).get("value")
            if not isinstance(value, (int, float)):
                missing.append(f"{path}: {key}")
    assert not missing, missing
    # Ratios to direct are computed for every comparable figure.
    for key, fig in data["figures"].items():
        if fig["compare"] == "ratio":
            for path, entry in fig["paths"].items():
                if path != "direct":
                    assert isinstance(entry.get("ratio_to_direct"), float), (key, path)
    assert "| figure |" in proc.stdout

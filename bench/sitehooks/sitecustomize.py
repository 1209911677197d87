"""Loaded into the proxy by ``bench/run.py --tracemalloc`` (via PYTHONPATH).

Starts tracemalloc at interpreter start-up and dumps a snapshot to
``$BENCH_TRACEMALLOC_DIR/snapshot-<n>.pickle`` on each SIGUSR2, so the bench can
diff the heap before and after opening N sessions. Does nothing unless the
variable is set.
"""

import os

_DIR = os.environ.get("BENCH_TRACEMALLOC_DIR")
if _DIR:
    import itertools
    import signal
    import tracemalloc

    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "8")))
    _count = itertools.count()

    def _dump(_signum, _frame):  # type: ignore[no-untyped-def]
        path = os.path.join(_DIR, f"snapshot-{next(_count)}.pickle")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.rename(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, _dump)

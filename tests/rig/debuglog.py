"""A twistd log observer for tests: every event whole, at every level, debug included.

``twistd --logger=rig.debuglog.observer`` (with ``tests/`` on PYTHONPATH) writes one line
per event to the file named by $IMAPPROXY_EVENT_LOG: its level, the formatted text, the
repr of the whole event dict (every key, also those the format string does not use) and
any traceback. twistd itself has no log level switch; nothing is filtered here.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider


def observer() -> Any:
    # Open for the life of the process, like twistd's own log file.
    out = open(os.environ["IMAPPROXY_EVENT_LOG"], "a", buffering=1, encoding="utf-8",  # noqa: SIM115
               errors="backslashreplace")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        failure = event.get("log_failure")
        traceback = failure.getTraceback() if failure is not None else ""
        line = f"{getattr(level, 'name', level)} {formatEvent(event)} {event!r} {traceback}"
        out.write(line.replace("\n", "\\n") + "\n")

    return observe

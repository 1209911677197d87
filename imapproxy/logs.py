# -*- test-case-name: tests.test_logs -*-
"""Log destinations (``[log]``): twistd's text lines, JSON lines, syslog.

Every event goes through twisted.logger. The two lines per session that operators
(and fail2ban filters) read are decided by login.py and frontend.py:

    login id=7 client=192.0.2.7 user=alice backend=store1:143 mechanism=PLAIN tls=True pid=..
    session end id=7 client=192.0.2.7:40000 user=alice backend=store1:143 duration=12.0s
        in=420 out=9000 reason=client closed

With ``format = "json"`` each event is one JSON object on one line (stdout), with
the formatted ``message`` and the event's own fields (``session_id``, ``client``,
``user``, ``backend``, ...) as keys, so nothing has to be parsed back out of text.
With ``syslog = true`` every event also goes to syslog (facility ``mail`` by
default, ident ``imapproxy[pid]``), on a UNIX socket (``/dev/log``) or UDP
``host:port``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from .config import ConfigError, LogConfig, parse_address

#: event keys that are twisted.logger's or legacy-log plumbing, not facts about the event
_PLUMBING = frozenset({"message", "format", "system", "isError", "why", "failure", "line",
                       "time", "level", "namespace", "text"})
_LEVELS = {LogLevel.debug: logging.DEBUG, LogLevel.info: logging.INFO,
           LogLevel.warn: logging.WARNING, LogLevel.error: logging.ERROR,
           LogLevel.critical: logging.CRITICAL}


def event_level(event: dict[str, Any]) -> LogLevel:
    level = event.get("log_level")
    if level in _LEVELS:
        return level  # type: ignore[no-any-return]
    return LogLevel.error if event.get("isError") else LogLevel.info


def json_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object for one event: time, level, namespace, text, then its own fields."""
    stamp = event.get("log_time")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
        if isinstance(stamp, (int, float)) else None,
        "level": event_level(event).name,
        "namespace": event.get("log_namespace", event.get("system", "-")),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _PLUMBING:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(json_record(event), ensure_ascii=False, default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


class _SysLogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        """A syslog daemon that went away must not flood stderr; the lines are dropped."""


def syslog_handler(config: LogConfig) -> logging.handlers.SysLogHandler:
    """A stdlib SysLogHandler for [log] syslog_address and syslog_facility; raises OSError."""
    address: str | tuple[str, int] = config.syslog_address
    if config.syslog_address.startswith("/"):
        # SysLogHandler itself would only find out at the first message, and then
        # complain on stderr for every one.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(config.syslog_address)
        except OSError:
            probe.close()
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(config.syslog_address)  # raises: nothing listens there
        finally:
            probe.close()
    else:
        address = parse_address(config.syslog_address)
    facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
    handler = _SysLogHandler(address=address, facility=facility)
    handler.ident = f"imapproxy[{os.getpid()}]: "
    return handler


@implementer(ILogObserver)
class SyslogObserver:
    """Sends each event's text to syslog, at the event's level."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        record = logging.LogRecord("imapproxy", _LEVELS[event_level(event)], "", 0,
                                   text.replace("\n", " | "), None, None)
        self.handler.emit(record)


class SyslogService(Service):
    """Adds the syslog observer while the proxy runs."""

    def __init__(self, observer: SyslogObserver, publisher: Any = globalLogPublisher) -> None:
        self.observer = observer
        self.publisher = publisher

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.publisher.addObserver(self.observer)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.publisher.removeObserver(self.observer)
        self.observer.handler.close()


class LoggingRoot(MultiService):
    """The root of the service tree; it also tells twistd which log observer to use.

    twistd asks the application for an ILogObserver component before it starts
    logging (twisted.application.app.AppLogger.start). The root learns the
    application when twistd parents it, the one moment to set that component.
    """

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def configure(root: LoggingRoot, config: LogConfig, path: Path | str,
              stream: IO[str] | None = None) -> None:
    """Apply [log] to a fresh service tree: JSON lines and/or a syslog service."""
    if config.format == "json":
        root.log_observer = JsonLinesObserver(stream if stream is not None else sys.stdout)
    if config.syslog:
        try:
            handler = syslog_handler(config)
        except OSError as e:
            raise ConfigError(path, "log.syslog_address",
                              f"cannot open {config.syslog_address}: {e.strerror or e}") from None
        SyslogService(SyslogObserver(handler)).setServiceParent(root)

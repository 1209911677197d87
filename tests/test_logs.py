"""logs: JSON lines, syslog over UDP, and the application hook that twistd reads."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from imapproxy.config import ConfigError, LogConfig
from imapproxy.logs import (
    JsonLinesObserver,
    LoggingRoot,
    SyslogObserver,
    SyslogService,
    configure,
    json_record,
    syslog_handler,
)


def emit(observer: object, fmt: str, level: LogLevel = LogLevel.info, **fields: object) -> None:
    publisher = LogPublisher(observer)  # type: ignore[arg-type]
    Logger(namespace="imapproxy", observer=publisher).emit(level, fmt, **fields)


def test_json_line_carries_the_text_and_the_fields() -> None:
    stream = io.StringIO()
    emit(JsonLinesObserver(stream), "login id={session_id} client={client} user={user}",
         session_id=7, client="192.0.2.7", user="alice", tls=True, obj=object())
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["text"] == "login id=7 client=192.0.2.7 user=alice"
    assert record["level"] == "info" and record["namespace"] == "imapproxy"
    assert record["session_id"] == 7 and record["client"] == "192.0.2.7"
    assert record["tls"] is True and "obj" not in record
    assert record["time"].endswith("+00:00")


def test_json_levels_and_failures() -> None:
    assert json_record({"log_level": LogLevel.warn, "log_format": "x"})["level"] == "warn"
    assert json_record({"isError": 1, "message": ("legacy",)})["level"] == "error"
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    record = json_record({"log_format": "oops", "log_failure": failure})
    assert "ValueError: boom" in record["traceback"] and record["time"] is None


def test_syslog_over_udp() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    handler = syslog_handler(LogConfig(syslog=True, syslog_address=f"127.0.0.1:{port}",
                                       syslog_facility="mail"))
    try:
        emit(SyslogObserver(handler), "login id={n} user={user}", LogLevel.warn, n=3,
             user="alice")
        data = receiver.recv(2048)
    finally:
        handler.close()
        receiver.close()
    # <facility mail (2) * 8 + warning (4)> = <20>
    assert data.startswith(b"<20>imapproxy[")
    assert data.rstrip(b"\x00").endswith(b"]: login id=3 user=alice")


def test_syslog_service_adds_and_removes_its_observer() -> None:
    publisher = LogPublisher()
    sent: list[str] = []

    class Handler:
        def emit(self, record: object) -> None:
            sent.append(record.getMessage())  # type: ignore[attr-defined]

        def close(self) -> None:
            sent.append("closed")

    service = SyslogService(SyslogObserver(Handler()), publisher)  # type: ignore[arg-type]
    service.startService()
    Logger(observer=publisher).info("one\ntwo")
    service.stopService()
    Logger(observer=publisher).info("after")
    assert sent == ["one | two", "closed"]


def test_logging_root_gives_twistd_the_json_observer() -> None:
    application = Application("imapproxy")
    root = LoggingRoot()
    configure(root, LogConfig(format="json"), "x.toml", stream=io.StringIO())
    root.setServiceParent(application)
    assert isinstance(application.getComponent(ILogObserver), JsonLinesObserver)
    plain = Application("imapproxy")
    text_root = LoggingRoot()
    configure(text_root, LogConfig(), "x.toml")
    text_root.setServiceParent(plain)
    assert plain.getComponent(ILogObserver) is None


def test_unreachable_syslog_socket_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log.syslog_address"):
        configure(LoggingRoot(), LogConfig(syslog=True,
                                           syslog_address=str(tmp_path / "no-such-socket")),
                  tmp_path / "imapproxy.toml")


def test_syslog_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5)
    handler = syslog_handler(LogConfig(syslog=True, syslog_address=str(path),
                                       syslog_facility="local3"))
    try:
        emit(SyslogObserver(handler), "hello")
        data = receiver.recv(2048)
    finally:
        handler.close()
        receiver.close()
    assert data.startswith(b"<158>imapproxy[")  # local3 (19) * 8 + info (6)

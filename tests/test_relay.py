"""Relay: bytes pass untouched; the tracker beside them decides BYE, keepalive and drain."""

from __future__ import annotations

import pytest
from helpers import Harness

from imapproxy import relay
from imapproxy.config import Timeouts
from imapproxy.relay import BYE_BACKEND_GONE, STILL_HERE


def test_bytes_pass_untouched_both_ways_and_are_counted() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    payload = bytes(range(256)) * 100
    client.dataReceived(b"a APPEND INBOX {25600+}\r\n" + payload + b"\r\n")
    assert backend.transport.value() == b"a APPEND INBOX {25600+}\r\n" + payload + b"\r\n"
    before = client.bytes_to_client
    response = b"* 1 FETCH (BODY[] {25600}\r\n" + payload + b")\r\n"
    backend.dataReceived(response)
    assert transport.value().endswith(response)
    assert client.bytes_to_client - before == len(response)


def test_no_bye_injected_inside_a_server_literal() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"f FETCH 1 BODY[]\r\n")
    backend.dataReceived(b"* 1 FETCH (BODY[] {100}\r\npartial")
    transport.clear()
    backend.transport.loseConnection()
    assert BYE_BACKEND_GONE not in transport.value()  # it would corrupt the literal


def test_compressed_session_gets_no_keepalive() -> None:
    h = Harness(timeouts=Timeouts(idle_keepalive=60, sweep_interval=5))
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"z COMPRESS DEFLATE\r\n")
    backend.dataReceived(b"z OK DEFLATE active\r\n")
    client.dataReceived(b"\x01\x02compressed IDLE")
    transport.clear()
    h.advance(600, step=5)
    assert STILL_HERE not in transport.value()
    assert client.relay is not None and client.relay.tracker is not None
    assert client.relay.tracker.opaque


class _FakeTcp:
    """Just enough of twisted.internet.tcp.Server for write_now."""

    def __init__(self, tls: bool = False, queued: bytes = b"", takes: int = 1 << 20) -> None:
        self.TLS = tls
        self.dataBuffer = queued
        self.offset = 0
        self._tempDataLen = 0
        self.disconnecting = False
        self.connected = True
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        self.takes = takes

    def writeSomeData(self, data: bytes) -> int:  # noqa: N802
        self.sent.append(data[: self.takes])
        return min(len(data), self.takes)

    def write(self, data: bytes) -> None:
        self.queued.append(data)


def test_write_now_sends_at_once_when_nothing_is_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "PLAIN_TCP", (_FakeTcp,))
    t = _FakeTcp()
    relay.write_now(t, b"a OK\r\n")
    assert t.sent == [b"a OK\r\n"] and t.queued == []
    partial = _FakeTcp(takes=3)
    relay.write_now(partial, b"abcdef")
    assert partial.sent == [b"abc"] and partial.queued == [b"def"]
    busy = _FakeTcp(queued=b"earlier")
    relay.write_now(busy, b"later")
    assert busy.sent == [] and busy.queued == [b"later"]  # order kept
    tls = _FakeTcp(tls=True)
    relay.write_now(tls, b"secret")
    assert tls.sent == [] and tls.queued == [b"secret"]  # never around the TLS layer

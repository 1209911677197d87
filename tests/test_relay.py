"""Relay: bytes pass untouched; the tracker beside them decides BYE, keepalive and drain."""

from __future__ import annotations

from helpers import Harness

from imapproxy.config import Timeouts
from imapproxy.imapwire import BYE_BACKEND_GONE, STILL_HERE


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

"""SessionRegistry: one sweep for all sessions, and the drain that ends when they are gone."""

from __future__ import annotations

from helpers import Harness


def test_drain_with_no_sessions_fires_at_once() -> None:
    h = Harness()
    assert h.registry.drain(timeout=5).called


def test_drain_fires_when_the_last_session_goes() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"s SELECT INBOX\r\n")  # in flight: the drain waits
    drained = h.registry.drain(timeout=30)
    assert not drained.called and h.registry.draining
    backend.dataReceived(b"s OK done\r\n")  # now quiet: BYE, LOGOUT, close
    assert client not in h.registry.sessions
    assert backend.transport.value().endswith(b"PXYDRAIN LOGOUT\r\n")
    # The drain also waits for the backend to answer our LOGOUT and close.
    assert not drained.called and backend in h.registry.closing
    backend.connectionLost()
    assert drained.called


def test_sweep_only_ticks_relayed_sessions() -> None:
    h = Harness()
    waiting, _ = h.connect_client()
    relayed, _, _ = h.logged_in_client()
    assert waiting.relay is None and relayed.relay is not None
    h.registry.sweep(h.config.timeouts)  # must not fail on the pre-login one
    assert {waiting, relayed} <= h.registry.sessions

"""SessionRegistry: one sweep for all sessions, and the drain that ends when they are gone."""

from __future__ import annotations

from helpers import Harness
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure


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


def test_drain_does_not_wait_for_a_backend_gone_before_its_client() -> None:
    """The backend may answer our LOGOUT and close while the BYE to the client is still
    being flushed: the drain must not wait for that backend then (it once held a SIGTERM
    up for the whole [timeouts] drain, 30 s)."""
    h = Harness()
    client, transport, backend = h.logged_in_client(lost_at_once=False)
    drained = h.registry.drain(timeout=30)
    assert backend.transport.value().endswith(b"PXYDRAIN LOGOUT\r\n")
    assert transport.disconnecting and client in h.registry.sessions  # BYE being flushed
    backend.dataReceived(b"* BYE Logging out\r\nPXYDRAIN OK Logout completed.\r\n")
    backend.connectionLost()
    assert not drained.called  # the client's connection is still there
    client.connectionLost(Failure(ConnectionDone()))
    assert client not in h.registry.sessions and backend not in h.registry.closing
    assert drained.called


def test_sweep_only_ticks_relayed_sessions() -> None:
    h = Harness()
    waiting, _ = h.connect_client()
    relayed, _, _ = h.logged_in_client()
    assert waiting.relay is None and relayed.relay is not None
    h.registry.sweep(h.config.timeouts)  # must not fail on the pre-login one
    assert {waiting, relayed} <= h.registry.sessions

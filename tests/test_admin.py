"""admin: listing and kicking sessions on a MemoryReactorClock, and the HTTP resource."""

from __future__ import annotations

import json
from typing import Any

from helpers import Harness
from twisted.web.test.requesthelper import DummyRequest

from imapproxy.admin import AdminResource, describe, kick, parse_backend, select
from imapproxy.relay import BYE_SHUTDOWN


def closed(transport: Any) -> bool:
    return bool(getattr(transport, "disconnecting", False) or not transport.connected)


def call(resource: AdminResource, method: bytes, path: bytes,
         args: dict[bytes, list[bytes]] | None = None,
         headers: dict[bytes, bytes] | None = None) -> tuple[int, Any]:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.method = method
    request.path = path
    request.args = args or {}
    for name, value in (headers or {}).items():
        request.requestHeaders.addRawHeader(name, value)
    body = resource.render(request)
    return request.responseCode or 200, json.loads(body)


def test_describe_and_list() -> None:
    h = Harness(routes="alice 10.0.0.1:143\nbob 10.0.0.2\n")
    h.connect_client()
    alice, _, backend = h.logged_in_client()
    alice.dataReceived(b"i1 IDLE\r\n")
    backend.dataReceived(b"+ idling\r\n")
    info = describe(alice)
    assert info["user"] == "alice" and info["client"] == "192.0.2.7:40000"
    assert info["backend"] == "10.0.0.1:143" and info["state"] == "idle"
    assert info["protocol"] == "imap" and info["since"] == alice.started
    code, body = call(AdminResource(h.registry, h.reactor), b"GET", b"/sessions")
    assert code == 200
    assert sorted(s["state"] for s in body["sessions"]) == ["idle", "pre-auth"]


def test_select_by_user_and_backend() -> None:
    h = Harness(routes="alice 10.0.0.1:143\nbob 10.0.0.2\n")
    alice, _, _ = h.logged_in_client()
    bob, _, _ = h.logged_in_client(b"bob")
    h.connect_client()  # not logged in: never selected
    sessions = h.registry.sessions
    assert select(sessions, user="ALICE") == [alice]
    assert select(sessions, backend=("10.0.0.2", 143)) == [bob]  # the [backend] default port
    assert select(sessions, backend=("10.0.0.2", None)) == [bob]
    assert select(sessions, backend=("10.0.0.2", 144)) == []
    assert parse_backend("store1:143") == ("store1", 143)
    assert parse_backend("[2001:db8::1]:993") == ("2001:db8::1", 993)
    assert parse_backend("store1") == ("store1", None)


def test_kick_ends_idle_at_once_and_waits_for_a_command_in_flight() -> None:
    h = Harness()
    idler, idler_transport, idler_backend = h.logged_in_client()
    idler.dataReceived(b"i1 IDLE\r\n")
    idler_backend.dataReceived(b"+ idling\r\n")
    idler_transport.clear()
    idler_backend.transport.clear()
    busy, busy_transport, busy_backend = h.logged_in_client()
    busy.dataReceived(b"f1 FETCH 1:* (FLAGS)\r\n")
    busy_backend.transport.clear()
    resource = AdminResource(h.registry, h.reactor)
    code, body = call(resource, b"POST", b"/kick", {b"user": [b"alice"]})
    assert code == 200 and body["kicked"] == 2
    assert idler_backend.transport.value() == b"DONE\r\nPXYDRAIN LOGOUT\r\n"
    assert idler_transport.value() == BYE_SHUTDOWN and closed(idler_transport)
    assert idler.end_reason == "kicked"
    assert not closed(busy_transport)  # the FETCH answer is still coming
    busy_backend.dataReceived(b"* 1 FETCH (FLAGS ())\r\nf1 OK done\r\n")
    assert busy_transport.value().endswith(b"f1 OK done\r\n" + BYE_SHUTDOWN)
    assert closed(busy_transport)


def test_kick_closes_for_sure_after_the_drain_timeout() -> None:
    h = Harness()
    client, transport, backend = h.logged_in_client()
    client.dataReceived(b"a1 APPEND INBOX {100}\r\n")  # and the literal never comes
    kick(client, h.reactor, 30.0)
    assert not closed(transport)
    h.reactor.advance(30)
    assert closed(transport) and client.end_reason == "kicked"


def test_kick_pop3_session_closes_without_quit() -> None:
    h = Harness(protocol="pop3")
    client, transport = h.connect_client()
    client.dataReceived(b"USER alice\r\nPASS secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(b"+OK ready\r\n")
    backend.dataReceived(b"+OK\r\nUSER\r\n.\r\n")
    backend.dataReceived(b"+OK\r\n")
    backend.dataReceived(b"+OK logged in\r\n")
    assert client.relay is not None
    backend.transport.clear()
    kick(client, h.reactor, 30.0)
    assert closed(transport) and b"QUIT" not in backend.transport.value()


def test_kick_by_backend_through_the_resource() -> None:
    h = Harness(routes="alice 10.0.0.1:143\nbob 10.0.0.2:143\n")
    h.logged_in_client()
    bob, bob_transport, _ = h.logged_in_client(b"bob")
    code, body = call(AdminResource(h.registry, h.reactor), b"POST", b"/kick",
                      {b"backend": [b"10.0.0.2:143"]})
    assert body["kicked"] == 1 and body["ids"] == [bob.session_id]
    assert closed(bob_transport)


def test_drain_and_errors() -> None:
    h = Harness()
    h.logged_in_client()
    resource = AdminResource(h.registry, h.reactor)
    assert call(resource, b"POST", b"/kick")[0] == 400
    assert call(resource, b"POST", b"/kick", {b"user": [b"a"], b"backend": [b"b:1"]})[0] == 400
    assert call(resource, b"POST", b"/kick", {b"backend": [b"x:99999"]})[0] == 400
    assert call(resource, b"GET", b"/kick")[0] == 405
    assert call(resource, b"GET", b"/nope")[0] == 404
    code, body = call(resource, b"GET", b"/sessions", headers={b"origin": b"http://evil"})
    assert code == 403
    code, body = call(resource, b"POST", b"/drain")
    assert code == 200 and body["draining"] == 1
    assert h.registry.draining
    assert h.registry.sessions == set()  # the quiet session ended at once

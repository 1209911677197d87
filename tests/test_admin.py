"""admin: listing and kicking sessions on a MemoryReactorClock, and the HTTP resource:
who may ask (token, Host, Origin), drain and undrain."""

from __future__ import annotations

import json
from typing import Any

from helpers import Harness
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.test.requesthelper import DummyRequest

from imapproxy.admin import AdminResource, describe, kick, parse_backend, select
from imapproxy.config import Timeouts
from imapproxy.credentials import Secret
from imapproxy.imapwire import BYE_SHUTDOWN
from imapproxy.service import DrainService
from imapproxy.transports import LOGOUT_GRACE

TOKEN = b"0123456789abcdef0123456789abcdef"
ADDRESS = b"127.0.0.1:9144"
#: what imapproxy-admin sends to a TCP address
GOOD = {b"host": ADDRESS, b"authorization": b"Bearer " + TOKEN}


def closed(transport: Any) -> bool:
    return bool(getattr(transport, "disconnecting", False) or not transport.connected)


def on_socket(h: Harness) -> AdminResource:
    """The API on a UNIX socket without a token: any Host, no Authorization."""
    return AdminResource(h.current, h.reactor, authority=None, token=None)


def on_tcp(h: Harness) -> AdminResource:
    return AdminResource(h.current, h.reactor, authority=ADDRESS.decode(),
                         token=Secret(TOKEN))


def request_for(method: bytes, path: bytes, args: dict[bytes, list[bytes]] | None = None,
                headers: dict[bytes, bytes] | list[tuple[bytes, bytes]] | None = None
                ) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.method = method
    request.path = path
    request.args = args or {}
    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    for name, value in pairs:
        request.requestHeaders.addRawHeader(name, value)
    return request


def call(resource: AdminResource, method: bytes, path: bytes,
         args: dict[bytes, list[bytes]] | None = None,
         headers: dict[bytes, bytes] | list[tuple[bytes, bytes]] | None = None
         ) -> tuple[int, Any]:
    request = request_for(method, path, args, headers)
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
    code, body = call(on_socket(h), b"GET", b"/sessions")
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
    resource = on_socket(h)
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
    code, body = call(on_socket(h), b"POST", b"/kick",
                      {b"backend": [b"10.0.0.2:143"]})
    assert body["kicked"] == 1 and body["ids"] == [bob.session_id]
    assert closed(bob_transport)


def test_drain_and_errors() -> None:
    h = Harness()
    h.logged_in_client()
    resource = on_socket(h)
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


# -- who may ask -------------------------------------------------------------------------------


def test_tcp_requests_need_the_bearer_token() -> None:
    h = Harness()
    h.logged_in_client()
    resource = on_tcp(h)
    request = request_for(b"GET", b"/sessions", headers={b"host": ADDRESS})
    body = json.loads(resource.render(request))
    assert request.responseCode == 401 and "no bearer token" in body["error"]
    # RFC 6750 section 3: the challenge; error="invalid_token" only for a wrong one.
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="imapproxy-admin"']
    request = request_for(b"GET", b"/sessions",
                          headers={b"host": ADDRESS, b"authorization": b"Bearer " + TOKEN[:-1]})
    resource.render(request)
    assert request.responseCode == 401
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="imapproxy-admin", error="invalid_token"']
    for wrong in (b"Basic " + TOKEN, TOKEN, b"Bearer", b"Bearer " + TOKEN + b"x",
                  b"Bearer " + TOKEN.upper()):
        assert call(resource, b"GET", b"/sessions",
                    headers={b"host": ADDRESS, b"authorization": wrong})[0] == 401, wrong
    code, body = call(resource, b"GET", b"/sessions", headers=GOOD)
    assert code == 200 and [s["user"] for s in body["sessions"]] == ["alice"]
    # The scheme is case-insensitive (RFC 9110 section 11.1).
    assert call(resource, b"GET", b"/sessions",
                headers={b"host": ADDRESS, b"authorization": b"bearer  " + TOKEN})[0] == 200


def test_tcp_requests_need_this_listeners_own_host() -> None:
    h = Harness()
    h.logged_in_client()
    resource = on_tcp(h)
    token = (b"authorization", b"Bearer " + TOKEN)
    for host in (b"evil.example:9144",  # a page whose name was rebound to 127.0.0.1
                 b"evil.example", b"localhost:9144", b"127.0.0.1", b"127.0.0.1:9145",
                 b"127.0.0.1:9144.evil.example", b""):
        code, body = call(resource, b"GET", b"/sessions", headers=[(b"host", host), token])
        assert code == 421, host
        assert body["error"] == "the Host header must be 127.0.0.1:9144"
    assert call(resource, b"GET", b"/sessions", headers=[token])[0] == 421  # no Host
    assert call(resource, b"GET", b"/sessions",
                headers=[(b"host", ADDRESS), (b"host", b"evil.example"), token])[0] == 421
    # A wrong Host is refused before the token is looked at, so a page learns nothing.
    assert call(resource, b"GET", b"/sessions", headers={b"host": b"evil.example:9144"})[0] == 421
    assert call(resource, b"GET", b"/sessions", headers=[(b"host", b"127.0.0.1:9144"),
                                                         token])[0] == 200


def test_worker_ipv6_and_port_80_authorities() -> None:
    h = Harness()
    token = Secret(TOKEN)
    worker_2 = AdminResource(h.current, h.reactor, authority="[::1]:9146", token=token)
    auth = (b"authorization", b"Bearer " + TOKEN)
    assert call(worker_2, b"GET", b"/sessions", headers=[(b"host", b"[::1]:9146"), auth])[0] == 200
    assert call(worker_2, b"GET", b"/sessions", headers=[(b"host", b"[::1]:9144"), auth])[0] == 421
    port_80 = AdminResource(h.current, h.reactor, authority="127.0.0.1:80", token=token)
    for host in (b"127.0.0.1:80", b"127.0.0.1"):  # RFC 9110 section 7.2: 80 may be left out
        assert call(port_80, b"GET", b"/sessions", headers=[(b"host", host), auth])[0] == 200


def test_origin_is_refused_even_with_the_token() -> None:
    h = Harness()
    h.logged_in_client()
    code, body = call(on_tcp(h), b"POST", b"/drain",
                      headers={**GOOD, b"origin": b"http://127.0.0.1:9144"})
    assert code == 403 and body["error"] == "browsers are not admins"
    assert not h.registry.draining


def test_socket_takes_any_host_but_a_configured_token_is_required() -> None:
    h = Harness()
    h.logged_in_client()
    plain = on_socket(h)
    assert call(plain, b"GET", b"/sessions", headers={b"host": b"localhost"})[0] == 200
    assert call(plain, b"GET", b"/sessions")[0] == 200
    with_token = AdminResource(h.current, h.reactor, authority=None, token=Secret(TOKEN))
    assert call(with_token, b"GET", b"/sessions", headers={b"host": b"localhost"})[0] == 401
    assert call(with_token, b"GET", b"/sessions",
                headers={b"host": b"anything", b"authorization": b"Bearer " + TOKEN})[0] == 200


def test_refused_requests_change_nothing_and_are_logged_without_the_token() -> None:
    h = Harness()
    client, transport, _ = h.logged_in_client()
    resource = on_tcp(h)
    with capturedLogs() as events:
        assert call(resource, b"POST", b"/kick", {b"user": [b"alice"]},
                    headers={b"host": ADDRESS, b"authorization": b"Bearer wrong-" + TOKEN})[0] \
            == 401
        assert call(resource, b"POST", b"/drain", headers={b"host": b"evil.example:9144",
                                                           b"authorization": b"Bearer " + TOKEN}
                    )[0] == 421
    assert not closed(transport) and not h.registry.draining
    lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(lines) == 2, lines
    assert "refused 'POST /kick'" in lines[0] and "a wrong bearer token" in lines[0]
    assert "Host ['evil.example:9144']" in lines[1]
    assert all(TOKEN.decode() not in line for line in map(formatEvent, events))


# -- undrain -----------------------------------------------------------------------------------


def drain_deadlines(h: Harness) -> list[Any]:
    return [call for call in h.reactor.getDelayedCalls()
            if call.active() and call.func == h.registry._force_close]


def test_undrain_lets_new_sessions_in_and_the_old_deadline_spares_them() -> None:
    h = Harness()
    resource = on_socket(h)
    stuck, stuck_transport, _ = h.logged_in_client()
    stuck.dataReceived(b"f1 FETCH 1:* BODY[]\r\n")  # in flight, and never answered
    quiet, quiet_transport, _ = h.logged_in_client()
    code, body = call(resource, b"POST", b"/drain")
    assert code == 200 and body["draining"] == 2
    assert closed(quiet_transport) and not closed(stuck_transport)
    _, refused = h.connect_client()
    assert refused.value() == BYE_SHUTDOWN and closed(refused)
    [deadline] = drain_deadlines(h)
    assert deadline.getTime() == h.timeouts.drain

    code, body = call(resource, b"POST", b"/undrain")
    assert code == 200 and body["draining"] is False and body["ending"] == 1
    assert not h.registry.draining
    late, late_transport, _ = h.logged_in_client()  # a new login goes through
    assert late.relay is not None and not closed(late_transport)
    assert quiet.disconnected and quiet not in h.registry.sessions  # ended by the drain
    # The drain's deadline still ends what the drain began, and only that.
    h.reactor.advance(h.timeouts.drain)
    assert closed(stuck_transport) and stuck.end_reason == "drain timeout"
    assert late in h.registry.sessions
    assert drain_deadlines(h) == []
    # Undrain with nothing drained is a no-op that says so.
    assert call(resource, b"POST", b"/undrain")[0] == 200


def test_a_drain_after_an_undrain_works_again() -> None:
    h = Harness()
    resource = on_socket(h)
    h.logged_in_client()
    call(resource, b"POST", b"/drain")
    call(resource, b"POST", b"/undrain")
    h.reactor.advance(LOGOUT_GRACE)  # the drained session's backend is closed by now
    assert drain_deadlines(h) == []  # and the drain had nothing left to wait for
    busy, busy_transport, busy_backend = h.logged_in_client()
    busy.dataReceived(b"s SELECT INBOX\r\n")
    drained = h.registry.drain(timeout=10)
    assert h.registry.draining and not drained.called
    busy_backend.dataReceived(b"s OK done\r\n")  # now quiet: BYE to the client, LOGOUT
    assert closed(busy_transport) and not drained.called
    busy_backend.connectionLost()  # the backend answered our LOGOUT: the drain is over
    assert drained.called
    assert drain_deadlines(h) == []  # its deadline went with it


def test_undrain_is_refused_while_the_process_stops() -> None:
    h = Harness()
    resource = on_socket(h)
    client, transport, _ = h.logged_in_client()
    client.dataReceived(b"f1 FETCH 1:* BODY[]\r\n")
    stopping = DrainService(h.current).stopService()  # what SIGTERM does
    code, body = call(resource, b"POST", b"/undrain")
    assert code == 409 and "stopping" in body["error"]
    assert h.registry.draining
    _, refused = h.connect_client()
    assert refused.value() == BYE_SHUTDOWN and closed(refused)
    assert call(resource, b"GET", b"/undrain")[0] == 405
    h.reactor.advance(h.timeouts.drain)
    assert closed(transport) and stopping.called


def test_a_drain_with_a_notice_says_503_first_and_undrain_calls_it_off() -> None:
    h = Harness(timeouts=Timeouts(drain_notice=3.0))
    resource = on_socket(h)
    client, transport, _ = h.logged_in_client()
    code, body = call(resource, b"POST", b"/drain")
    assert code == 200 and body["draining"] == 1 and body["notice"] == 3.0
    # The notice: not ready (a load balancer takes us out), every session goes on, and a
    # new one is still served.
    assert h.registry.leaving and not h.registry.draining and not closed(transport)
    newcomer, newcomer_transport, _ = h.logged_in_client()
    assert newcomer.relay is not None
    call(resource, b"POST", b"/drain")  # asked again: still the one drain, in 3 s
    h.reactor.advance(2.9)
    assert not h.registry.draining and not closed(transport)
    h.reactor.advance(0.1)
    assert h.registry.draining and closed(transport) and closed(newcomer_transport)
    # Undrain during a notice: the drain never begins.
    call(resource, b"POST", b"/undrain")
    h.reactor.advance(LOGOUT_GRACE)
    late, late_transport, _ = h.logged_in_client()
    call(resource, b"POST", b"/drain")
    assert h.registry.leaving
    code, _body = call(resource, b"POST", b"/undrain")
    assert code == 200 and not h.registry.leaving
    h.reactor.advance(10)
    assert not h.registry.draining and not closed(late_transport)

# -*- test-case-name: tests.test_admin -*-
"""The local admin API on ``[admin] address``: list sessions, kick them, drain.

HTTP with JSON bodies, on a loopback address or a UNIX socket (the config refuses
anything else: whoever reaches it can end anyone's session). The CLI
``imapproxy-admin`` (admincli.py) is its client.

    GET  /sessions                    every session of this process
    POST /kick?user=alice             end alice's sessions
    POST /kick?backend=host:port      end every session on that backend
    POST /drain                       end every session gracefully, refuse new ones

Moving a user between stores: change the directory, then kick the user; the
client reconnects and lands on the new store. A kick ends the session the way a
drain does (at a command boundary: an APPEND in flight completes; IDLE gets DONE
and LOGOUT), with ``* BYE`` to the client, and closes what is left after
``[timeouts] drain``.

A browser on the same host must not be a way in (DNS rebinding, a form posting to
127.0.0.1): requests carrying an Origin header are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .config import parse_address
from .metrics import QuietSite, session_protocol, session_state

log = Logger(namespace="imapproxy")


def describe(session: Any) -> dict[str, Any]:
    """One session as the API lists it."""
    peer = session.transport.getPeer() if session.transport is not None else None
    backend = session.backend
    return {
        "id": session.session_id,
        "pid": os.getpid(),
        "protocol": session_protocol(session),
        "user": session.user,
        "client": _address(peer),
        "backend": str(backend.server) if backend is not None else "",
        "state": session_state(session),
        "since": session.started,
        "bytes_in": session.bytes_from_client,
        "bytes_out": session.bytes_to_client,
    }


def _address(peer: Any) -> str:
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer) if peer is not None else ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{peer.port}"


def _backend_port(session: Any) -> int | None:
    server = session.backend.server
    if server.port is not None:
        return int(server.port)
    backend = session.factory.config.backend
    return int(backend.imap_port if session_protocol(session) == "imap" else backend.pop3_port)


def parse_backend(text: str) -> tuple[str, int | None]:
    """ "host:port", "[v6]:port" or a bare host (any port); raises ValueError."""
    if text.startswith("[") or text.count(":") == 1:
        return parse_address(text)
    if not text:
        raise ValueError("empty backend")
    return text, None


def select(sessions: Iterable[Any], user: str | None = None,
           backend: tuple[str, int | None] | None = None) -> list[Any]:
    """The logged-in sessions of ``user`` (case-insensitive) or on ``backend``."""
    chosen = []
    for session in sessions:
        if session.backend is None or session.disconnected:
            continue
        if user is not None and session.user.lower() != user.lower():
            continue
        if backend is not None:
            host, port = backend
            if session.backend.server.host.lower() != host.lower():
                continue
            if port is not None and _backend_port(session) != port:
                continue
        chosen.append(session)
    return chosen


def kick(session: Any, clock: Any, grace: float) -> None:
    """End a session as a drain would, then for sure after ``grace`` seconds."""
    if session.disconnected:
        return
    session.end_reason = session.end_reason or "kicked"
    relay = session.relay
    if relay is None:
        session.close("kicked")
        return
    relay.drain()
    if not session.disconnected:
        clock.callLater(grace, _force_close, session)


def _force_close(session: Any) -> None:
    if not session.disconnected:
        session.close("kicked", abort=True)


class AdminResource(Resource):
    """The admin API over a SessionRegistry."""

    isLeaf = True

    def __init__(self, registry: Any, clock: Any) -> None:
        super().__init__()
        self.registry = registry
        self.clock = clock

    def render(self, request: Request) -> bytes:
        if request.getHeader(b"origin") is not None:
            return self._reply(request, 403, {"error": "browsers are not admins"})
        path = request.path.rstrip(b"/")
        method = request.method
        if path == b"/sessions" and method == b"GET":
            sessions = [describe(s) for s in list(self.registry.sessions) if not s.disconnected]
            sessions.sort(key=lambda s: s["since"])
            return self._reply(request, 200, {"pid": os.getpid(), "sessions": sessions})
        if path == b"/kick" and method == b"POST":
            return self._kick(request)
        if path == b"/drain" and method == b"POST":
            count = len(self.registry.sessions)
            log.info("admin: drain requested ({count} sessions)", count=count)
            self.registry.drain()
            return self._reply(request, 200, {"pid": os.getpid(), "draining": count})
        if path in (b"/sessions", b"/kick", b"/drain"):
            return self._reply(request, 405, {"error": "method not allowed"})
        return self._reply(request, 404, {"error": "not found",
                                          "try": ["GET /sessions", "POST /kick?user=U",
                                                  "POST /kick?backend=HOST:PORT",
                                                  "POST /drain"]})

    def _kick(self, request: Request) -> bytes:
        args = request.args or {}
        users = args.get(b"user", [])
        backends = args.get(b"backend", [])
        if len(users) + len(backends) != 1:
            return self._reply(request, 400, {"error": "give one user= or one backend="})
        try:
            if users:
                user = users[0].decode("utf-8")
                chosen = select(self.registry.sessions, user=user)
                what = f"user={user}"
            else:
                text = backends[0].decode("utf-8")
                chosen = select(self.registry.sessions, backend=parse_backend(text))
                what = f"backend={text}"
        except (UnicodeDecodeError, ValueError) as e:
            return self._reply(request, 400, {"error": str(e)})
        log.info("admin: kick {what}: {count} sessions", what=what, count=len(chosen))
        grace = self.registry.timeouts.drain
        for session in chosen:
            kick(session, self.clock, grace)
        return self._reply(request, 200, {"pid": os.getpid(), "kicked": len(chosen),
                                          "ids": [s.session_id for s in chosen]})

    @staticmethod
    def _reply(request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"


def admin_site(registry: Any, clock: Any) -> QuietSite:
    site = QuietSite(AdminResource(registry, clock))
    return site

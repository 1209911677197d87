# -*- test-case-name: tests.test_admin -*-
"""The local admin API on ``[admin] address``: list sessions, kick them, drain, undrain.

HTTP with JSON bodies, on a UNIX socket (the default: mode 0600, so only the service
user and root reach it) or a loopback address with a bearer token (the config refuses
anything else: whoever reaches it can end anyone's session). The CLI
``imapproxy-admin`` (admincli.py) is its client.

    GET  /sessions                    every session of this process
    POST /kick?user=alice             end alice's sessions
    POST /kick?backend=host:port      end every session on that backend
    POST /drain                       end every session gracefully, refuse new ones
                                      (after [timeouts] drain_notice, /readyz 503 meanwhile)
    POST /undrain                     accept new sessions again (409 while stopping)

Moving a user between stores: change the directory, then kick the user; the
client reconnects and lands on the new store. A kick ends the session the way a
drain does (at a command boundary: an APPEND in flight completes; IDLE gets DONE
and LOGOUT), with ``* BYE`` to the client, and closes what is left after
``[timeouts] drain``.

Who may ask, checked on every request before anything else:

- a request with an Origin header is refused (403): a browser page is no admin;
- on TCP, the Host header must be this listener's own address, as configured (421
  otherwise): a page that rebinds its own DNS name to 127.0.0.1 sends its own name
  as Host, and so never reads /sessions;
- with ``[admin] token_file`` (required on TCP), ``Authorization: Bearer <token>``
  (RFC 6750 section 2.1), compared in constant time (401 otherwise). The token is
  never logged; refusals are, with the peer.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .config import Config, authority, parse_address
from .credentials import Secret
from .login import default_port
from .metrics import QuietSite, session_protocol, session_state
from .transports import tcp_server_endpoint

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
    return default_port(session.runtime.config.backend, session_protocol(session))


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


#: what a 404 suggests
ROUTES = ["GET /sessions", "POST /kick?user=U", "POST /kick?backend=HOST:PORT", "POST /drain",
          "POST /undrain"]


class AdminResource(Resource):
    """The admin API over a SessionRegistry.

    ``authority``: the Host header every request must carry ("127.0.0.1:9144"), or None
    on a UNIX socket, which no browser reaches. ``token``: the bearer token every request
    must carry, or None (a UNIX socket without ``token_file``).
    """

    isLeaf = True

    def __init__(self, current: Any, clock: Any, *, authority: str | None,
                 token: Secret | None) -> None:
        super().__init__()
        #: the runtime in force (runtime.Current): its sessions and its drain time
        self.current = current
        self.clock = clock
        self.authority = authority
        self.token = token

    @property
    def registry(self) -> Any:
        return self.current.runtime.registry

    @property
    def grace(self) -> float:
        """[timeouts] drain: how long a drain or a kick waits for commands in flight."""
        return float(self.current.runtime.config.timeouts.drain)

    def render(self, request: Request) -> bytes:
        refused = self._refusal(request)
        if refused is not None:
            return refused
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
            notice = float(self.current.runtime.config.timeouts.drain_notice)
            log.info("admin: drain requested ({count} sessions)", count=count)
            self.registry.drain_after(notice, self.grace)
            return self._reply(request, 200, {"pid": os.getpid(), "draining": count,
                                              "notice": notice})
        if path == b"/undrain" and method == b"POST":
            return self._undrain(request)
        if path in (b"/sessions", b"/kick", b"/drain", b"/undrain"):
            return self._reply(request, 405, {"error": "method not allowed"})
        return self._reply(request, 404, {"error": "not found", "try": ROUTES})

    def _refusal(self, request: Request) -> bytes | None:
        """The answer to a request that may not be served, or None if it may."""
        if request.getHeader(b"origin") is not None:
            _refused(request, "an Origin header (a browser)")
            return self._reply(request, 403, {"error": "browsers are not admins"})
        if self.authority is not None:
            hosts = request.requestHeaders.getRawHeaders(b"host") or []
            # One Host, naming this listener (RFC 9112 section 3.2: none or several is a
            # bad request anyway). An exact match, so a rebound DNS name never passes.
            if len(hosts) != 1 or hosts[0].decode("latin-1").lower() not in self._hosts():
                _refused(request, "Host is not this listener's address",
                         [h.decode("latin-1") for h in hosts])
                # RFC 9110 section 15.5.20: not the server for this authority.
                return self._reply(request, 421, {
                    "error": f"the Host header must be {self.authority}"},
                    b"Misdirected Request")
        if self.token is not None:
            given = _bearer(request.getHeader(b"authorization"))
            if given is None or not hmac.compare_digest(given, self.token.reveal()):
                reason = "no bearer token" if given is None else "a wrong bearer token"
                _refused(request, reason)
                # RFC 6750 section 3: the challenge, with error= when a token was wrong.
                challenge = b'Bearer realm="imapproxy-admin"'
                if given is not None:
                    challenge += b', error="invalid_token"'
                request.setHeader(b"www-authenticate", challenge)
                return self._reply(request, 401, {
                    "error": f"{reason}: send Authorization: Bearer <the [admin] token_file>"})
        return None

    def _hosts(self) -> tuple[str, ...]:
        assert self.authority is not None
        # A client may leave out the default port 80 (RFC 9110 section 7.2).
        if self.authority.endswith(":80"):
            return (self.authority, self.authority[:-3])
        return (self.authority,)

    def _undrain(self, request: Request) -> bytes:
        log.info("admin: undrain requested")
        if not self.registry.undrain():
            return self._reply(request, 409, {"error": "the proxy is stopping: it cannot "
                                                       "take new sessions any more"})
        return self._reply(request, 200, {"pid": os.getpid(), "draining": False,
                                          "ending": len(self.registry.sessions)})

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
        grace = self.grace
        for session in chosen:
            kick(session, self.clock, grace)
        return self._reply(request, 200, {"pid": os.getpid(), "kicked": len(chosen),
                                          "ids": [s.session_id for s in chosen]})

    @staticmethod
    def _reply(request: Request, code: int, body: dict[str, Any],
               message: bytes | None = None) -> bytes:
        request.setResponseCode(code, message)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"


def _bearer(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 section 2.1;
    the scheme is case-insensitive, RFC 9110 section 11.1), else None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def _peer(request: Request) -> str:
    """Who sent a request: host:port, or on a UNIX socket the uid and pid (SO_PEERCRED)."""
    address = request.getClientAddress()
    if getattr(address, "host", None) is not None:
        return _address(address)
    try:
        handle = request.channel.transport.getHandle()  # type: ignore[union-attr]
        pid, uid, _ = struct.unpack("3i", handle.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (AttributeError, OSError):
        return "a local peer"
    return f"uid {uid} pid {pid}"


def _refused(request: Request, reason: str, hosts: list[str] | None = None) -> None:
    # Never the Authorization header; the peer's own text (path, Host) only as repr.
    what = (request.method + b" " + request.path).decode("latin-1")[:200]
    log.warn("admin: refused {request} from {peer}: {reason}{host}", request=repr(what),
             peer=_peer(request), reason=reason,
             host=f" (Host {hosts!r})" if hosts is not None else "")


def admin_site(current: Any, clock: Any, *, authority: str | None,
               token: Secret | None) -> QuietSite:
    return QuietSite(AdminResource(current, clock, authority=authority, token=token))


def admin_endpoint(reactor: Any, config: Config, index: int) -> Any:
    """Where worker ``index`` serves the API: the socket path (".index" appended after
    worker 0), or the TCP port plus the index."""
    admin = config.admin
    assert admin is not None
    if admin.socket is not None:
        path = Path(f"{admin.socket}.{index}" if index else str(admin.socket))
        _remove_stale_socket(path)
        return UNIXServerEndpoint(reactor, str(path), mode=0o600)
    return tcp_server_endpoint(reactor, admin.host, admin.port + index)


def admin_authority(config: Config, index: int) -> str | None:
    """The Host header worker ``index``'s admin API accepts: its own address (the
    configured port plus the index); None on a UNIX socket, where any Host is fine."""
    admin = config.admin
    assert admin is not None
    if admin.socket is not None:
        return None
    return authority(admin.host, admin.port + index)


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a process that died would make bind() fail."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass

"""A small OAuth 2.0 token introspection endpoint (RFC 7662) for Dovecot's oauth2 passdb.

Dovecot posts ``token=<token>`` (``introspection_mode = post``) and reads ``active`` and
``username`` from the JSON answer. The table of tokens is the test's: a valid token
names its user; an expired one answers ``{"active": false}`` as RFC 7662 section 2.2
says an authorization server does; an unknown one too. Every token asked about is
recorded, so a test can tell that a token never reached the endpoint.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode("ascii", "replace"))
        token = form.get("token", [""])[0]
        self.server.endpoint.asked.append(token)
        user = self.server.endpoint.tokens.get(token)
        answer = {"active": True, "username": user} if user else {"active": False}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet: tokens would go to stderr


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: TokenIntrospection


class TokenIntrospection:
    """The endpoint on a free port of 127.0.0.1, served from a thread until close()."""

    def __init__(self, tokens: dict[str, str]) -> None:
        #: token -> user; tokens not in it (expired ones too) are inactive
        self.tokens = dict(tokens)
        #: every token asked about, in order
        self.asked: list[str] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.endpoint = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/introspect"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="token-introspection", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> TokenIntrospection:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

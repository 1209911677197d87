"""admincli: addresses per worker, the table, the token, and the commands against a stub
API (the real one is asked in tests/integration/test_operator.py)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from rig.proxy import ADMIN_TOKEN, admin_token_file

from imapproxy import admincli
from imapproxy.admincli import AdminError, format_sessions, request, run, worker_addresses

SESSION = {"id": 3, "pid": 100, "protocol": "imap", "user": "alice",
           "client": "192.0.2.7:40000", "backend": "store1:143", "state": "idle",
           "since": 1000.0, "bytes_in": 1, "bytes_out": 2}


class _Api(BaseHTTPRequestHandler):
    calls: list[tuple[str, str]] = []
    #: (Host, Authorization) of each request
    seen: list[tuple[str | None, str | None]] = []
    #: the token to insist on, as the real API does; None: any
    token: str | None = None
    #: what /drain says of [timeouts] drain_notice (older proxies say nothing)
    notice: float | None = None

    def _answer(self) -> None:
        self.calls.append((self.command, self.path))
        authorization = self.headers.get("authorization")
        self.seen.append((self.headers.get("host"), authorization))
        if self.token is not None and authorization != f"Bearer {self.token}":
            self._send(401, {"error": "no bearer token"})
            return
        if self.path.startswith("/sessions"):
            body: Any = {"pid": 100, "sessions": [SESSION, {**SESSION, "id": 4, "user": "bob",
                                                            "since": 900.0}]}
        elif self.path.startswith("/kick"):
            body = {"kicked": 2, "ids": [3, 4]}
        elif self.path == "/drain":
            body = {"draining": 5}
            if self.notice is not None:
                body["notice"] = self.notice
        elif self.path == "/undrain":
            body = {"draining": False, "ending": 1}
        else:
            self._send(404, {"error": "not found"})
            return
        self._send(200, body)

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def _fresh_api() -> None:
    _Api.calls = []
    _Api.seen = []
    _Api.token = None


@pytest.fixture
def api() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_worker_addresses() -> None:
    assert worker_addresses("127.0.0.1:9144", 1) == ["127.0.0.1:9144"]
    assert worker_addresses("127.0.0.1:9144", 3) == ["127.0.0.1:9144", "127.0.0.1:9145",
                                                     "127.0.0.1:9146"]
    assert worker_addresses("[::1]:9144", 2) == ["[::1]:9144", "[::1]:9145"]
    assert worker_addresses("/run/a.sock", 2) == ["/run/a.sock", "/run/a.sock.1"]


def test_table_is_oldest_first() -> None:
    text = format_sessions([SESSION, {**SESSION, "user": "", "since": 900.0, "backend": ""}],
                           now=1000.0 + 3725)
    lines = text.splitlines()
    assert lines[0].split() == ["PID", "ID", "PROTO", "USER", "CLIENT", "BACKEND", "STATE",
                                "SINCE"]
    assert " - " in lines[1] and "(1h03m)" in lines[1]
    assert "alice" in lines[2] and "(1h02m)" in lines[2]


def test_commands(api: str) -> None:
    out = io.StringIO()
    assert run(["--address", api, "sessions", "--user", "ALICE", "--json"], out) == 0
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [3]
    out = io.StringIO()
    assert run(["--address", api, "sessions"], out, now=2000.0) == 0
    assert "bob" in out.getvalue() and "alice" in out.getvalue()
    out = io.StringIO()
    run(["--address", api, "kick", "--user", "alice@example.org"], out)
    assert out.getvalue() == "kicked 2 sessions (user alice@example.org)\n"
    run(["--address", api, "kick", "--backend", "[::1]:143"], out)
    out = io.StringIO()
    run(["--address", api, "drain"], out)
    assert out.getvalue() == "draining 5 sessions\n"
    assert ("POST", "/kick?user=alice%40example.org") in _Api.calls
    assert ("POST", "/kick?backend=%5B%3A%3A1%5D%3A143") in _Api.calls


def test_errors(api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AdminError, match="not found"):
        request(api, "GET", "/other")
    assert admincli.main(["--address", "127.0.0.1:1", "sessions"]) == 1
    assert "imapproxy-admin: 127.0.0.1:1:" in capsys.readouterr().err
    (tmp_path / "users.map").write_text("* h\n")
    config = tmp_path / "c.toml"
    config.write_text('[[listen]]\naddress = "127.0.0.1:1"\ntls = "none"\n'
                      '[directory]\nmap = "users.map"\n')
    assert admincli.main(["--config", str(config), "sessions"]) == 1
    assert "the admin API is off" in capsys.readouterr().err
    admin_token_file(tmp_path)
    config.write_text(config.read_text() + f'[admin]\naddress = "{api}"\n'
                      'token_file = "admin.token"\nworkers = 2\n')
    assert admincli.main(["--config", str(config), "drain"]) == 1  # no such key in [admin]
    assert "config error" in capsys.readouterr().err


def test_config_finds_every_worker_and_sends_the_token(api: str, tmp_path: Path) -> None:
    (tmp_path / "users.map").write_text("* h\n")
    admin_token_file(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(f'workers = 1\n[[listen]]\naddress = "127.0.0.1:1"\ntls = "none"\n'
                      f'[directory]\nmap = "users.map"\n[admin]\naddress = "{api}"\n'
                      'token_file = "admin.token"\n')
    _Api.token = ADMIN_TOKEN
    out = io.StringIO()
    assert run(["--config", str(config), "drain"], out) == 0
    assert out.getvalue() == "draining 5 sessions\n"
    # The Host names the address as configured; the token comes from [admin] token_file.
    assert _Api.seen == [(api, f"Bearer {ADMIN_TOKEN}")]
    out = io.StringIO()
    assert run(["--config", str(config), "undrain"], out) == 0
    assert out.getvalue() == "accepting new sessions again\n"
    assert _Api.calls[-1] == ("POST", "/undrain")
    with pytest.raises(AdminError, match="--token-file goes with --address"):
        run(["--config", str(config), "--token-file", str(tmp_path / "admin.token"), "drain"],
            out)


def test_address_with_a_token_file(api: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _Api.token = ADMIN_TOKEN
    # Without the token: the API's refusal, and what to do about it.
    assert admincli.main(["--address", api, "sessions"]) == 1
    err = capsys.readouterr().err
    assert "no bearer token" in err and "--token-file" in err
    token = admin_token_file(tmp_path)
    out = io.StringIO()
    assert run(["--address", api, "--token-file", str(token), "kick", "--user", "bob"], out) == 0
    assert out.getvalue() == "kicked 2 sessions (user bob)\n"
    assert _Api.seen[-1] == (api, f"Bearer {ADMIN_TOKEN}")
    for content, message in (("", "is empty"), ("\xff\xfe", "does not hold a token"),
                             (ADMIN_TOKEN + "\r\nX-Injected: 1", "does not hold a token")):
        token.write_bytes(content.encode("latin-1"))
        assert admincli.main(["--address", api, "--token-file", str(token), "drain"]) == 1
        assert message in capsys.readouterr().err
    assert admincli.main(["--address", api, "--token-file", str(tmp_path / "nope"), "drain"]) == 1
    assert "cannot read the token file" in capsys.readouterr().err


def test_default_is_the_documented_socket(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setattr(admincli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    args = admincli.parser().parse_args(["sessions"])
    assert admincli.targets(args) == (["/run/imapproxy/admin.sock"], None)


def test_unix_socket(tmp_path: Path) -> None:
    import socketserver

    class Server(socketserver.UnixStreamServer):
        pass

    class Handler(_Api):
        def address_string(self) -> str:
            return "unix"

    path = str(tmp_path / "admin.sock")
    server = Server(path, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert request(path, "POST", "/drain") == {"draining": 5}
        assert _Api.seen[-1] == ("localhost", None)  # no token unless one is configured
    finally:
        server.shutdown()
        server.server_close()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from imapproxy import __version__

    with pytest.raises(SystemExit) as exit_:
        admincli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"imapproxy-admin {__version__}\n"


def test_drain_says_when_an_announced_drain_begins(api: str) -> None:
    _Api.notice = 5.0
    try:
        out = io.StringIO()
        assert run(["--address", api, "drain"], out) == 0
    finally:
        _Api.notice = None
    assert out.getvalue() == "draining 5 sessions in 5s (/readyz answers 503 until then)\n"

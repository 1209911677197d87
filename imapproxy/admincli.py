# -*- test-case-name: tests.test_admincli -*-
"""``imapproxy-admin``: the command line client of the admin API (admin.py).

    imapproxy-admin sessions [--user U] [--json]
    imapproxy-admin kick --user U
    imapproxy-admin kick --backend HOST:PORT
    imapproxy-admin drain
    imapproxy-admin undrain

It finds the API through ``--config FILE`` ([admin] address and token_file; with
``workers = N`` it asks every worker, each listening on the port plus its index) or
``--address /path/to/admin.sock`` / ``--address HOST:PORT --token-file FILE``. Plain
stdlib: no Twisted, so it starts fast and works while the proxy is busy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .config import ConfigError, authority, is_token, load, parse_address

DEFAULT_CONFIG = "/etc/imapproxy/imapproxy.toml"
#: conf/imapproxy.toml's [admin] address (systemd's RuntimeDirectory=imapproxy)
DEFAULT_ADDRESS = "/run/imapproxy/admin.sock"
TIMEOUT = 10.0


class AdminError(Exception):
    """The API could not be reached or said no; the message is for the operator."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def worker_addresses(address: str, workers: int) -> list[str]:
    """The admin address of each worker: the port (or socket path) plus the index."""
    if workers <= 1:
        return [address]
    if address.startswith("/"):
        return [address] + [f"{address}.{i}" for i in range(1, workers)]
    host, port = parse_address(address)
    host = f"[{host}]" if ":" in host else host
    return [f"{host}:{port + i}" for i in range(workers)]


def request(address: str, method: str, path: str, timeout: float = TIMEOUT,
            token: bytes | None = None) -> Any:
    """One API call; the decoded JSON answer."""
    headers = {}
    if address.startswith("/"):
        connection: http.client.HTTPConnection = _UnixHTTPConnection(address, timeout)
    else:
        host, port = parse_address(address)
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        # The API takes only its own address as Host (admin.py), written as in the
        # config; http.client would leave out a port 80.
        headers["Host"] = authority(host, port)
    if token is not None:
        headers["Authorization"] = "Bearer " + token.decode("ascii")
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
    except PermissionError as e:
        # The socket is mode 0600 (admin.py).
        raise AdminError(f"{address}: {e.strerror} (run as the service user or root)") from None
    except OSError as e:
        raise AdminError(f"{address}: {e}") from None
    finally:
        connection.close()
    try:
        data = json.loads(body)
    except ValueError:
        raise AdminError(f"{address}: not a JSON answer (HTTP {response.status})") from None
    if response.status != 200:
        message = data.get("error", response.status)
        if response.status == 401 and token is None:
            message = f"{message} (give --config, or --token-file with --address)"
        raise AdminError(f"{address}: {message}")
    return data


def read_token(path: str) -> bytes:
    """The token in a token file, as the proxy reads it (stripped)."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise AdminError(f"cannot read the token file {path}: {e.strerror} (run as the "
                         "service user or root)") from None
    if not data:
        raise AdminError(f"the token file {path} is empty")
    if not is_token(data):
        raise AdminError(f"the token file {path} does not hold a token (letters, digits "
                         "and -._~+/)")
    return data


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def format_sessions(sessions: list[dict[str, Any]], now: float) -> str:
    """A table: one line per session, oldest first."""
    header = ("PID", "ID", "PROTO", "USER", "CLIENT", "BACKEND", "STATE", "SINCE")
    rows = [header]
    for s in sorted(sessions, key=lambda s: s["since"]):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["since"]))
        rows.append((str(s["pid"]), str(s["id"]), s["protocol"], s["user"] or "-",
                     s["client"], s["backend"] or "-", s["state"],
                     f"{since} ({_age(now - s['since'])})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
             for row in rows]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imapproxy-admin",
        description="List and end the sessions of a running imapproxy; drain it, undrain it.",
        epilog="With --config, the token comes from [admin] token_file: run as the service "
               "user or root. A UNIX socket (mode 0600) needs no token unless one is set. "
               "After a drain, undrain lets new sessions in again.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", help=f"the proxy's config (default {DEFAULT_CONFIG} "
                       f"if it exists, else --address {DEFAULT_ADDRESS})")
    where.add_argument("--address", "-a", help="the [admin] address: a socket path or HOST:PORT")
    p.add_argument("--token-file", help="with --address: the file holding the [admin] token "
                   "(required for HOST:PORT)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per request")
    p.add_argument("--version", action="version", version=f"imapproxy-admin {__version__}")
    commands = p.add_subparsers(dest="command", required=True)
    sessions = commands.add_parser("sessions", help="list sessions")
    sessions.add_argument("--user", help="only this user's")
    sessions.add_argument("--json", action="store_true", help="JSON, one object per session")
    kick = commands.add_parser("kick", help="end sessions (the clients reconnect)")
    which = kick.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="every session of this user")
    which.add_argument("--backend", help="every session on this backend (HOST:PORT or HOST)")
    commands.add_parser("drain", help="end every session gracefully and refuse new ones "
                        "(until undrain)")
    commands.add_parser("undrain", help="accept new sessions again after a drain (sessions "
                        "the drain ended stay ended; refused while the proxy is stopping)")
    return p


def targets(args: argparse.Namespace) -> tuple[list[str], bytes | None]:
    """The admin address of every worker, and the token to send them."""
    if args.address:
        token = read_token(args.token_file) if args.token_file else None
        return [args.address], token
    if args.token_file:
        raise AdminError("--token-file goes with --address (--config reads [admin] token_file)")
    config_path = args.config
    if config_path is None:
        if not Path(DEFAULT_CONFIG).exists():
            return [DEFAULT_ADDRESS], None
        config_path = DEFAULT_CONFIG
    try:
        config = load(config_path)
    except ConfigError as e:
        raise AdminError(f"config error: {e}") from None
    if config.admin is None:
        raise AdminError(f"{config.path}: no [admin] address: the admin API is off")
    token = config.admin.token.reveal() if config.admin.token is not None else None
    return worker_addresses(config.admin.address, config.workers), token


def run(argv: list[str], out: TextIO, now: float | None = None) -> int:
    args = parser().parse_args(argv)
    addresses, token = targets(args)

    def ask(address: str, method: str, path: str) -> Any:
        return request(address, method, path, args.timeout, token)

    if args.command == "sessions":
        sessions: list[dict[str, Any]] = []
        for address in addresses:
            sessions += ask(address, "GET", "/sessions")["sessions"]
        if args.user:
            sessions = [s for s in sessions if s["user"].lower() == args.user.lower()]
        if args.json:
            out.writelines(json.dumps(s) + "\n" for s in sessions)
        else:
            out.write(format_sessions(sessions, time.time() if now is None else now))
        return 0
    if args.command == "kick":
        key, value = ("user", args.user) if args.user else ("backend", args.backend)
        query = urllib.parse.urlencode({key: value})
        total = sum(ask(address, "POST", f"/kick?{query}")["kicked"] for address in addresses)
        out.write(f"kicked {total} session{'s' if total != 1 else ''} ({key} {value})\n")
        return 0
    if args.command == "undrain":
        for address in addresses:
            ask(address, "POST", "/undrain")
        out.write("accepting new sessions again\n")
        return 0
    answers = [ask(address, "POST", "/drain") for address in addresses]
    total = sum(answer["draining"] for answer in answers)
    notice = max(float(answer.get("notice", 0)) for answer in answers)
    out.write(f"draining {total} session{'s' if total != 1 else ''}"
              + (f" in {notice:g}s (/readyz answers 503 until then)" if notice else "") + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdout)
    except AdminError as e:
        sys.stderr.write(f"imapproxy-admin: {e}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

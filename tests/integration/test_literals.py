"""A refused synchronising literal through the proxy to the real Dovecot (issue 12).

``APPEND NoSuchBox {50000}`` is answered ``NO [TRYCREATE]`` instead of ``+``: the 50,000
bytes are never sent, and the session tracker must not wait for them. The next command
is IDLE; a kick then ends the session gracefully: ``* BYE [UNAVAILABLE]`` to the client,
DONE and LOGOUT to Dovecot, which logs "Logged out" (not a cut connection).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import ProxyProcess, imap_config

HOST = "127.0.0.1"
USER = MailUser("literal", "literal-secret", 4200)


def admin(address: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "imapproxy.admincli", "--address", address,
                             *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(check: Callable[[], object], what: str, seconds: float = 10.0) -> object:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)
    return found


def read_until(reader: object, prefix: bytes) -> list[bytes]:
    lines = []
    while True:
        line = reader.readline()  # type: ignore[attr-defined]
        assert line, f"EOF before {prefix!r}: {lines}"
        lines.append(line)
        if line.startswith(prefix):
            return lines


def test_refused_literal_then_idle_then_kick_ends_gracefully(
        dovecot_factory: Callable[..., Dovecot], tmp_path: object) -> None:
    dovecot = dovecot_factory(users=[USER], name="literals", tls=False)
    port = free_port()
    address = str(tmp_path / "admin.sock")  # type: ignore[operator]
    config = imap_config(port, extra=f"""
[backend]
imap_port = {dovecot.imap_port}

[admin]
address = "{address}"

[timeouts]
drain = 5
""")
    proxy = ProxyProcess(tmp_path / "proxy", config, [port],  # type: ignore[operator]
                         {"users.map": "*  127.0.0.1\n"})
    proxy.start()
    try:
        with socket.create_connection((HOST, port), timeout=15) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"* OK")
            sock.sendall(f"a LOGIN {USER.name} {USER.password}\r\n".encode())
            assert read_until(reader, b"a ")[-1].startswith(b"a OK")
            # RFC 3501 section 7.5: the client waits for "+" before sending the literal.
            sock.sendall(b"b APPEND NoSuchBox {50000}\r\n")
            refused = read_until(reader, b"b ")[-1]
            assert refused.startswith(b"b NO [TRYCREATE]"), refused
            sock.sendall(b"c IDLE\r\n")
            assert reader.readline().startswith(b"+ ")

            def idle_at_the_proxy() -> bool:
                listed = [json.loads(line) for line in
                          admin(address, "sessions", "--json").splitlines()]
                return [s["state"] for s in listed if s["user"] == USER.name] == ["idle"]

            wait_for(idle_at_the_proxy, "idle session in the admin list")
            assert admin(address, "kick", "--user", USER.name) == \
                f"kicked 1 session (user {USER.name})\n"
            started = time.monotonic()
            assert reader.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
            assert reader.read() == b""
            # A graceful end, not the kick's forced close after the 5 s drain time.
            assert time.monotonic() - started < 3
    finally:
        proxy.stop()

    def logged_out() -> list[str]:
        return [line for line in dovecot.log_path.read_text(errors="replace").splitlines()
                if f"imap({USER.name})" in line and "Disconnected" in line]

    ended = wait_for(logged_out, "session end in Dovecot's log")
    assert "Logged out" in ended[-1], ended  # type: ignore[index]
    assert "Traceback" not in proxy.log()

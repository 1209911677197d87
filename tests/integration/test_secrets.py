"""No password ever reaches a log line, whatever the level (issue 7).

The proxy runs under twistd with a log observer that keeps every event at every level
(debug included) and writes each one whole: formatted text, the repr of the event dict
with all its keys, tracebacks. Full sessions run through it (IMAP LOGIN with quoted
strings and literals, AUTHENTICATE PLAIN with and without an initial response, POP3
USER/PASS and AUTH PLAIN, failed logins of known and unknown users), then every line of
its logs is searched for every password in every encoding it travelled in.
"""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

import pytest
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess

HOST = "127.0.0.1"
TESTS = Path(__file__).resolve().parents[1]
WRONG = ["wrong-Imap-pw-7431", "wrong-Pl4in-pw-0815", "wrong-Pop-pw-4711",
         "wrong-PopPlain-pw-1234", "Unknown-user-pw-9999", "wröng-ütf8-pw-5555"]


class Line:
    """A tiny line client over a socket (IMAP or POP3)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=15)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, self.buffer
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def ask(self, data: bytes, until: bytes) -> list[bytes]:
        self.sock.sendall(data)
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(until):
                return lines

    def close(self) -> None:
        self.sock.close()


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def forms(password: str, blobs: list[bytes]) -> set[str]:
    """Every way a password could show up in a log line."""
    raw = password.encode()
    found = {password, repr(password)[1:-1], repr(raw)[2:-1], raw.hex(),
             base64.b64encode(raw).decode(), quoted(password).decode("utf-8", "replace")}
    found |= {blob.decode() for blob in blobs if password.encode() in base64.b64decode(blob)}
    return {f for f in found if len(f) >= 6}


@pytest.fixture
def debug_proxy(tmp_path: Path, store1: Dovecot, store2: Dovecot) -> ProxyProcess:
    imap, pop3 = free_port(), free_port()
    config = f"""
[[listen]]
protocol = "imap"
address = "{HOST}:{imap}"
tls = "none"

[[listen]]
protocol = "pop3"
address = "{HOST}:{pop3}"
tls = "none"

[tls]
plaintext_auth = true

[directory]
type = "static"
map = "users.map"

[backend]
imap_port = {store1.imap_port}
pop3_port = {store1.pop3_port}

[log]
level = "debug"

{RIG_LIMITS}"""
    events = tmp_path / "events.log"
    env = dict(os.environ, IMAPPROXY_EVENT_LOG=str(events),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS),
                                                        os.environ.get("PYTHONPATH")])))
    proxy = ProxyProcess(tmp_path / "proxy", config, [imap, pop3],
                         {"users.map": "*  127.0.0.1\n"},
                         extra_args=["--logger=rig.debuglog.observer"], env=env)
    proxy.start()
    proxy.imap, proxy.pop3, proxy.events = imap, pop3, events  # type: ignore[attr-defined]
    yield proxy  # type: ignore[misc]
    proxy.stop()


def test_no_password_in_any_log_line_at_debug_level(debug_proxy: ProxyProcess,
                                                    mail_users: list[MailUser]) -> None:
    users = {u.name: u.password for u in mail_users}
    imap_port: int = debug_proxy.imap  # type: ignore[attr-defined]
    pop3_port: int = debug_proxy.pop3  # type: ignore[attr-defined]
    blobs: list[bytes] = []

    def imap(commands: list[tuple[bytes, bytes]]) -> None:
        client = Line(imap_port)
        for data, until in commands:
            client.ask(data, until)
        client.close()

    # IMAP LOGIN: quoted strings (with \\ and \" escapes: bob), UTF-8 (carol), a literal.
    for name in ("alice", "bob", "carol"):
        imap([(b"a1 LOGIN " + name.encode() + b" " + quoted(users[name]) + b"\r\n", b"a1 OK"),
              (b"a2 LOGOUT\r\n", b"a2 OK")])
    dave = users["dave"].encode()
    imap([(b"l1 LOGIN dave {%d}\r\n" % len(dave), b"+"), (dave + b"\r\n", b"l1 OK"),
          (b"l2 LOGOUT\r\n", b"l2 OK")])
    # AUTHENTICATE PLAIN: SASL-IR and a continuation.
    blobs += [plain("erin", users["erin"]), plain("frank", users["frank"])]
    imap([(b"p1 AUTHENTICATE PLAIN " + blobs[-2] + b"\r\n", b"p1 OK"),
          (b"p2 LOGOUT\r\n", b"p2 OK")])
    imap([(b"p1 AUTHENTICATE PLAIN\r\n", b"+"), (blobs[-1] + b"\r\n", b"p1 OK"),
          (b"p2 LOGOUT\r\n", b"p2 OK")])
    # Failed IMAP logins: wrong passwords, an unknown user, a literal, SASL.
    blobs += [plain("alice", WRONG[1])]
    imap([(b"f1 LOGIN alice " + quoted(WRONG[0]) + b"\r\n", b"f1 NO"),
          (b"f2 AUTHENTICATE PLAIN " + blobs[-1] + b"\r\n", b"f2 NO"),
          (b"f3 LOGIN nosuchuser " + quoted(WRONG[4]) + b"\r\n", b"f3 NO"),
          (b"f4 LOGIN bob {%d+}\r\n" % len(WRONG[5].encode()) + WRONG[5].encode() + b"\r\n",
           b"f4 NO"),
          (b"f5 LOGOUT\r\n", b"f5 OK")])
    # POP3: USER/PASS and AUTH PLAIN, right and wrong.
    blobs += [plain("alice", users["alice"]), plain("bob", WRONG[3])]
    pop = Line(pop3_port)
    pop.ask(b"USER bob\r\n", b"+OK")
    pop.ask(b"PASS " + WRONG[2].encode() + b"\r\n", b"-ERR")
    pop.ask(b"AUTH PLAIN " + blobs[-1] + b"\r\n", b"-ERR")
    pop.ask(b"USER carol\r\n", b"+OK")
    pop.ask(b"PASS " + users["carol"].encode() + b"\r\n", b"+OK")
    pop.ask(b"QUIT\r\n", b"+OK")
    pop.close()
    pop = Line(pop3_port)
    pop.ask(b"AUTH PLAIN\r\n", b"+")
    pop.ask(blobs[-2] + b"\r\n", b"+OK")
    pop.ask(b"STAT\r\n", b"+OK")
    pop.ask(b"QUIT\r\n", b"+OK")
    pop.close()
    debug_proxy.stop()

    events: Path = debug_proxy.events  # type: ignore[attr-defined]
    lines = events.read_text(encoding="utf-8").splitlines() + debug_proxy.log().splitlines()
    # The sessions happened and were logged, debug events included.
    text = "\n".join(lines)
    assert text.count("login id=") >= 9 and text.count("login failed id=") >= 6
    assert any(line.startswith("debug ") for line in lines)
    for password in [*users.values(), *WRONG]:
        for form in forms(password, blobs):
            leaks = [line for line in lines if form in line]
            assert not leaks, (password, form, leaks[:3])

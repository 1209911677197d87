"""Issue 12's figures, measured as an attacker meets the proxy (and Dovecot direct).

    python bench/attack.py            # about 2 minutes

1. 150 guesses sent in parallel from one address, the right password among them: how
   many reached the backend (counted in Dovecot's own log), through the proxy with its
   default penalty, and straight to a Dovecot with its default anvil penalty (which
   penalises before its lookup, but lets parallel attempts through).
2. 1,000 failed logins with 64 KB usernames (from 1,000 addresses): the proxy's memory
   and log growth.
3. The owner logging in during an attack on the account: from an address they used
   before, and from a new one.
"""

from __future__ import annotations

import re
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.ports import free_port  # noqa: E402
from rig.proxy import ProxyProcess  # noqa: E402

USERS = [MailUser("victim", "the-right-one", 4601), MailUser("owner", "owner-pw", 4602)]
CONFIG = """
[[listen]]
protocol = "imap"
address = "127.0.0.1:{port}"
tls = "none"

[tls]
plaintext_auth = true

[directory]
type = "static"
map = "users.map"

[limits]
preauth_timeout = 300
max_connections_per_user_ip = 100
"""


def login(port: int, source: str, user: bytes, password: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=300,
                                  source_address=(source, 0)) as sock:
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(4096)
        if len(user) > 200:
            sock.sendall(b"a LOGIN {%d+}\r\n" % len(user) + user + b' "' + password + b'"\r\n')
        else:
            sock.sendall(b'a LOGIN "' + user + b'" "' + password + b'"\r\n')
        data = b""
        while not re.search(rb"(^|\r\n)a [A-Z]+ .*\r\n", data):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def checked(dovecot: Dovecot, user: str) -> int:
    text = dovecot.log_path.read_text(errors="replace")
    return (len(re.findall(rf"\({user},[^)]*\).*Password mismatch", text))
            + len(re.findall(rf"Login: user=<{user}>", text)))


def parallel_guesses(port: int, dovecot: Dovecot) -> tuple[int, int, bool, float]:
    before = checked(dovecot, "victim")
    passwords = [b"guess-%d" % i for i in range(150)]
    passwords[100] = b"the-right-one"
    started = time.monotonic()
    with ThreadPoolExecutor(150) as pool:
        futures = [pool.submit(login, port, "127.0.0.20", b"victim", pw) for pw in passwords]
        time.sleep(3)
        in_3s = checked(dovecot, "victim") - before
        replies = [f.result() for f in futures]
    found = b"a OK" in replies[100]
    return in_3s, checked(dovecot, "victim") - before, found, time.monotonic() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="attack-"))
    direct = Dovecot(work / "anvil", USERS, name="anvil")
    # Dovecot's defaults this time: auth_failure_delay 2 s and the anvil penalty on.
    text = direct.config_path.read_text()
    text = re.sub(r"service anvil \{.*?\n\}\n", "", text, flags=re.S)
    direct.config_path.write_text(text.replace("auth_failure_delay = 0 secs",
                                               "auth_failure_delay = 2 secs"))
    direct.start()
    backend = Dovecot(work / "backend", USERS, name="backend")
    backend.start()
    port = free_port()
    proxy = ProxyProcess(work / "proxy", CONFIG.format(port=port), [port],
                         {"users.map": f"*  127.0.0.1:{backend.imap_port}\n"})
    proxy.start()
    try:
        in_3s, total, found, took = parallel_guesses(direct.imap_port, direct)
        print(f"Dovecot direct (anvil): 150 parallel guesses: {in_3s} checked in 3 s, "
              f"{total} in all ({took:.0f} s); right password found: {found}")
        in_3s, total, found, took = parallel_guesses(port, backend)
        print(f"imapproxy: 150 parallel guesses: {in_3s} reached the backend in 3 s, "
              f"{total} in all ({took:.0f} s); right password found: {found}")

        assert proxy.process is not None
        pid = proxy.process.pid
        rss, log_size = rss_kib(pid), proxy.log_path.stat().st_size
        name = b"x" * 65536
        with ThreadPoolExecutor(50) as pool:
            list(pool.map(lambda i: login(port, f"127.1.{i // 250}.{i % 250 + 1}",
                                          name[:-8] + b"%08d" % i, b"pw"), range(1000)))
        time.sleep(1)
        print(f"imapproxy: 1000 failed logins with 64 KB names: memory "
              f"+{(rss_kib(pid) - rss) / 1024:.1f} MB, log "
              f"+{(proxy.log_path.stat().st_size - log_size) / 1024:.0f} KB")

        assert b"a OK" in login(port, "127.0.0.30", b"owner", b"owner-pw")
        with ThreadPoolExecutor(20) as pool:
            attack = [pool.submit(login, port, f"127.2.0.{i}", b"owner", b"guess-%d" % i)
                      for i in range(1, 21)]
            time.sleep(2)
            started = time.monotonic()
            ok = login(port, "127.0.0.30", b"owner", b"owner-pw")
            known = time.monotonic() - started
            started = time.monotonic()
            new = login(port, "127.0.0.31", b"owner", b"owner-pw")
            fresh = time.monotonic() - started
            for f in attack:
                f.result()
        print(f"imapproxy: owner during an attack on the account: from a known address "
              f"{ok.splitlines()[-1][:30]!r} after {known:.3f} s; from a new address "
              f"{new.splitlines()[-1][:40]!r} after {fresh:.1f} s")
    finally:
        proxy.stop()
        backend.close()
        direct.close()


if __name__ == "__main__":
    main()

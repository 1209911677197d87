"""`make demo`: a local Dovecot with demo users and the proxy in front of it.

Runs until Ctrl-C. Everything lives in .demo/ in the repository (git-ignored).
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rig.certs import TestCA  # noqa: E402
from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.ports import free_port  # noqa: E402
from rig.proxy import ProxyProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
USERS = [MailUser("demo1", "demo1-pass", 4001), MailUser("demo2", "demo2-pass", 4002)]


def port_or_free(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def main() -> None:
    workdir = ROOT / ".demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    ca = TestCA(workdir / "ca")
    cert = ca.issue("localhost")
    store = Dovecot(workdir / "dovecot", USERS, name="demo-store")
    store.start()
    for user in USERS:
        store.deliver(user.name, b"From: postmaster@example.org\r\nSubject: Welcome to "
                      b"imapproxy\r\n\r\nThis message came through the proxy.\r\n")
    starttls_port, implicit_port = port_or_free(1143), port_or_free(1993)
    metrics_port = port_or_free(9143)
    admin_socket = workdir / "proxy" / "admin.sock"
    config = (ROOT / "conf" / "imapproxy.toml").read_text()
    config = (config.replace("127.0.0.1:143", f"127.0.0.1:{starttls_port}")
                    .replace("127.0.0.1:993", f"127.0.0.1:{implicit_port}")
                    .replace("127.0.0.1:9143", f"127.0.0.1:{metrics_port}")
                    .replace('"/run/imapproxy/admin.sock"', f'"{admin_socket}"')
                    .replace('"/etc/imapproxy/cert.pem"', f'"{cert.chain_path}"')
                    .replace('"/etc/imapproxy/key.pem"', f'"{cert.key_path}"')
                    .replace('"/etc/imapproxy/users.map"', '"users.map"'))
    proxy = ProxyProcess(workdir / "proxy", config, [starttls_port, implicit_port],
                         {"users.map": f"*  127.0.0.1:{store.imap_port}\n"})
    proxy.start()
    pid = proxy.process.pid if proxy.process is not None else "PID"
    # The project's .venv is not on PATH: name its imapproxy-admin in full.
    admin_command = Path(sys.executable).parent / "imapproxy-admin"
    print(f"""
imapproxy demo is running (Ctrl-C stops it).
  proxy: IMAP with STARTTLS on 127.0.0.1:{starttls_port}, implicit TLS on 127.0.0.1:{implicit_port}
  backend: Dovecot on 127.0.0.1:{store.imap_port}
  users: demo1 / demo1-pass, demo2 / demo2-pass
  CA certificate: {ca.ca_path}
  config: {proxy.config_path}
  proxy log: {proxy.log_path}

Try:
  python3 -c "import imaplib,ssl; c=imaplib.IMAP4_SSL('127.0.0.1',{implicit_port},\\
ssl_context=ssl.create_default_context(cafile='{ca.ca_path}')); c.login('demo1','demo1-pass'); \\
c.select(); print(c.fetch('1','(BODY[HEADER.FIELDS (SUBJECT)])')); c.logout()"
  openssl s_client -quiet -starttls imap -connect 127.0.0.1:{starttls_port} -CAfile {ca.ca_path}
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep ^imapproxy_sessions
  {admin_command} --address {admin_socket} sessions
  kill -HUP {pid}    # reload, after editing {proxy.workdir / "users.map"}
""", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and proxy.process is not None and proxy.process.poll() is None:
            time.sleep(0.5)
    finally:
        proxy.stop()
        store.stop()


if __name__ == "__main__":
    main()

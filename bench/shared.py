"""What [shared] redis costs a login, and what a login costs while Redis is down.

    python bench/shared.py [--logins 200]      # about a minute

Sequential LOGIN + LOGOUT on fresh connections, from one address, in alternating
rounds of 10 (so drift on a shared machine falls on every path alike):

- ``direct``: Dovecot itself;
- ``proxy``: imapproxy with its local penalty and limits (no [shared]);
- ``shared``: imapproxy with [shared] redis on a redis-server on 127.0.0.1;
- then, with that Redis stopped (connections refused) and paused (connections
  accepted, nothing answered: every call waits for [shared] timeout): the same
  logins through the ``shared`` proxy.

Prints the median and the 90th percentile of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.ports import free_port  # noqa: E402
from rig.proxy import ProxyProcess, imap_config  # noqa: E402
from rig.redis import RedisServer  # noqa: E402

USER = MailUser("owner", "owner-pw", 4602)
TIMEOUT = 0.25


def login(port: int) -> float:
    """One LOGIN and LOGOUT on a fresh connection: seconds from connect to tagged OK."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(4096)
        sock.sendall(b'a LOGIN owner "owner-pw"\r\n')
        data = b""
        while b"\r\na " not in b"\r\n" + data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        took = time.perf_counter() - started
        if b"\r\na OK" not in b"\r\n" + data:
            raise RuntimeError(f"login failed: {data!r}")
        sock.sendall(b"b LOGOUT\r\n")
        while sock.recv(4096):
            pass
    return took


def figures(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[int(len(ms) * 0.9) - 1]
    return f"median {statistics.median(ms):6.2f} ms, p90 {p90:6.2f} ms, max {ms[-1]:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as folder:
        work = Path(folder)
        dovecot = Dovecot(work / "dovecot", [USER], name="bench")
        dovecot.start()
        redis = RedisServer(work / "redis").start()
        proxies = {}
        try:
            routes = {"users.map": f"*  127.0.0.1:{dovecot.imap_port}\n"}
            limits = "[limits]\nmax_connections_per_user_ip = 1000\n"
            for name, shared in (("proxy", ""), ("shared", f'[shared]\nredis = "{redis.url}"\n'
                                                          f"timeout = {TIMEOUT}\n")):
                port = free_port()
                proxies[name] = ProxyProcess(work / name, imap_config(
                    port, extra=limits + shared), [port], routes).start()
            ports = {"direct": dovecot.imap_port,
                     **{name: proxy.port for name, proxy in proxies.items()}}
            for port in ports.values():  # warm up (Dovecot's auth cache, Redis connections)
                for _ in range(10):
                    login(port)
            samples: dict[str, list[float]] = {name: [] for name in ports}
            for _round in range(max(1, args.logins // 10)):
                for name, port in ports.items():
                    samples[name] += [login(port) for _ in range(10)]
            for name, values in samples.items():
                print(f"{name:28s} {figures(values)}")
            shared_port = ports["shared"]
            redis.stop()
            print(f"{'shared, Redis stopped':28s} "
                  f"{figures([login(shared_port) for _ in range(args.logins)])}")
            redis.start()
            time.sleep(6)  # found back (heartbeat every 5 s)
            redis.pause()
            try:
                paused = [login(shared_port) for _ in range(args.logins)]
            finally:
                redis.resume()
            print(f"{'shared, Redis unresponsive':28s} {figures(paused)} "
                  f"(timeout {TIMEOUT * 1000:.0f} ms)")
            slow = [s for s in paused if s > TIMEOUT]
            print(f"  logins that waited for the timeout: {len(slow)} of {len(paused)}")
        finally:
            for proxy in proxies.values():
                proxy.stop()
            redis.stop()
            dovecot.close()


if __name__ == "__main__":
    main()

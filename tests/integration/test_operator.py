"""Operations end to end: metrics and admin with real sessions, who may use the admin API
(token, Host, the socket's mode, another local user), drain and undrain, the client's
address at Dovecot (IMAP ID), HAProxy with send-proxy-v2 in front of two proxies,
SIGHUP reloads.

Clients connect from 127.0.0.2, so their address is told apart from the proxies' and
HAProxy's (127.0.0.1) in every log.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rig.proxy
from prometheus_client.parser import text_string_to_metric_families
from rig.imapraw import RawImap
from rig.ports import free_port, free_port_pair
from rig.proxy import ADMIN_TOKEN, admin_token_file, store_map

import imapproxy
from imapproxy.proxyprotocol import encode_v2

HOST = "127.0.0.1"
CLIENT = "127.0.0.2"
#: seconds to wait for something the proxy does on its own time
SOON = 10.0


def limits() -> str:
    # The rig's quick-failure [limits] when it has them (tests/rig/proxy.py).
    return str(getattr(rig.proxy, "RIG_LIMITS", ""))


def config(listen: list[dict[str, Any]], map_file: str = "users.map", extra: str = "",
           cert: Any = None) -> str:
    text = ""
    for item in listen:
        text += "[[listen]]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in item.items()) + "\n"
    text += "[tls]\nplaintext_auth = true\n"
    if cert is not None:
        text += f'certificate = "{cert.chain_path}"\nkey = "{cert.key_path}"\n'
    text += f'\n[directory]\ntype = "static"\nmap = "{map_file}"\n\n{extra}\n{limits()}'
    return text


def user(mail_users: list[Any], name: str) -> Any:
    return next(u for u in mail_users if u.name == name)


def login(port: int, account: Any, source: str = CLIENT) -> RawImap:
    raw = RawImap(HOST, port, source=source)
    password = account.password.encode()
    # A LITERAL+ literal: any password as it is (the proxy offers LITERAL+).
    reply = raw.command(b"l", b"LOGIN " + account.name.encode()
                        + b" {%d+}\r\n" % len(password) + password)
    assert reply[-1].startswith(b"l OK"), reply
    assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    return raw


def idle(raw: RawImap) -> None:
    raw.send(b"i IDLE\r\n")
    assert raw.readline().startswith(b"+")


def wait_for(check: Callable[[], Any], what: str, timeout: float = SOON) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def admin(where: Any, *args: str) -> str:
    """imapproxy-admin against a proxy (through its config) or an address."""
    target = (["--config", str(where.config_path)] if hasattr(where, "config_path")
              else ["--address", str(where)])
    result = subprocess.run([sys.executable, "-m", "imapproxy.admincli", *target, *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_log(proxy: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def test_metrics_admin_and_client_address_at_dovecot(store1, store2, mail_users, start_proxy,
                                                      server_cert, client_tls, tmp_path):
    port, tls_port, metrics_port, admin_port = (free_port() for _ in range(4))
    users_map = store_map(store1, store2, mail_users)
    token = admin_token_file(tmp_path)
    proxy = start_proxy(
        config([{"protocol": "imap", "address": f"{HOST}:{port}", "tls": "none"},
                {"protocol": "imap", "address": f"{HOST}:{tls_port}", "tls": "implicit"}],
               cert=server_cert,
               extra=f'[metrics]\naddress = "{HOST}:{metrics_port}"\n\n'
                     f'[admin]\naddress = "{HOST}:{admin_port}"\ntoken_file = "{token}"\n\n'
                     '[log]\nformat = "json"\n'),
        [port, tls_port, metrics_port, admin_port], {"users.map": users_map})
    alice, bob, carol = (user(mail_users, n) for n in ("alice", "bob", "carol"))
    idler = login(port, alice)
    idle(idler)
    busy = login(port, bob)
    waiting = RawImap(HOST, port, source=CLIENT)  # connected, not logged in
    wrong = RawImap(HOST, port, source=CLIENT)
    assert wrong.command(b"w", b"LOGIN carol wrong-password")[-1].startswith(b"w NO")
    wrong.close()
    # A client that does not trust the certificate gives up in the handshake.
    with pytest.raises(ssl.SSLError), socket.create_connection((HOST, tls_port),
                                                               timeout=5) as sock:
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")
    # One that does gets in.
    tls_client = RawImap(HOST, tls_port, tls=client_tls, source=CLIENT)
    assert tls_client.greeting.startswith(b"* OK")
    tls_client.close()

    # -- metrics, read from the live sessions ------------------------------------------------
    def settled() -> Any:
        found = scrape(metrics_port)
        states = {state: metric(found, "imapproxy_sessions", protocol="imap", state=state)
                  for state in ("pre-auth", "active", "idle")}
        tls_failed = metric(found, "imapproxy_tls_handshake_failures_total", protocol="imap")
        return found if states == {"pre-auth": 1, "active": 1, "idle": 1} and tls_failed else None

    found = wait_for(settled, "sessions by state and the TLS failure in the metrics")
    assert metric(found, "imapproxy_logins_total", protocol="imap", result="ok", reason="") == 2
    assert metric(found, "imapproxy_logins_total", protocol="imap", result="failed",
                  reason="AuthenticationFailed") == 1
    assert metric(found, "imapproxy_lookup_seconds_count", result="ok") == 3
    for store in (store1, store2):
        assert metric(found, "imapproxy_backend_connect_seconds_count",
                      backend=f"127.0.0.1:{store.imap_port}") >= 1
    assert metric(found, "imapproxy_client_bytes_total", protocol="imap", direction="in") > 0

    # -- Dovecot saw the client's address (IMAP ID x-originating-ip) -------------------------
    log_line = wait_for(lambda: [line for line in store1.log_path.read_text().splitlines()
                                 if "Login: user=<alice>" in line], "alice's login at store1")
    assert "rip=127.0.0.2" in log_line[-1], log_line

    # -- admin: list, kick by user, kick by backend ------------------------------------------
    listed = [json.loads(line) for line in admin(proxy, "sessions",
                                                 "--json").splitlines()]
    by_user = {s["user"]: s for s in listed}
    assert by_user["alice"]["state"] == "idle"
    assert by_user["alice"]["client"].startswith("127.0.0.2:")
    assert by_user["alice"]["backend"] == f"127.0.0.1:{store1.imap_port}"
    assert by_user["bob"]["state"] == "active"
    assert by_user[""]["state"] == "pre-auth"
    table = admin(proxy, "sessions")
    assert table.splitlines()[0].split()[:4] == ["PID", "ID", "PROTO", "USER"]
    assert "alice" in table and "idle" in table

    assert admin(proxy, "kick", "--user", "alice") == \
        "kicked 1 session (user alice)\n"
    assert idler.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert idler.at_eof()
    assert busy.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # bob was not touched
    out = admin(proxy, "kick", "--backend", f"127.0.0.1:{store2.imap_port}")
    assert out == f"kicked 1 session (backend 127.0.0.1:{store2.imap_port})\n"
    assert busy.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert busy.at_eof()
    waiting.close()

    # -- bytes stay counted after the sessions ended; JSON log lines --------------------------
    after = wait_for(lambda: (lambda f: f if metric(f, "imapproxy_sessions", protocol="imap",
                                                    state="idle") == 0 else None)(
        scrape(metrics_port)), "the kicked sessions to end")
    assert metric(after, "imapproxy_client_bytes_total", protocol="imap", direction="out") >= \
        metric(found, "imapproxy_client_bytes_total", protocol="imap", direction="out")
    events = json_log(proxy)
    logins = [e for e in events if e["text"].startswith("login id=") and e.get("user") == "alice"]
    assert logins and logins[0]["client"] == CLIENT
    ends = wait_for(lambda: [e for e in json_log(proxy) if e["text"].startswith("session end")
                             and e.get("user") == "alice"], "alice's session end line")
    assert ends[0]["reason"] == "kicked" and ends[0]["bytes_out"] > 0


# -- who may use the admin API -----------------------------------------------------------------

#: another local user: nobody, with no supplementary groups
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: Debian's interpreter (scripts/install-deps): nobody may not run the tests' one under /root
SYSTEM_PYTHON = "/usr/bin/python3"

#: run as nobody: GET /sessions without a token, as any local process could
NOBODY_GET = """
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
connection.request("GET", "/sessions")
response = connection.getresponse()
print(response.status, response.getheader("www-authenticate"))
"""

#: run as nobody: connect to a UNIX socket
NOBODY_CONNECT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("permission denied")
else:
    print("connected")
"""


def as_nobody(*argv: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, SYSTEM_PYTHON, "-B", *argv], capture_output=True, text=True,
                          timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin",
                                                    "PYTHONPATH": pythonpath})


def public_folder() -> Path:
    """A folder other users may enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="imapproxy-test-"))
    folder.chmod(0o755)
    return folder


def ask(port: int, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, Any]:
    """One request with exactly these headers (no Host unless given); status and JSON body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_admin_on_tcp_takes_the_token_and_only_its_own_host(store1, store2, mail_users,
                                                            start_proxy, tmp_path):
    port, admin_port = free_port(), free_port_pair()
    token = admin_token_file(tmp_path)
    proxy = start_proxy(
        "workers = 2\n" + config(
            [{"protocol": "imap", "address": f"{HOST}:{port}", "tls": "none"}],
            extra=f'[admin]\naddress = "{HOST}:{admin_port}"\ntoken_file = "{token}"\n'),
        [port, admin_port, admin_port + 1], {"users.map": store_map(store1, store2, mail_users)})
    alice = user(mail_users, "alice")
    idler = login(port, alice)
    idle(idler)
    bearer = ("Authorization", f"Bearer {ADMIN_TOKEN}")

    # Another local user, without the token: refused.
    result = as_nobody("-c", NOBODY_GET, str(admin_port))
    assert result.stdout == '401 Bearer realm="imapproxy-admin"\n', result.stderr
    # With it, each worker answers on its own address (port + index) as Host.
    listed = []
    for worker_port in (admin_port, admin_port + 1):
        code, body = ask(worker_port, "GET", "/sessions", [("Host", f"{HOST}:{worker_port}"),
                                                            bearer])
        assert code == 200, body
        listed += body["sessions"]
    assert [s["user"] for s in listed] == ["alice"]
    # A page whose DNS name was rebound to 127.0.0.1 sends its own name: refused, token or not.
    for headers in ([("Host", f"evil.example:{admin_port}")],
                    [("Host", f"evil.example:{admin_port}"), bearer],
                    [("Host", f"{HOST}:{admin_port + 1}"), bearer],  # the other worker's
                    [bearer]):  # no Host at all
        code, body = ask(admin_port, "GET", "/sessions", headers)
        assert code == 421 and body["error"] == f"the Host header must be {HOST}:{admin_port}"
    code, _ = ask(admin_port, "POST", "/drain", [("Host", f"{HOST}:{admin_port}"), bearer,
                                                 ("Origin", f"http://{HOST}:{admin_port}")])
    assert code == 403
    code, _ = ask(admin_port, "POST", "/drain", [("Host", f"{HOST}:{admin_port}"),
                                                 ("Authorization", "Bearer not-the-token")])
    assert code == 401
    # Nothing was drained: alice still idles, and new clients are greeted.
    code, body = ask(admin_port, "GET", "/sessions", [("Host", f"{HOST}:{admin_port}"), bearer])
    code_1, body_1 = ask(admin_port + 1, "GET", "/sessions",
                         [("Host", f"{HOST}:{admin_port + 1}"), bearer])
    assert [s["state"] for s in body["sessions"] + body_1["sessions"]] == ["idle"]
    greeted = RawImap(HOST, port, source=CLIENT)
    assert greeted.greeting.startswith(b"* OK")
    greeted.close()
    refused = wait_for(lambda: [line for line in proxy.log().splitlines()
                                if "admin: refused" in line], "the refusals in the log")
    assert any("from 127.0.0.1:" in line and "no bearer token" in line for line in refused)
    assert any("Host ['evil.example:" in line for line in refused)
    assert ADMIN_TOKEN not in proxy.log()

    # imapproxy-admin --config: the address of every worker and the token from the config.
    assert [json.loads(line)["user"] for line in admin(proxy, "sessions", "--json")
            .splitlines()] == ["alice"]
    assert admin(proxy, "drain") == "draining 1 session\n"
    assert idler.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
    assert idler.at_eof()
    for _ in range(4):  # SO_REUSEPORT spreads them over both workers: both refuse
        late = RawImap(HOST, port, source=CLIENT)
        assert late.greeting == b"* BYE [UNAVAILABLE] Shutting down\r\n"
        assert late.at_eof()
    assert admin(proxy, "undrain") == "accepting new sessions again\n"
    for name in ("alice", "bob", "carol", "dave"):  # and both take logins again
        again = login(port, user(mail_users, name))
        assert again.command(b"o", b"LOGOUT")[-1].startswith(b"o OK")
        again.close()

    # The token file is the service user's: imapproxy-admin run by anyone else cannot
    # read it, and says so (a copy of the config and the package where nobody may look).
    public = public_folder()
    try:
        shutil.copytree(Path(imapproxy.__file__).parent, public / "imapproxy",
                        ignore=shutil.ignore_patterns("__pycache__"))
        copied = public / "imapproxy.toml"
        copied.write_text(proxy.config_path.read_text().replace(str(token),
                                                                 str(public / "admin.token")))
        (public / "users.map").write_text("*  127.0.0.1\n")
        for readable in (copied, public / "users.map"):
            readable.chmod(0o644)
        shutil.copy(token, public / "admin.token")  # mode 0600, root's
        result = as_nobody("-m", "imapproxy.admincli", "--config", str(copied), "sessions",
                           pythonpath=str(public))
        assert result.returncode == 1, result.stdout
        assert result.stderr == (f"imapproxy-admin: config error: {copied}: admin.token_file: "
                                 f"cannot read {public / 'admin.token'}: Permission denied "
                                 "(run as the service user or root)\n")
    finally:
        shutil.rmtree(public)


def test_admin_socket_is_mode_0600_and_no_other_user_connects(store1, store2, mail_users,
                                                               start_proxy):
    port = free_port()
    public = public_folder()  # so that only the socket's own mode keeps nobody out
    socket_path = public / "admin.sock"
    try:
        proxy = start_proxy(
            config([{"protocol": "imap", "address": f"{HOST}:{port}", "tls": "none"}],
                   extra=f'[admin]\naddress = "{socket_path}"\n'),
            [port], {"users.map": store_map(store1, store2, mail_users)})
        wait_for(socket_path.exists, "the admin socket")
        mode = socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        result = as_nobody("-c", NOBODY_CONNECT, str(socket_path))
        assert result.stdout == "permission denied\n", result.stderr
        # imapproxy-admin run by nobody says why (a copy of the package nobody may read).
        shutil.copytree(Path(imapproxy.__file__).parent, public / "imapproxy",
                        ignore=shutil.ignore_patterns("__pycache__"))
        result = as_nobody("-m", "imapproxy.admincli", "--address", str(socket_path),
                           "sessions", pythonpath=str(public))
        assert result.stderr == (f"imapproxy-admin: {socket_path}: Permission denied "
                                 "(run as the service user or root)\n")
        # The service user (root here) needs no token on it, through the config or the path.
        idler = login(port, user(mail_users, "bob"))
        assert "bob" in admin(proxy, "sessions")
        assert admin(socket_path, "drain") == "draining 1 session\n"
        assert idler.readline() == b"* BYE [UNAVAILABLE] Shutting down\r\n"
        assert admin(socket_path, "undrain") == "accepting new sessions again\n"
        login(port, user(mail_users, "bob")).command(b"o", b"LOGOUT")
        # A browser is refused here too, and the log names the peer by its uid and pid.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path))
            sock.sendall(b"GET /sessions HTTP/1.0\r\nOrigin: http://evil.example\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 403 ")
        line = wait_for(lambda: [x for x in proxy.log().splitlines() if "admin: refused" in x],
                        "the refusal in the log")
        assert "'GET /sessions' from uid 0 pid " in line[0], line
    finally:
        shutil.rmtree(public)


# -- HAProxy in front ------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

HAPROXY_CONFIG = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend imap
    bind 127.0.0.1:{port}
    default_backend proxies
backend proxies
    balance roundrobin
{check}{servers}
"""


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[list[int]], int]]:
    """Start HAProxy (send-proxy-v2 to each given port); returns its listening port."""
    if not Path(HAPROXY).exists():
        pytest.fail("haproxy is not installed: run scripts/install-deps")
    started: list[subprocess.Popen[bytes]] = []

    def start(backends: list[int], health: list[int] | None = None) -> int:
        """``health``: each proxy's metrics port, checked with GET /readyz."""
        port = free_port()
        servers = "".join(
            f"    server p{i} 127.0.0.1:{p} send-proxy-v2"
            + (f" check port {health[i]} inter 200ms fall 1 rise 1" if health else "") + "\n"
            for i, p in enumerate(backends))
        check = ("    option httpchk GET /readyz\n    http-check expect status 200\n"
                 if health else "")
        path = tmp_path / "haproxy.cfg"
        path.write_text(HAPROXY_CONFIG.format(port=port, servers=servers, check=check))
        with (tmp_path / "haproxy.log").open("ab") as log:
            process = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log,
                                       stderr=subprocess.STDOUT)
        started.append(process)
        wait_for(lambda: _accepts(port) or process.poll() is not None, "haproxy to listen")
        assert process.poll() is None, (tmp_path / "haproxy.log").read_text()
        return port

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_haproxy_with_send_proxy_v2_in_front_of_two_proxies(store1, store2, mail_users,
                                                           start_proxy, haproxy):
    users_map = store_map(store1, store2, mail_users)
    ports = [free_port(), free_port()]
    trusted = '[proxy_protocol]\ntrusted = ["127.0.0.1/32"]\n'
    proxies = [start_proxy(config([{"protocol": "imap", "address": f"{HOST}:{p}",
                                    "tls": "none", "proxy_protocol": True}], extra=trusted),
                           [p], {"users.map": users_map}, name=f"pp{i}")
               for i, p in enumerate(ports)]
    front = haproxy(ports)
    names = ["alice", "bob", "carol", "dave"]
    clients = [login(front, user(mail_users, name)) for name in names]
    for raw in clients:
        assert raw.command(b"n", b"NOOP")[-1].startswith(b"n OK")
        raw.command(b"o", b"LOGOUT")
        raw.close()
    # Round robin spread the four over both, and each logged the client, not HAProxy.
    per_proxy = [[line for line in p.log().splitlines() if "] login id=" in line]
                 for p in proxies]
    assert [len(lines) > 0 for lines in per_proxy] == [True, True], per_proxy
    assert sum(len(lines) for lines in per_proxy) == len(names)
    assert all(" client=127.0.0.2 " in line for lines in per_proxy for line in lines), per_proxy
    # Not HAProxy (nor trusted): closed without a word.
    # The reset may arrive before connect() has even returned.
    try:
        direct = socket.create_connection((HOST, ports[0]), source_address=(CLIENT, 0),
                                          timeout=5)
    except ConnectionResetError:
        direct = None
    try:
        if direct is not None:
            assert direct.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        if direct is not None:
            direct.close()
    assert "PROXY header refused from 127.0.0.2" in proxies[0].log()

    # An IPv6 client, as a load balancer would announce it, and its address at Dovecot.
    raw_socket = socket.create_connection((HOST, ports[1]), timeout=5)
    raw_socket.sendall(encode_v2(("2001:db8::7", 40000), ("2001:db8::1", 143)))
    reader = raw_socket.makefile("rb")
    assert reader.readline().startswith(b"* OK")
    erin = user(mail_users, "erin")
    raw_socket.sendall(b"e LOGIN erin " + erin.password.encode() + b"\r\n")
    assert reader.readline().startswith(b"e OK")
    raw_socket.close()
    wait_for(lambda: "client=2001:db8::7 user=<erin>" in proxies[1].log(), "the IPv6 login line")
    line = wait_for(lambda: [x for x in store1.log_path.read_text().splitlines()
                             if "Login: user=<erin>" in x and "rip=2001:db8::7" in x],
                    "erin's login at store1 with the IPv6 address")
    assert line

    # forward_client = "proxy-v2": a third proxy hands the client's address to the second
    # one (a PROXY listener) in a v2 header.
    chained_port = free_port()
    chained = start_proxy(
        config([{"protocol": "imap", "address": f"{HOST}:{chained_port}", "tls": "none"}],
               extra='[backend]\nforward_client = "proxy-v2"\n'),
        [chained_port], {"users.map": f"*  127.0.0.1:{ports[1]}\n"}, name="chained")
    raw = login(chained_port, user(mail_users, "frank"))
    raw.close()
    wait_for(lambda: "client=127.0.0.2 user=<frank>" in proxies[1].log(),
             "frank's login at the second proxy with the client's address")
    assert "client=127.0.0.2 user=<frank>" in chained.log()


def test_haproxy_takes_a_drained_instance_out_of_the_pool_by_readyz(store1, store2, mail_users,
                                                                   start_proxy, haproxy,
                                                                   tmp_path):
    """/readyz answers 503 from the start of a drain: HAProxy's httpchk takes the
    instance out before its sessions are ended, and puts it back after an undrain."""
    users_map = store_map(store1, store2, mail_users)
    ports, health = [free_port(), free_port()], [free_port(), free_port()]
    proxies = [start_proxy(config([{"protocol": "imap", "address": f"{HOST}:{p}",
                                    "tls": "none", "proxy_protocol": True}],
                                  extra='[proxy_protocol]\ntrusted = ["127.0.0.1/32"]\n'
                                        f'[metrics]\naddress = "{HOST}:{h}"\n'
                                        f'[admin]\naddress = "{tmp_path}/admin{i}.sock"\n'),
                           [p, h], {"users.map": users_map}, name=f"ready{i}")
               for i, (p, h) in enumerate(zip(ports, health, strict=True))]

    def readyz(port: int) -> int:
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            connection.request("GET", "/readyz")
            return connection.getresponse().status
        finally:
            connection.close()

    def livez(port: int) -> int:
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            connection.request("GET", "/livez")
            return connection.getresponse().status
        finally:
            connection.close()

    assert [readyz(h) for h in health] == [200, 200]
    front = haproxy(ports, health)
    admin(proxies[0], "drain")
    assert readyz(health[0]) == 503 and livez(health[0]) == 200
    time.sleep(0.8)  # a few of HAProxy's 200 ms checks
    before = [p.log().count("] login id=") for p in proxies]
    for name in ["alice", "bob", "carol", "dave"]:
        raw = login(front, user(mail_users, name))
        raw.command(b"o", b"LOGOUT")
        raw.close()
    after = [p.log().count("] login id=") for p in proxies]
    assert after[0] == before[0] and after[1] == before[1] + 4, (before, after)
    admin(proxies[0], "undrain")
    assert readyz(health[0]) == 200
    time.sleep(0.8)
    for name in ["alice", "bob", "carol", "dave"]:
        raw = login(front, user(mail_users, name))
        raw.command(b"o", b"LOGOUT")
        raw.close()
    assert proxies[0].log().count("] login id=") > after[0], "back in the pool"


# -- SIGHUP ---------------------------------------------------------------------------------


def test_sighup_reloads_the_map_and_keeps_an_idle_session(store1, store2, mail_users,
                                                          start_proxy):
    port = free_port()
    alice = user(mail_users, "alice")
    proxy = start_proxy(config([{"protocol": "imap", "address": f"{HOST}:{port}",
                                 "tls": "none"}]),
                        [port], {"users.map": f"alice  127.0.0.1:{store1.imap_port}\n"})
    idler = login(port, alice)
    idle(idler)
    map_path = proxy.workdir / "users.map"
    map_path.write_text(f"alice  127.0.0.1:{store2.imap_port}\n")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded " in proxy.log(), "the reload")
    moved = login(port, alice)
    moved.command(b"o", b"LOGOUT")
    assert f"user=<alice> backend=127.0.0.1:{store2.imap_port}" in proxy.log()
    # The session opened before the reload is still relayed, from store1.
    store1.deliver("alice", b"From: a@example.org\r\nSubject: after reload\r\n\r\nhi\r\n")
    line = wait_for(lambda: idler.readline(), "the IDLE push")
    assert line.startswith(b"* ") and (b"EXISTS" in line or b"RECENT" in line), line

    # A broken config is refused; the running one (store2 for alice) stays.
    proxy.config_path.write_text(proxy.config_path.read_text() + "\n[[listen]\nbroken")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in proxy.log(), "the refusal")
    again = login(port, alice)
    again.command(b"o", b"LOGOUT")
    moved_logins = [line for line in proxy.log().splitlines() if "] login id=" in line
                    and f"user=<alice> backend=127.0.0.1:{store2.imap_port}" in line]
    assert len(moved_logins) == 2, proxy.log()
    assert proxy.process is not None and proxy.process.poll() is None
    idler.send(b"DONE\r\n")
    assert idler.until_tagged(b"i")[-1].startswith(b"i OK")

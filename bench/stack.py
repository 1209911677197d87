"""The real stack the bench measures: two Dovecot stores, slapd, imapproxy, Perdition.

Each way a client can reach a mailbox is a :class:`BenchPath`: direct to the user's
store, through imapproxy, through Perdition. The measurements only ask a path for
an endpoint (host, port) per user and protocol, and for the processes whose memory
and CPU count as the proxy's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rig.certs import TestCA  # noqa: E402
from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.ports import free_port  # noqa: E402

from bench import mailgen  # noqa: E402
from bench.perdition import Perdition, check_installed  # noqa: E402
from bench.proxyproc import ImapProxy, Listen  # noqa: E402

STORES = ("store1", "store2")
FIRST_UID = 20000


#: the script every ManageSieve session of the bench lists and fetches (GETSCRIPT)
SIEVE_SCRIPT = "bench"
SIEVE_BODY = b'require ["fileinto"];\r\nif header :contains "subject" "bench" {\r\n' \
    b'  fileinto "INBOX";\r\n}\r\n'

@dataclass
class Sizes:
    """Everything that scales between --quick and a full run."""

    mailbox_bytes: int
    rounds: int
    login_seq: int
    login_conc: int
    concurrency: int
    noop: int
    sessions: int
    push_users: int
    pop3_sessions: int
    pop3_users: int
    pop3_messages: int
    pop3_message_bytes: int

    @property
    def login_users(self) -> int:
        return self.rounds * (self.login_seq + self.login_conc)


@dataclass
class BenchPath:
    """One way to reach the mailboxes, with the processes that are its cost."""

    name: str
    kind: str  # direct | imapproxy | perdition
    imap: Callable[[str, bool], tuple[str, int] | None]
    pop3: Callable[[str], tuple[str, int] | None]
    pids: Callable[[str], list[int]]  # "imap" | "imaps" | "pop3" | "managesieve" -> processes
    restart: Callable[[], None]
    groups: set[str]  # which figure groups it takes part in
    notes: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)  # figure group -> reason
    #: ManageSieve (RFC 5804): where a user's sieve session goes, None if not here
    sieve: Callable[[str], tuple[str, int] | None] = lambda _user: None


class Stack:
    """Starts and stops everything; owns the users and their placement."""

    def __init__(self, workdir: Path, sizes: Sizes, log: Callable[[str], None],
                 proxy_extra_toml: str = "") -> None:
        self.workdir = workdir
        self.sizes = sizes
        self.log = log
        self.proxy_extra_toml = proxy_extra_toml
        self.notes: list[str] = []
        self.users: dict[str, MailUser] = {}
        self.store_of: dict[str, str] = {}
        self.dovecots: dict[str, Dovecot] = {}
        self.slapd: Any = None
        self.proxies: dict[str, ImapProxy] = {}
        self.perditions: dict[str, Perdition] = {}
        self.paths: list[BenchPath] = []
        self.pool: list[str] = []  # login / IDLE users, alternating stores
        self.pop3_users: list[str] = []
        self.bulk_user = "s1bulk"
        self.noop_user = "s2noop"

    # -- users ---------------------------------------------------------------

    def _make_users(self) -> None:
        s = self.sizes
        n_pool = max(s.login_users, s.sessions, 2)
        uid = FIRST_UID

        def add(name: str, store: str) -> None:
            nonlocal uid
            self.users[name] = MailUser(name, f"{name}-pw", uid)
            self.store_of[name] = store
            uid += 1

        for i in range(n_pool):
            store = STORES[i % 2]
            name = f"s{i % 2 + 1}u{i:05d}"
            add(name, store)
            self.pool.append(name)
        for i in range(s.pop3_users):
            store = STORES[i % 2]
            name = f"s{i % 2 + 1}pop{i:03d}"
            add(name, store)
            self.pop3_users.append(name)
        add(self.bulk_user, "store1")
        add(self.noop_user, "store2")

    def password(self, user: str) -> str:
        return self.users[user].password

    def store(self, user: str) -> Dovecot:
        return self.dovecots[self.store_of[user]]

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        check_installed()
        s = self.sizes
        self._make_users()
        self.ca = TestCA(self.workdir / "ca")
        self.cert = self.ca.issue("localhost")
        self.ca_path = str(self.ca.ca_path)
        for store in STORES:
            users = [u for n, u in self.users.items() if self.store_of[n] == store]
            self.log(f"starting Dovecot {store} ({len(users)} users)")
            d = Dovecot(self.workdir / store, users, name=store, cert=self.cert,
                        max_sessions=s.sessions + 300)
            d.start()
            self.dovecots[store] = d
        self._populate()
        try:
            import rig.slapd  # noqa: F401
        except ImportError:
            # Only while the rig is being written: no directory, so no Perdition.
            self.notes.append("rig.slapd missing: no LDAP, no Perdition in this run")
            self.slapd = None
        else:
            self._start_slapd()
        self._start_proxies()
        if self.slapd is not None:
            self._start_perdition()
        self._build_paths()

    def _populate(self) -> None:
        s = self.sizes
        self.log(f"writing the bulk mailbox ({s.mailbox_bytes / 1e6:.0f} MB)")
        msgs = mailgen.mixed_mailbox(s.mailbox_bytes)
        self.bulk_messages = len(msgs)
        self.bulk_bytes = sum(len(m) for m in msgs)
        self.store(self.bulk_user).populate(self.bulk_user, msgs)
        del msgs
        small = mailgen.small_messages(s.pop3_messages, s.pop3_message_bytes)
        for u in self.pop3_users:
            self.store(u).populate(u, small)
        self.store(self.noop_user).populate(self.noop_user, small[:3])
        # The ManageSieve sessions (the POP3 users) list and fetch one stored script.
        for u in self.pop3_users:
            store = self.store(u)
            script = store.home(u) / "sieve" / f"{SIEVE_SCRIPT}.sieve"
            script.parent.mkdir(exist_ok=True)
            script.write_bytes(SIEVE_BODY)
            uid = self.users[u].uid
            for path in (script.parent, script):
                os.chown(path, uid, uid)

    def _start_slapd(self) -> None:
        from rig.slapd import Slapd

        self.log(f"starting slapd ({len(self.users)} entries)")
        self.slapd = Slapd(self.workdir / "slapd")
        self.slapd.start()
        # One admin connection for all entries (add_user binds once per entry, which
        # takes a while for thousands); the entries are the ones add_user writes.
        conn = self.slapd.admin_connection()
        try:
            for name in self.users:
                d = self.store(name)
                attrs = {"objectClass": ["inetOrgPerson", "inetLocalMailRecipient",
                                         "imapProxyUser"],
                         "uid": [name], "cn": [name], "sn": [name],
                         # Perdition wants host and port in separate attributes.
                         "mailHost": [d.host], "mailImapPort": [str(d.imap_port)],
                         "mailPop3Port": [str(d.pop3_port)]}
                if d.sieve_port is not None:
                    attrs["mailSievePort"] = [str(d.sieve_port)]
                if not conn.add(self.slapd.dn(name), attributes=attrs):
                    raise RuntimeError(f"LDAP add {name} failed: {conn.result}")
        finally:
            conn.unbind()

    def ldap_settings(self) -> dict[str, object]:
        return {
            "uris": [self.slapd.uri],
            "base": self.slapd.base,
            "scope": "one",
            "filter": "(uid={user})",
            "host_attribute": "mailHost",
            "imap_port_attribute": "mailImapPort",
            "pop3_port_attribute": "mailPop3Port",
            "managesieve_port_attribute": "mailSievePort",
        }

    def _start_proxies(self) -> None:
        cert, key = self.cert.chain_path, self.cert.key_path
        d1, d2 = self.dovecots["store1"], self.dovecots["store2"]
        static_map = [("s1*", f"{d1.host}:{d1.imap_port}"), ("s2*", f"{d2.host}:{d2.imap_port}")]
        ports = {"imap": free_port(), "imaps": free_port(), "pop3": free_port(),
                 "managesieve": free_port()}
        listeners = [Listen("imap", ports["imap"], "none"),
                     Listen("imap", ports["imaps"], "implicit"),
                     Listen("pop3", ports["pop3"], "none"),
                     Listen("managesieve", ports["managesieve"], "none")]
        self.proxy_pop3 = True
        self.proxy_ldap = True
        variants: list[tuple[str, dict[str, object] | None]] = [
            ("imapproxy", self.ldap_settings() if self.slapd is not None else None),
            ("imapproxy-static", None)]
        if self.slapd is None:
            variants = [("imapproxy", None)]
        for name, ldap in variants:
            mine = [Listen(x.protocol, free_port() if name != "imapproxy" else x.port, x.tls)
                    for x in listeners]
            if ldap is None:
                # The static map's HOST:PORT serves every protocol, and both stores
                # share 127.0.0.1, so POP3 cannot be routed by it here.
                mine = [x for x in mine if x.protocol == "imap"]
            elif not self.proxy_pop3:
                mine = [x for x in mine if x.protocol == "imap"]
            p = ImapProxy(name, self.workdir / "proxy", mine, cert, key,
                          static_map=static_map if ldap is None else None, ldap=ldap,
                          extra_toml=self.proxy_extra_toml)
            self.log(f"starting {name} ({'LDAP' if ldap else 'static map'})")
            try:
                p.start()
            except RuntimeError as e:
                if not any(x.protocol == "pop3" for x in mine):
                    if ldap is None:
                        self._proxy_failed(name, e)
                        continue
                    self._ldap_failed(str(e))
                    continue
                # No POP3 in this proxy yet: go on with IMAP alone.
                self.proxy_pop3 = False
                self.notes.append("imapproxy: did not start with a POP3 listener, "
                                  f"POP3 skipped ({_first_line(e)})")
                p.listeners = mine = [x for x in mine if x.protocol == "imap"]
                try:
                    p.start()
                except RuntimeError as e2:
                    if ldap is None:
                        self._proxy_failed(name, e2)
                        continue
                    self._ldap_failed(str(e2))
                    continue
            if ldap is not None:
                # A proxy can start and still fail every lookup: probe one login.
                problem = self._probe(p)
                if problem:
                    p.stop()
                    self._ldap_failed(problem)
                    continue
            self.proxies[name] = p
        if not self.proxy_ldap and "imapproxy-static" in self.proxies:
            # Promote the static-map proxy to the main path.
            self.proxies["imapproxy"] = self.proxies.pop("imapproxy-static")
            self.proxies["imapproxy"].name = "imapproxy"

    def _proxy_failed(self, name: str, e: BaseException) -> None:
        """The proxy does not start at all: measure the other paths, say so loudly."""
        self.notes.append(f"{name}: FAILED TO START, not measured: {_first_line(e)}")
        self.log(f"{name} failed to start:\n{e}")

    def _ldap_failed(self, why: str) -> None:
        self.proxy_ldap = False
        self.notes.append(f"imapproxy: LDAP directory did not work ({_first_line(why)}); "
                          "the main proxy path uses the static map")

    def _probe(self, proxy: ImapProxy) -> str | None:
        """Log in once through each plaintext listener; return what went wrong, if anything."""
        user = self.pool[0]
        for lst in proxy.listeners:
            if lst.tls != "none" or lst.protocol != "imap":
                continue  # POP3 problems show up in the POP3 figures
            if lst.protocol == "imap":
                script = [b'a LOGIN "%s" "%s"\r\n' % (user.encode(),
                                                        self.password(user).encode()),
                          b"b LOGOUT\r\n"]
                ok = b"a OK"
            else:
                script = [b"USER %s\r\n" % user.encode(),
                          b"PASS %s\r\n" % self.password(user).encode(), b"QUIT\r\n"]
                ok = b"+OK"
            try:
                with socket.create_connection(("127.0.0.1", lst.port), timeout=15) as sock:
                    f = sock.makefile("rb")
                    f.readline()
                    for line in script[:-1]:
                        sock.sendall(line)
                        resp = f.readline()
                        while resp.startswith(b"* "):
                            resp = f.readline()
                        if not resp.startswith(ok):
                            return f"{lst.protocol} login probe: {resp.decode(errors='replace').strip()}"
                    sock.sendall(script[-1])
            except OSError as e:
                return f"{lst.protocol} login probe: {e}"
        return None

    def _start_perdition(self) -> None:
        cert, key = self.cert.chain_path, self.cert.key_path
        for mode, attr in (("imap", "mailImapPort"), ("imaps", "mailImapPort"),
                           ("pop3", "mailPop3Port"), ("managesieve", "mailSievePort")):
            p = Perdition(self.workdir / "perdition", mode, free_port(), self.slapd.uri,
                          self.slapd.base, attr, cert=cert, key=key)
            self.log(f"starting Perdition {mode}")
            p.start()
            self.perditions[mode] = p

    def _build_paths(self) -> None:
        def direct_imap(user: str, tls: bool) -> tuple[str, int]:
            d = self.store(user)
            port = d.imaps_port if tls else d.imap_port
            assert port is not None
            return d.host, port

        def direct_pop3(user: str) -> tuple[str, int]:
            d = self.store(user)
            return d.host, d.pop3_port

        def direct_sieve(user: str) -> tuple[str, int] | None:
            d = self.store(user)
            return None if d.sieve_port is None else (d.host, d.sieve_port)

        all_groups = {"bulk", "logins", "noop", "push", "pop3", "sieve"}
        self.paths.append(BenchPath("direct", "direct", direct_imap, direct_pop3,
                                    lambda _proto: [], lambda: None, set(all_groups),
                                    sieve=direct_sieve))

        for name, proxy in self.proxies.items():
            self.paths.append(self._proxy_path(name, proxy, all_groups))

        perd = self.perditions
        if not perd:
            return

        def perd_imap(_user: str, tls: bool) -> tuple[str, int]:
            return "127.0.0.1", perd["imaps" if tls else "imap"].port

        def perd_pop3(_user: str) -> tuple[str, int]:
            return "127.0.0.1", perd["pop3"].port

        def perd_sieve(_user: str) -> tuple[str, int]:
            return "127.0.0.1", perd["managesieve"].port

        def perd_restart() -> None:
            for p in perd.values():
                p.stop()
            for p in perd.values():
                p.start()

        self.paths.append(BenchPath("perdition", "perdition", perd_imap, perd_pop3,
                                    lambda proto: [perd[proto].pid], perd_restart,
                                    set(all_groups), sieve=perd_sieve))

    def _proxy_path(self, name: str, proxy: ImapProxy, all_groups: set[str]) -> BenchPath:
        def port_of(protocol: str, tls: str) -> int | None:
            for x in proxy.listeners:
                if x.protocol == protocol and x.tls == tls:
                    return x.port
            return None

        def imap(_user: str, tls: bool) -> tuple[str, int] | None:
            port = port_of("imap", "implicit" if tls else "none")
            return None if port is None else ("127.0.0.1", port)

        def pop3(_user: str) -> tuple[str, int] | None:
            port = port_of("pop3", "none")
            return None if port is None else ("127.0.0.1", port)

        def sieve(_user: str) -> tuple[str, int] | None:
            port = port_of("managesieve", "none")
            return None if port is None else ("127.0.0.1", port)

        def restart() -> None:
            proxy.stop()
            proxy.start()

        if name == "imapproxy-static":
            groups = {"logins"}  # the directory only matters where users are looked up
        else:
            groups = set(all_groups)
        path = BenchPath(name, "imapproxy", imap, pop3, lambda _proto: [proxy.pid], restart,
                         groups, sieve=sieve)
        if port_of("pop3", "none") is None and "pop3" in groups:
            path.unsupported["pop3"] = "imapproxy has no POP3 listener yet"
        return path

    def stop(self) -> None:
        for p in self.perditions.values():
            _quietly(p.stop)
        for p in self.proxies.values():
            _quietly(p.stop)
        if self.slapd is not None:
            _quietly(self.slapd.stop)
        for d in self.dovecots.values():
            _quietly(d.close)

    # -- facts for the JSON --------------------------------------------------------

    def versions(self) -> dict[str, str]:
        from bench.perdition import version as perdition_version

        out: dict[str, str] = {"python": sys.version.split()[0],
                               "perdition": perdition_version()}
        for pkg in ("dovecot-core", "slapd", "openssl"):
            out[pkg] = _dpkg_version(pkg)
        try:
            import twisted

            out["twisted"] = twisted.__version__
        except ImportError:
            pass
        try:
            import OpenSSL

            out["pyOpenSSL"] = OpenSSL.__version__
            out["openssl_lib"] = OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode()
        except ImportError:
            pass
        try:
            import imapproxy

            out["imapproxy"] = getattr(imapproxy, "__version__", "?")
        except ImportError:
            pass
        out["imapproxy_git"] = _git_rev()
        try:
            import uvloop  # type: ignore[import-not-found]

            out["client_loop"] = f"uvloop {uvloop.__version__}"
        except ImportError:
            out["client_loop"] = "asyncio"
        return out


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    # The interesting line of a twistd failure is usually the last one.
    return (lines[0] + (" ... " + lines[-1] if len(lines) > 1 else ""))[:300] if lines else repr(e)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        print(f"warning: {fn}: {e}", file=sys.stderr)


def _dpkg_version(pkg: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "imapproxy"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release,
                            "hostname": os.uname().nodename}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        info["os"] = next(ln.split("=", 1)[1].strip('"') for ln in
                          Path("/etc/os-release").read_text().splitlines()
                          if ln.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        pass
    info["fd_limit"] = _fd_limit()
    return info


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cleanup_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()

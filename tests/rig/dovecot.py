"""A real Dovecot (IMAP + POP3, and ManageSieve through Pigeonhole) run as a child
process from a scratch directory.

Dovecot's master runs as root (the tests run as root) so it can hand each user's
session to that user's own uid. Per-user uids matter: IDLE watches the maildir
with inotify, and the kernel allows only ``fs.inotify.max_user_instances``
(default 128) inotify instances per uid. Past that, Dovecot logs a warning and
falls back to polling every ``mailbox_idle_check_interval`` (30 s), so IDLE
notifications arrive late. For many concurrent IDLE sessions, spread them over
many users (see :func:`make_users`) or raise the sysctl.

Layout: config, log and stderr stay in ``workdir``. What uid-switched processes
(auth as ``dovecot``, mail processes as each user's uid) must reach -- the maildirs,
the passwd-file, base_dir with its sockets -- goes to ``workdir/shared`` when
every ancestor of ``workdir`` is searchable by others. Otherwise (pytest's
``/tmp/pytest-of-root`` is 0700, and pytest resets it on every run, so chmodding
it would break a concurrently running session) it goes to a private directory
under ``/tmp/imapproxy-rig/``, linked as ``workdir/shared`` and removed by
close() or at interpreter exit; leftovers of dead processes are swept on the next
start-up. ``mail_root`` always names the real location.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import resource
import shutil
import socket
import string
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .certs import CertPair
from .ports import free_port
from .processes import stop_process, tail

DOVECOT = Path("/usr/sbin/dovecot")
DOVEADM = Path("/usr/bin/doveadm")
DOVECOT_LDA = Path("/usr/lib/dovecot/dovecot-lda")
#: Pigeonhole's ManageSieve service (Debian: dovecot-managesieved, with dovecot-sieve)
MANAGESIEVE_LOGIN = Path("/usr/lib/dovecot/managesieve-login")

#: Seconds start() waits for the IMAP and POP3 greetings before giving up.
START_TIMEOUT = 10.0
#: Seconds stop() waits for the master to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: Unix socket paths are limited to 108 bytes; Dovecot's longest name below
#: base_dir is about 25 bytes, so a longer base_dir moves below SHARED_ROOT.
MAX_BASE_DIR = 70
#: Home of relocated shared directories (see the module docstring).
SHARED_ROOT = Path(tempfile.gettempdir()) / "imapproxy-rig"
#: Dovecot refuses mail uids below first_valid_uid; we use 1000.
FIRST_VALID_UID = 1000


@dataclass(frozen=True)
class MailUser:
    """A mailbox owner: login name, plaintext password and its own numeric uid (>= 1000).

    The password may hold any printable character, including spaces, quotes,
    backslashes and non-ASCII UTF-8, except ``:`` (the passwd-file field
    separator) and line breaks.
    """

    name: str
    password: str
    uid: int


def make_users(count: int, prefix: str = "user", first_uid: int = 3000) -> list[MailUser]:
    """Return ``count`` users ``<prefix>0..`` with password ``<name>-pw`` and distinct uids."""
    return [MailUser(f"{prefix}{i}", f"{prefix}{i}-pw", first_uid + i) for i in range(count)]


def _searchable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_shared_root() -> None:
    """Remove relocated directories whose creating process is gone."""
    for directory in SHARED_ROOT.glob("*"):
        try:
            pid = int((directory / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(directory, ignore_errors=True)


def _relocated_shared_dir(name: str) -> Path:
    SHARED_ROOT.mkdir(mode=0o711, exist_ok=True)
    SHARED_ROOT.chmod(0o711)
    _sweep_shared_root()
    directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=SHARED_ROOT))
    directory.chmod(0o711)
    (directory / "owner.pid").write_text(str(os.getpid()))
    return directory


#: Instances to close at interpreter exit (bench scripts may forget close()).
_LIVE: weakref.WeakSet[Dovecot] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for dovecot in list(_LIVE):
        dovecot.close()


def _greets(host: str, port: int, expected: bytes) -> bool:
    """True when ``host:port`` accepts a connection and greets with ``expected``."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.recv(512).startswith(expected)
    except OSError:
        return False


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (Dovecot needs ~2 fds per session)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check_user(user: MailUser) -> None:
    for field, value in (("name", user.name), ("password", user.password)):
        if any(ch in value for ch in ":\r\n\0"):
            raise ValueError(f"MailUser {field} must not contain ':', CR, LF or NUL: {user.name!r}")
    if not user.name or any(ch.isspace() or ch == "/" for ch in user.name):
        raise ValueError(f"MailUser name must be non-empty, no spaces or '/': {user.name!r}")
    if user.uid < FIRST_VALID_UID:
        raise ValueError(f"MailUser uid must be >= {FIRST_VALID_UID}: {user!r}")


class Dovecot:
    """One Dovecot instance on free ports of 127.0.0.1, with its own users and maildirs.

    With ``cert`` the plain ports offer STARTTLS/STLS and ``imaps_port``/``pop3s_port``
    speak implicit TLS; without it TLS is off and those attributes are None. Ports stay
    fixed for the object's lifetime, so ``stop()`` then ``start()`` comes back on the
    same ports ("backend down" tests). The greeting is ``"<name> ready."`` so a test
    can tell the stores apart.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        users: list[MailUser],
        name: str = "store1",
        cert: CertPair | None = None,
        max_sessions: int = 200,
        *,
        auth_failure_delay: int = 0,
        oauth2_introspection_url: str | None = None,
    ) -> None:
        for user in users:
            _check_user(user)
        if len({u.name for u in users}) != len(users):
            raise ValueError("MailUser names must be unique")
        self.workdir = Path(workdir).resolve()
        self.users = {u.name: u for u in users}
        self.name = name
        self.cert = cert
        self.max_sessions = max_sessions
        #: Dovecot's default is 2 s per failed login; tests want failures to be fast.
        self.auth_failure_delay = auth_failure_delay
        #: with a URL, OAUTHBEARER and XOAUTH2 are on and their tokens are checked there
        #: (an oauth2 passdb in "post" introspection mode: tests/rig/oauth.py)
        self.oauth2_introspection_url = oauth2_introspection_url
        self.imap_port = free_port(self.host)
        self.pop3_port = free_port(self.host)
        self.imaps_port: int | None = free_port(self.host) if cert else None
        self.pop3s_port: int | None = free_port(self.host) if cert else None
        #: ManageSieve (RFC 5804; STARTTLS with ``cert``); None without Pigeonhole
        self.sieve_port: int | None = (free_port(self.host) if MANAGESIEVE_LOGIN.exists()
                                       else None)
        self.config_path = self.workdir / "dovecot.conf"
        self.log_path = self.workdir / "dovecot.log"
        self.stderr_path = self.workdir / "dovecot.stderr"
        self._process: subprocess.Popen[bytes] | None = None
        self._sequence = itertools.count()
        self._relocated: Path | None = None
        self._prepare()
        _LIVE.add(self)

    # -- setup ---------------------------------------------------------------

    def _prepare(self) -> None:
        for account in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(account)
            except KeyError:
                raise RuntimeError(
                    f"system user {account!r} missing: run scripts/install-deps"
                ) from None
        if os.geteuid() != 0:
            raise RuntimeError("the Dovecot rig must run as root (it switches to per-user uids)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        link = self.workdir / "shared"
        if link.is_symlink():
            link.unlink()
        if _searchable_by_others(self.workdir.parent) and len(str(link / "run")) <= MAX_BASE_DIR:
            self.workdir.chmod(0o711)
            link.mkdir(exist_ok=True)
            shared = link
        else:
            shared = self._relocated = _relocated_shared_dir(self.name)
            link.symlink_to(shared)
        shared.chmod(0o711)
        #: Parent of every user's home directory.
        self.mail_root = shared / "mail"
        self.passwd_path = shared / "passwd"
        self.base_dir = shared / "run"
        self.state_dir = shared / "state"
        for directory in (self.mail_root, self.state_dir, self.base_dir):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)
        for user in self.users.values():
            home = self.home(user.name)
            for directory in (home, *(self.maildir(user.name) / d for d in ("cur", "new", "tmp"))):
                directory.mkdir(parents=True, exist_ok=True)
                os.chown(directory, user.uid, user.uid)
                directory.chmod(0o700)
            os.chown(self.maildir(user.name), user.uid, user.uid)
            self.maildir(user.name).chmod(0o700)
        self._write_passwd()
        if self.oauth2_introspection_url is not None:
            self.oauth2_path = shared / "dovecot-oauth2.conf.ext"
            self.oauth2_path.write_text(
                f"introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "force_introspection = yes\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
            )
            self.oauth2_path.chmod(0o644)
        self.config_path.write_text(self._config())

    def _write_passwd(self) -> None:
        # passwd-file format: user:password:uid:gid:gecos:home:shell:extra_fields.
        # Only ':' separates fields, so any other printable byte (UTF-8 included)
        # survives as part of the {PLAIN} password.
        lines = [
            f"{u.name}:{{PLAIN}}{u.password}:{u.uid}:{u.uid}::{self.home(u.name)}::\n"
            for u in self.users.values()
        ]
        self.passwd_path.write_bytes("".join(lines).encode("utf-8"))
        # The auth process runs as the "dovecot" user and must read it.
        os.chown(self.passwd_path, 0, pwd.getpwnam("dovecot").pw_gid)
        self.passwd_path.chmod(0o640)

    def _username_chars(self) -> str:
        """Dovecot refuses login names outside its auth_username_chars (ASCII letters,
        digits and ".-_@"); an empty setting allows any, for users named "jürgen"."""
        allowed = set(string.ascii_letters + string.digits + ".-_@")
        if all(set(name) <= allowed for name in self.users):
            return ""
        return "auth_username_chars =\n"

    def _config(self) -> str:
        n = self.max_sessions
        # Every session is one imap/pop3 process (client_limit 1) plus a slot in a
        # login process; log, anvil and stats keep one connection per process.
        process_limit = n + 50
        client_limit = 2 * n + 1000
        login_processes = max(2, os.cpu_count() or 1)
        tls = self.cert is not None
        if self.cert is not None:
            ssl = (
                f"ssl = yes\nssl_cert = <{self.cert.chain_path}\nssl_key = <{self.cert.key_path}\n"
            )
        else:
            ssl = "ssl = no\n"
        mechanisms = "plain login"
        oauth2 = ""
        if self.oauth2_introspection_url is not None:
            mechanisms += " oauthbearer xoauth2"
            # A second passdb for the token mechanisms only; the passwords stay in the
            # passwd-file (whose passdb then serves only plain and login).
            oauth2 = (f"passdb {{\n  driver = oauth2\n  mechanisms = oauthbearer xoauth2\n"
                      f"  args = {self.oauth2_path}\n}}\n")
        return f"""\
# Generated by tests/rig/dovecot.py for instance {self.name!r}; do not edit.
instance_name = imapproxy-{self.name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
auth_verbose = yes
verbose_proctitle = yes
protocols = imap pop3{" sieve" if self.sieve_port else ""}
listen = 127.0.0.1
login_greeting = {self.name} ready.
login_trusted_networks = 127.0.0.0/8
imap_id_log = *
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = {FIRST_VALID_UID}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = {self.auth_failure_delay} secs
{self._username_chars()}passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
{oauth2}userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
}}

mail_location = maildir:~/Maildir
mail_plugins =
mail_max_userip_connections = 10000
pop3_uidl_format = %08Xu%08Xv

default_process_limit = {process_limit}
default_client_limit = {client_limit}
service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port if tls else 0}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = {login_processes}
  process_limit = {login_processes}
  client_limit = {n + 100}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {self.host}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {self.host}
    port = {self.pop3s_port if tls else 0}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = {login_processes}
  process_limit = {login_processes}
  client_limit = {n + 100}
}}
service imap {{
  process_limit = {process_limit}
}}
{self._managesieve(login_processes, process_limit)}service pop3 {{
  process_limit = {process_limit}
}}
service anvil {{
  # Unreachable penalty socket = no auth penalty. Otherwise every failed login
  # from 127.0.0.1 delays the next logins (even good ones) by 2..15 s for ~30 s.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  # mail processes run as the users' uids, not in group dovecot
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""

    def _managesieve(self, login_processes: int, process_limit: int) -> str:
        """Pigeonhole's ManageSieve: scripts in ~/sieve, the active one ~/.dovecot.sieve."""
        if self.sieve_port is None:
            return ""
        return f"""\
service managesieve-login {{
  inet_listener sieve {{
    address = {self.host}
    port = {self.sieve_port}
  }}
  service_count = 0
  process_min_avail = 1
  process_limit = {login_processes}
  client_limit = {self.max_sessions + 100}
}}
service managesieve {{
  process_limit = {process_limit}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""

    # -- paths ---------------------------------------------------------------

    def home(self, user: str) -> Path:
        """The user's home directory (mail_root/<user>)."""
        return self.mail_root / user

    def maildir(self, user: str) -> Path:
        """The user's INBOX Maildir (with cur/, new/, tmp/)."""
        return self.home(user) / "Maildir"

    # -- lifecycle -----------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the master process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the master and block until IMAP and POP3 greet (RuntimeError otherwise)."""
        if not DOVECOT.exists():
            raise RuntimeError("dovecot not installed: run scripts/install-deps")
        if self.running:
            return
        with self.stderr_path.open("ab") as stderr:
            self._process = subprocess.Popen(
                [str(DOVECOT), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_raise_fd_limit,
            )
        deadline = time.monotonic() + START_TIMEOUT
        pending = {self.imap_port: b"* OK", self.pop3_port: b"+OK"}
        if self.sieve_port is not None:
            pending[self.sieve_port] = b'"IMPLEMENTATION"'
        while pending:
            if self._process.poll() is not None:
                self._fail(f"dovecot {self.name} exited with status {self._process.returncode}")
            pending = {p: g for p, g in pending.items() if not _greets(self.host, p, g)}
            if pending and time.monotonic() > deadline:
                self.stop()
                self._fail(f"dovecot {self.name} did not greet on ports {sorted(pending)}")
            if pending:
                time.sleep(0.05)

    def _fail(self, message: str) -> None:
        raise RuntimeError(
            f"{message}\n--- {self.log_path} ---\n{tail(self.log_path)}"
            f"\n--- {self.stderr_path} ---\n{tail(self.stderr_path)}"
        )

    def stop(self) -> None:
        """Stop the master (and with it every session); no-op when not running."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process, STOP_TIMEOUT)

    def close(self) -> None:
        """Stop, and delete the relocated shared directory if there is one (mail included)."""
        self.stop()
        _LIVE.discard(self)
        if self._relocated is not None:
            shutil.rmtree(self._relocated, ignore_errors=True)
            self._relocated = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Dovecot {self.name} imap={self.imap_port} pop3={self.pop3_port} "
                f"sieve={self.sieve_port}>")

    # -- mail ----------------------------------------------------------------

    def _run(self, args: list[str], stdin: bytes | None = None) -> str:
        result = subprocess.run(args, input=stdin, capture_output=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        """Run ``doveadm -c CONF <args>`` and return its stdout (RuntimeError on failure)."""
        return self._run([str(DOVEADM), "-c", str(self.config_path), *args], stdin)

    def deliver(self, user: str, message: bytes) -> None:
        """Deliver ``message`` to the user's INBOX with dovecot-lda (IDLE clients see it)."""
        self._user(user)
        self._run([str(DOVECOT_LDA), "-c", str(self.config_path), "-d", user, "-e"], stdin=message)

    def message_count(self, user: str) -> int:
        """Number of messages in the user's INBOX, as Dovecot sees it."""
        self._user(user)
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "messages", "INBOX")
        return int(out.strip().partition("messages=")[2])

    def populate(self, user: str, messages: list[bytes]) -> None:
        """Bulk-add ``messages`` (unread) by writing maildir files, then resync Dovecot.

        Much faster than one deliver() per message; meant for benchmark mailboxes.
        """
        account = self._user(user)
        cur = self.maildir(user) / "cur"
        stamp = int(time.time())
        pid = os.getpid()
        for message in messages:
            # Maildir name <time>.<unique>.<host>, plus S=<size> so Dovecot can skip
            # a stat(), and the ":2," info with no flags (unseen).
            path = cur / f"{stamp}.M{next(self._sequence)}P{pid}.rig,S={len(message)}:2,"
            with open(path, "xb") as file:
                os.fchmod(file.fileno(), 0o600)
                os.fchown(file.fileno(), account.uid, account.uid)
                file.write(message)
        self.doveadm("force-resync", "-u", user, "INBOX")

    def active_sieve(self, user: str) -> bytes | None:
        """The user's active Sieve script as stored on this backend (None if none)."""
        self._user(user)
        link = self.home(user) / ".dovecot.sieve"
        return link.read_bytes() if link.exists() else None

    def sieve_scripts(self, user: str) -> list[str]:
        """Names of the user's stored Sieve scripts."""
        self._user(user)
        return sorted(p.name.removesuffix(".sieve")
                      for p in (self.home(user) / "sieve").glob("*.sieve"))

    def _user(self, user: str) -> MailUser:
        try:
            return self.users[user]
        except KeyError:
            raise KeyError(f"{user!r} is not a user of dovecot {self.name}") from None

"""The mail clients people use, from Debian packages, through the proxy to a real Dovecot.

Every client runs over STARTTLS and over implicit TLS, verifies the proxy's certificate
against the test CA for the name ``localhost``, logs in with an awkward password (a
quote, a backslash, a space and a non-ASCII letter, where the client can send it), and
must exit by itself with status 0 well within its timeout. The outcome is checked on
the backend with doveadm: messages, flags, folders.

The proxy refuses plaintext logins (``plaintext_auth = false``), so a client that
silently skipped STARTTLS could not log in at all.

One private Dovecot serves the whole module with one user per test case, so the cases
cannot disturb each other or the session stores.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import pty
import pwd
import select
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import imapclient
import pytest
from rig.certs import CertPair, TestCA
from rig.dovecot import Dovecot, MailUser
from rig.ports import free_port
from rig.proxy import RIG_LIMITS, ProxyProcess

HOST = "localhost"  # the name the proxy's certificate is checked against
#: RFC 3501 quoted-string specials, a space and a non-ASCII letter.
PASSWORD = 'pa "ss" \\ wörd'
#: The same without the non-ASCII letter, for clients that cannot send one (see each use).
ASCII_PASSWORD = 'pa "ss" \\ word'
#: A client still running after this many seconds is killed and the case fails.
TIMEOUT = 30.0
#: A small sync must be over well within TIMEOUT; all of them take about a second.
EXIT_WITHIN = 20.0
#: Seconds an IDLE client may wait for ``* n EXISTS`` after delivery (inotify: instant).
IDLE_WITHIN = 5.0


@dataclass(frozen=True)
class Mode:
    """A TLS mode of one protocol: which proxy listener, and how clients name it."""

    name: str  # part of the test id
    protocol: str  # "imap" or "pop3"
    implicit: bool  # True: TLS from the first byte; False: STARTTLS / STLS


IMAP_MODES = (Mode("starttls", "imap", False), Mode("imaps", "imap", True))
POP3_MODES = (Mode("pop3-stls", "pop3", False), Mode("pop3s", "pop3", True))
STARTTLS, IMAPS = IMAP_MODES
STLS, POP3S = POP3_MODES

#: client -> the modes it is tested in. Two clients are tested over implicit TLS only:
#: - getmail6 (6.18) has no STARTTLS/STLS at all: its Simple*Retriever classes only speak
#:   plaintext, which this proxy refuses.
#: - offlineimap3 (0.0~git20211018) over STARTTLS hangs now and then right after the
#:   handshake, its reader thread blocked in an SSL read while the server's reply to its
#:   CAPABILITY is due (imaplib2's reader restart in starttls()); it does so against
#:   Dovecot directly too (about 1 run in 10 here), so it would only make this test flaky.
#:   Its STARTTLS also ignores sslcacertfile (no certificate check at all).
CLIENT_MODES: dict[str, tuple[Mode, ...]] = {
    "mbsync": IMAP_MODES,
    "offlineimap": (IMAPS,),
    "fetchmail": IMAP_MODES + POP3_MODES,
    "getmail": (IMAPS, POP3S),
    "mutt": IMAP_MODES,
    "curl": IMAP_MODES + POP3_MODES,
    "imaplib": IMAP_MODES,
    "imapclient": IMAP_MODES,
    "poplib": POP3_MODES,
    "idle": IMAP_MODES,
}

#: Users whose client can send only ASCII passwords; why is said where each is used.
ASCII_ONLY = {"getmail-imaps", "imaplib-starttls", "imaplib-imaps"}


def cases(client: str, protocol: str | None = None) -> list:
    return [pytest.param(mode, id=f"{client}-{mode.name}") for mode in CLIENT_MODES[client]
            if protocol in (None, mode.protocol)]


def account(client: str, mode: Mode) -> MailUser:
    """The case's own mailbox user (named like the test id)."""
    return USERS[f"{client}-{mode.name}"]


USERS = {
    name: MailUser(name, ASCII_PASSWORD if name in ASCII_ONLY else PASSWORD, 5000 + number)
    for number, name in enumerate(
        f"{client}-{mode.name}" for client, modes in CLIENT_MODES.items() for mode in modes
    )
}


# -- the rig: one Dovecot, one proxy ----------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, server_cert: CertPair) -> Iterator[Dovecot]:
    dovecot = Dovecot(tmp_path_factory.mktemp("clients-store"), list(USERS.values()),
                      name="clients", cert=server_cert)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.close()


@dataclass(frozen=True)
class Proxy:
    process: ProxyProcess
    ports: dict[str, int]

    def port(self, mode: Mode) -> int:
        return self.ports[mode.name]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, store: Dovecot,
          server_cert: CertPair) -> Iterator[Proxy]:
    """STARTTLS and implicit TLS listeners for IMAP and POP3, plaintext login refused.

    The map routes every user to the store without a port, so [backend] supplies the
    store's IMAP or POP3 port by protocol.
    """
    ports = {mode.name: free_port() for mode in IMAP_MODES + POP3_MODES}
    listeners = "".join(
        f'[[listen]]\nprotocol = "{mode.protocol}"\naddress = "127.0.0.1:{ports[mode.name]}"\n'
        f'tls = "{"implicit" if mode.implicit else "starttls"}"\n\n'
        for mode in IMAP_MODES + POP3_MODES
    )
    config = (
        listeners
        + f'[tls]\ncertificate = "{server_cert.chain_path}"\nkey = "{server_cert.key_path}"\n'
        + "plaintext_auth = false\n\n"
        + '[directory]\ntype = "static"\nmap = "users.map"\n\n'
        + f"[backend]\nimap_port = {store.imap_port}\npop3_port = {store.pop3_port}\n"
        + "connect_timeout = 3\n\n" + RIG_LIMITS
    )
    process = ProxyProcess(tmp_path_factory.mktemp("clients-proxy"), config,
                           list(ports.values()), {"users.map": f"*  {store.host}\n"})
    process.start()
    yield Proxy(process, ports)
    process.stop()


# -- mail on the backend ----------------------------------------------------------------


def message(user: str, subject: str) -> bytes:
    tag = subject.replace(" ", ".")
    return (
        f"From: sender@example.org\r\nTo: {user}@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{tag}.{user}@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"\r\nThis is {subject}.\r\n"
    ).encode()


def seed(store: Dovecot, user: str, folders: dict[str, list[str]]) -> dict[str, list[bytes]]:
    """Create the folders and save messages with the given subjects; the messages."""
    saved: dict[str, list[bytes]] = {}
    for folder, subjects in folders.items():
        if folder != "INBOX":
            store.doveadm("mailbox", "create", "-u", user, folder)
        saved[folder] = [message(user, subject) for subject in subjects]
        for data in saved[folder]:
            store.doveadm("save", "-u", user, "-m", folder, stdin=data)
    return saved


class Stored(NamedTuple):
    subject: str
    flags: frozenset[str]


def backend(store: Dovecot, user: str) -> dict[str, list[Stored]]:
    """Every mailbox of the user (UTF-8 names) -> its messages, as Dovecot sees them."""
    boxes: dict[str, list[Stored]] = {
        name: [] for name in store.doveadm("mailbox", "list", "-u", user).splitlines() if name
    }
    rows = json.loads(store.doveadm("-f", "json", "fetch", "-u", user,
                                    "mailbox flags hdr.subject", "all") or "[]")
    for row in rows:
        flags = frozenset(row["flags"].split()) - {"\\Recent"}  # a session flag
        boxes[row["mailbox"]].append(Stored(row["hdr.subject"], flags))
    return boxes


def subjects(box: list[Stored]) -> list[str]:
    return sorted(m.subject for m in box)


def maildir_messages(folder: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") for p in (folder / sub).iterdir())


def subject_of(path: Path) -> str:
    for line in path.read_bytes().decode().splitlines():
        if line.startswith("Subject: "):
            return line.removeprefix("Subject: ")
    raise AssertionError(f"no Subject in {path}")


# -- running clients ----------------------------------------------------------------------


def client_env(home: Path) -> dict[str, str]:
    """A clean environment: no PYTHONPATH of the suite leaks into Python-based clients."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def run(name: str, argv: list[str], env: dict[str, str], proxy: Proxy,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a client; it must exit by itself, with status 0, well within TIMEOUT."""
    started = time.monotonic()
    try:
        result = subprocess.run(argv, env=env, capture_output=True, timeout=TIMEOUT,
                                check=False, stdin=subprocess.DEVNULL, **kwargs)
    except subprocess.TimeoutExpired as expired:
        result = subprocess.CompletedProcess(argv, None, expired.stdout, expired.stderr)
    took = time.monotonic() - started
    result.stdout = (result.stdout or b"").decode(errors="replace")
    result.stderr = (result.stderr or b"").decode(errors="replace")
    if result.returncode is None:
        pytest.fail(f"{name} did not exit by itself within {TIMEOUT:.0f} s (killed)\n"
                    f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
                    f"--- proxy log ---\n{proxy.process.log()[-3000:]}")
    assert result.returncode == 0, (
        f"{name} exited with {result.returncode} after {took:.2f} s\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    assert took < EXIT_WITHIN, f"{name} took {took:.2f} s (limit {EXIT_WITHIN:.0f} s)"
    return result


def run_on_tty(name: str, argv: list[str], env: dict[str, str], proxy: Proxy) -> str:
    """Run a full-screen client on a pseudo-terminal, like run(); its screen output."""
    master, slave = pty.openpty()
    started = time.monotonic()
    deadline = started + TIMEOUT
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                               start_new_session=True)
    os.close(slave)
    output = b""
    try:
        # Read the screen until the terminal closes (EIO once no process holds it);
        # unread, the pty buffer would fill and block the client.
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            output += chunk
        process.wait(max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{name} did not exit by itself within {TIMEOUT:.0f} s (killed)\n"
                    f"--- screen ---\n{output.decode(errors='replace')[-3000:]}\n"
                    f"--- proxy log ---\n{proxy.process.log()[-3000:]}")
    finally:
        os.close(master)
    took = time.monotonic() - started
    screen = output.decode(errors="replace")
    assert process.returncode == 0, (
        f"{name} exited with {process.returncode} after {took:.2f} s\n{screen[-3000:]}")
    assert took < EXIT_WITHIN, f"{name} took {took:.2f} s (limit {EXIT_WITHIN:.0f} s)"
    return screen


def backslash_quoted(text: str) -> str:
    """A double-quoted string with \\" and \\\\ escapes (mbsync and mutt config syntax)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- IMAP synchronisers ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", cases("mbsync"))
def test_mbsync(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                tmp_path: Path) -> None:
    """Full sync of several folders (one named in non-ASCII), then a flag change, a move
    and a new folder made locally go back to the server."""
    user = account("mbsync", mode)
    seed(store, user.name, {"INBOX": ["inbox 1", "inbox 2", "inbox 3"],
                            "Entwürfe": ["draft 1"], "Archive": []})
    local = tmp_path / "mail"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    # mbsync 1.4 passes mailbox names through unconverted: locally the folder is named in
    # modified UTF-7 (RFC 3501 5.1.3), as on the wire.
    config.write_text(f"""\
IMAPAccount proxy
Host {HOST}
Port {proxy.port(mode)}
User {user.name}
Pass {backslash_quoted(user.password)}
SSLType {"IMAPS" if mode.implicit else "STARTTLS"}
SystemCertificates no
CertificateFile {test_ca.ca_path}

IMAPStore far
Account proxy

MaildirStore near
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel all
Far :far:
Near :near:
Patterns *
Create Both
Expunge Both
SyncState *
""")
    env = client_env(tmp_path / "home")
    command = ["mbsync", "-c", str(config), "-a"]

    run("mbsync (first sync)", command, env, proxy)
    inbox = local / "INBOX"
    assert sorted(subject_of(p) for p in maildir_messages(inbox)) == [
        "inbox 1", "inbox 2", "inbox 3"]
    assert [subject_of(p) for p in maildir_messages(local / "Entw&APw-rfe")] == ["draft 1"]
    assert maildir_messages(local / "Archive") == []

    by_subject = {subject_of(p): p for p in maildir_messages(inbox)}
    # Flag "inbox 1" as flagged and seen: the Maildir info suffix ":2,FS".
    flagged = by_subject["inbox 1"]
    flagged.rename(inbox / "cur" / (flagged.name.partition(":")[0] + ":2,FS"))
    # Move "inbox 2" to Archive; a moved file drops mbsync's ",U=<uid>" (see mbsync(1)).
    moved = by_subject["inbox 2"]
    base = moved.name.partition(":")[0].partition(",U=")[0]
    moved.rename(local / "Archive" / "cur" / (base + ":2,S"))
    sent = local / "Sent"
    for sub in ("cur", "new", "tmp"):
        (sent / sub).mkdir(parents=True)
    (sent / "cur" / "1700000000.1.local:2,S").write_bytes(message(user.name, "sent 1"))

    run("mbsync (second sync)", command, env, proxy)
    boxes = backend(store, user.name)
    assert subjects(boxes["INBOX"]) == ["inbox 1", "inbox 3"], boxes
    flags = {m.subject: m.flags for m in boxes["INBOX"]}
    assert {"\\Flagged", "\\Seen"} <= flags["inbox 1"], boxes
    assert "\\Flagged" not in flags["inbox 3"], boxes
    assert subjects(boxes["Archive"]) == ["inbox 2"], boxes
    assert subjects(boxes["Entwürfe"]) == ["draft 1"], boxes
    assert subjects(boxes["Sent"]) == ["sent 1"], boxes


@pytest.mark.parametrize("mode", cases("offlineimap"))
def test_offlineimap(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                     tmp_path: Path) -> None:
    """Sync down (non-ASCII folder included), then a local flag change and a new local
    message go back up."""
    user = account("offlineimap", mode)
    seed(store, user.name, {"INBOX": ["inbox 1", "inbox 2"], "Entwürfe": ["draft 1"],
                            "Archive": []})
    local = tmp_path / "mail"
    config = tmp_path / "offlineimaprc"
    # remotepass is read with ConfigParser interpolation, so a "%" would be written "%%";
    # quotes and backslashes are taken literally.
    config.write_text(f"""\
[general]
accounts = main
metadata = {tmp_path / "metadata"}

[Account main]
localrepository = near
remoterepository = far
utf8foldernames = yes

[Repository near]
type = Maildir
localfolders = {local}

[Repository far]
type = IMAP
remotehost = {HOST}
remoteport = {proxy.port(mode)}
remoteuser = {user.name}
remotepass = {user.password.replace('%', '%%')}
ssl = yes
sslcacertfile = {test_ca.ca_path}
""")
    env = client_env(tmp_path / "home")
    command = ["offlineimap", "-c", str(config), "-o", "-u", "basic"]

    result = run("offlineimap (first sync)", command, env, proxy)
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert sorted(subject_of(p) for p in maildir_messages(local / "INBOX")) == [
        "inbox 1", "inbox 2"]
    assert [subject_of(p) for p in maildir_messages(local / "Entwürfe")] == ["draft 1"]
    assert maildir_messages(local / "Archive") == []

    first = next(p for p in maildir_messages(local / "INBOX") if subject_of(p) == "inbox 1")
    first.rename(local / "INBOX" / "cur" / (first.name.partition(":2,")[0] + ":2,FS"))
    (local / "Archive" / "new" / "1700000000.1.local").write_bytes(
        message(user.name, "archived 1"))

    result = run("offlineimap (second sync)", command, env, proxy)
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    boxes = backend(store, user.name)
    flags = {m.subject: m.flags for m in boxes["INBOX"]}
    assert set(flags) == {"inbox 1", "inbox 2"}, boxes
    assert {"\\Flagged", "\\Seen"} <= flags["inbox 1"], boxes
    assert "\\Flagged" not in flags["inbox 2"], boxes
    assert subjects(boxes["Archive"]) == ["archived 1"], boxes
    assert subjects(boxes["Entwürfe"]) == ["draft 1"], boxes


# -- fetchers ---------------------------------------------------------------------------------


def fetchmail_quoted(text: str) -> str:
    """A fetchmailrc string: it knows \\xhh escapes but not \\" or \\\\ (fetchmail(1))."""
    return '"' + "".join(f"\\x{ord(c):02x}" if c in '"\\' else c for c in text) + '"'


@pytest.mark.parametrize("mode", cases("fetchmail"))
def test_fetchmail(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                   tmp_path: Path) -> None:
    """Fetch all mail into an MDA (one file per message); fetchmail then deletes it from
    the server (its default without ``keep``)."""
    user = account("fetchmail", mode)
    sent = seed(store, user.name, {"INBOX": ["fetch 1", "fetch 2", "fetch 3"]})["INBOX"]
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    mda = tmp_path / "mda"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp -p {delivered} msg.XXXXXX)"\n')
    mda.chmod(0o755)
    # Without "ssl", sslproto makes STARTTLS/STLS mandatory (fetchmail(1), --sslproto).
    tls = "ssl" if mode.implicit else "sslproto 'TLS1.2+'"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f"""\
set no syslog
poll {HOST} service {proxy.port(mode)} protocol {mode.protocol.upper()}
  user "{user.name}" there password {fetchmail_quoted(user.password)}
  {tls} sslcertck sslcertfile "{test_ca.ca_path}"
  fetchall
  mda "{mda}"
""")
    rc.chmod(0o600)  # fetchmail refuses a readable rc file
    home = tmp_path / "home"
    env = client_env(home) | {"FETCHMAILHOME": str(home)}
    run("fetchmail", ["fetchmail", "-f", str(rc), "--nodetach", "--pidfile",
                      str(home / "fetchmail.pid"), "-v"], env, proxy)

    got = sorted(subject_of(p) for p in delivered.iterdir())
    assert got == ["fetch 1", "fetch 2", "fetch 3"]
    bodies = {p.read_bytes().partition(b"Subject: ")[2] for p in delivered.iterdir()}
    assert bodies == {m.replace(b"\r\n", b"\n").partition(b"Subject: ")[2] for m in sent}
    assert backend(store, user.name)["INBOX"] == [], "fetched mail is deleted on the server"


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory "nobody" owns, outside pytest's root-only temp tree."""
    path = Path(tempfile.mkdtemp(prefix="imapproxy-clients-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", cases("getmail"))
def test_getmail(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                 nobody_dir: Path) -> None:
    """Retrieve all mail into a Maildir and delete it on the server.

    getmail refuses to deliver as root, so it runs as "nobody" from a directory of its
    own. Its IMAP retriever logs in with imaplib's login(), which encodes the command as
    ASCII (so no non-ASCII password over IMAP: getmail-imaps has ASCII_PASSWORD); POP3
    PASS goes out as UTF-8.
    """
    user = account("getmail", mode)
    seed(store, user.name, {"INBOX": ["get 1", "get 2"]})
    maildir = nobody_dir / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    # The test CA sits in pytest's temp tree (root only, 0700): give nobody a copy.
    shutil.copy(test_ca.ca_path, nobody_dir / "ca.pem")
    kind = "IMAP" if mode.protocol == "imap" else "POP3"
    # RawConfigParser: the value is the rest of the line, quotes and backslashes included.
    rc = nobody_dir / "getmailrc"
    rc.write_text(f"""\
[retriever]
type = Simple{kind}SSLRetriever
server = {HOST}
port = {proxy.port(mode)}
username = {user.name}
password = {user.password}
ca_certs = {nobody_dir / "ca.pem"}

[destination]
type = Maildir
path = {maildir}/

[options]
read_all = true
delete = true
""")
    nobody = pwd.getpwnam("nobody")
    for path in (nobody_dir, *nobody_dir.rglob("*")):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    env = client_env(nobody_dir / "home")
    os.chown(nobody_dir / "home", nobody.pw_uid, nobody.pw_gid)
    run("getmail", ["getmail", "--getmaildir", str(nobody_dir / "home"), "--rcfile", str(rc)],
        env, proxy, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        cwd=nobody_dir)

    assert sorted(subject_of(p) for p in maildir_messages(maildir)) == ["get 1", "get 2"]
    assert backend(store, user.name)["INBOX"] == [], "retrieved mail is deleted on the server"


# -- a mail reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", cases("mutt"))
def test_mutt(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
              tmp_path: Path) -> None:
    """Batch mode: tag every message of INBOX and copy them to a new folder, then quit.

    Mutt needs a terminal, so it runs on a pty; the keys come from ``push``. A certificate
    it cannot verify would stop it at an accept/reject prompt the pushed keys do not
    answer, and the case would time out instead of passing.
    """
    user = account("mutt", mode)
    seed(store, user.name, {"INBOX": ["read 1", "read 2", "read 3"]})
    scheme = "imaps" if mode.implicit else "imap"
    url = f"{scheme}://{HOST}:{proxy.port(mode)}/"
    home = tmp_path / "home"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(f"""\
set imap_user = {backslash_quoted(user.name)}
set imap_pass = {backslash_quoted(user.password)}
set ssl_ca_certificates_file = "{test_ca.ca_path}"
set certificate_file = "{home}/certificates"
set ssl_force_tls = yes
set ssl_starttls = yes
set folder = "{url}"
set spoolfile = "+INBOX"
set confirmappend = no
set confirmcreate = no
set quit = yes
set sleep_time = 0
set header_cache = ""
set message_cachedir = ""
""")
    env = client_env(home) | {"TERM": "vt100"}
    keys = "<tag-pattern>~A<enter><tag-prefix><copy-message>=Copies<enter><quit>"
    run_on_tty("mutt", ["mutt", "-n", "-F", str(muttrc), "-f", f"{url}INBOX",
                        "-e", f'push "{keys}"'], env, proxy)

    boxes = backend(store, user.name)
    assert subjects(boxes["Copies"]) == ["read 1", "read 2", "read 3"], boxes
    assert subjects(boxes["INBOX"]) == ["read 1", "read 2", "read 3"], boxes


# -- curl -----------------------------------------------------------------------------------------


def curl(mode: Mode, proxy: Proxy, test_ca: TestCA, user: MailUser, path: str,
         tmp_path: Path) -> str:
    scheme = {STARTTLS: "imap", IMAPS: "imaps", STLS: "pop3", POP3S: "pop3s"}[mode]
    # --ssl-reqd: STARTTLS/STLS or fail, never plaintext (on imaps/pop3s TLS anyway).
    argv = ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(test_ca.ca_path),
            "--user", f"{user.name}:{user.password}",
            f"{scheme}://{HOST}:{proxy.port(mode)}/{path}"]
    return run("curl", argv, client_env(tmp_path / "home"), proxy).stdout


@pytest.mark.parametrize("mode", cases("curl", "imap"))
def test_curl_imap(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                   tmp_path: Path) -> None:
    """LIST every mailbox, then FETCH one message by UID."""
    user = account("curl", mode)
    sent = seed(store, user.name, {"INBOX": ["curl 1", "curl 2"], "Entwürfe": ["draft 1"]})
    listing = curl(mode, proxy, test_ca, user, "", tmp_path)
    names = sorted(line.rpartition(" ")[2] for line in listing.splitlines())
    # Mailbox names on the wire are modified UTF-7 (RFC 3501 5.1.3).
    assert names == sorted(
        imapclient.imap_utf7.encode(name).decode() for name in backend(store, user.name))
    assert "Entw&APw-rfe" in names
    uid = store.doveadm("-f", "flow", "fetch", "-u", user.name, "uid", "mailbox", "INBOX",
                        "header", "Subject", "curl 2").strip().partition("uid=")[2]
    body = curl(mode, proxy, test_ca, user, f"INBOX;UID={uid}", tmp_path)
    assert body.encode().replace(b"\r\n", b"\n") == sent["INBOX"][1].replace(b"\r\n", b"\n")


@pytest.mark.parametrize("mode", cases("curl", "pop3"))
def test_curl_pop3(mode: Mode, store: Dovecot, proxy: Proxy, test_ca: TestCA,
                   tmp_path: Path) -> None:
    """LIST the messages, then RETR the first."""
    user = account("curl", mode)
    sent = seed(store, user.name, {"INBOX": ["curl 1", "curl 2", "curl 3"]})["INBOX"]
    listing = curl(mode, proxy, test_ca, user, "", tmp_path)
    assert [line.split()[0] for line in listing.splitlines()] == ["1", "2", "3"]
    assert len(listing.splitlines()) == store.message_count(user.name)
    body = curl(mode, proxy, test_ca, user, "1", tmp_path)
    assert body.encode().replace(b"\r\n", b"\n") == sent[0].replace(b"\r\n", b"\n")


# -- Python's libraries --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", cases("imaplib"))
def test_imaplib(mode: Mode, store: Dovecot, proxy: Proxy, client_tls: ssl.SSLContext) -> None:
    """LOGIN, APPEND a flagged message, LOGOUT. imaplib encodes commands as ASCII (it has
    no UTF8=ACCEPT, RFC 6855), so its login() cannot send a non-ASCII password: this user
    has ASCII_PASSWORD, which still needs quoted-string escapes."""
    user = account("imaplib", mode)
    if mode.implicit:
        client = imaplib.IMAP4_SSL(HOST, proxy.port(mode), ssl_context=client_tls)
    else:
        client = imaplib.IMAP4(HOST, proxy.port(mode))
        client.starttls(ssl_context=client_tls)
    assert client.login(user.name, user.password)[0] == "OK"
    typ, _ = client.append("INBOX", "(\\Flagged)", None, message(user.name, "appended 1"))
    assert typ == "OK"
    assert client.logout()[0] == "BYE"
    boxes = backend(store, user.name)
    assert [(m.subject, "\\Flagged" in m.flags) for m in boxes["INBOX"]] == [
        ("appended 1", True)]


def imapclient_session(mode: Mode, proxy: Proxy, client_tls: ssl.SSLContext,
                       user: MailUser) -> imapclient.IMAPClient:
    client = imapclient.IMAPClient(HOST, proxy.port(mode), ssl=mode.implicit,
                                   ssl_context=client_tls, timeout=TIMEOUT)
    if not mode.implicit:
        client.starttls(client_tls)
    # AUTHENTICATE PLAIN sends the password as UTF-8 (RFC 4616), non-ASCII included.
    client.plain_login(user.name, user.password)
    return client


FOLDER = "Ärger & Ähnliches"


@pytest.mark.parametrize("mode", cases("imapclient"))
def test_imapclient(mode: Mode, store: Dovecot, proxy: Proxy,
                    client_tls: ssl.SSLContext) -> None:
    """Create a folder with a non-ASCII name, append to it, flag the message, log out."""
    user = account("imapclient", mode)
    client = imapclient_session(mode, proxy, client_tls, user)
    # In modified UTF-7 (RFC 3501 5.1.3) this is "&AMQ-rger &- &AMQ-hnliches".
    client.create_folder(FOLDER)
    client.append(FOLDER, message(user.name, "filed 1"))
    client.select_folder(FOLDER)
    client.add_flags(client.search(["SUBJECT", "filed 1"]), [imapclient.SEEN, "$Done"])
    assert client.logout().startswith(b"Logging out")
    boxes = backend(store, user.name)
    assert subjects(boxes[FOLDER]) == ["filed 1"], boxes
    assert {"\\Seen", "$Done"} <= boxes[FOLDER][0].flags, boxes


@pytest.mark.parametrize("mode", cases("poplib"))
def test_poplib(mode: Mode, store: Dovecot, proxy: Proxy, client_tls: ssl.SSLContext) -> None:
    """USER/PASS (UTF-8), STAT, RETR, DELE, QUIT: the deletion happens on the server."""
    user = account("poplib", mode)
    sent = seed(store, user.name, {"INBOX": ["pop 1", "pop 2"]})["INBOX"]
    if mode.implicit:
        client = poplib.POP3_SSL(HOST, proxy.port(mode), context=client_tls)
    else:
        client = poplib.POP3(HOST, proxy.port(mode))
        client.stls(client_tls)
    client.user(user.name)
    assert client.pass_(user.password).startswith(b"+OK")
    assert client.stat()[0] == 2
    _, lines, _ = client.retr(1)
    assert b"\n".join(lines) + b"\n" == sent[0].replace(b"\r\n", b"\n")
    client.dele(1)
    assert client.quit().startswith(b"+OK")
    assert subjects(backend(store, user.name)["INBOX"]) == ["pop 2"]


# -- IDLE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", cases("idle"))
def test_idle_sees_delivery(mode: Mode, store: Dovecot, proxy: Proxy,
                            client_tls: ssl.SSLContext) -> None:
    """A client in IDLE gets ``* n EXISTS`` for mail delivered by dovecot-lda (RFC 2177)."""
    user = account("idle", mode)
    seed(store, user.name, {"INBOX": ["old 1"]})
    client = imapclient_session(mode, proxy, client_tls, user)
    assert client.select_folder("INBOX")[b"EXISTS"] == 1
    client.idle()
    delivered = time.monotonic()
    store.deliver(user.name, message(user.name, "new 1"))
    responses: list = []
    while (2, b"EXISTS") not in responses and time.monotonic() - delivered < IDLE_WITHIN:
        responses += client.idle_check(timeout=0.5)
    took = time.monotonic() - delivered
    client.idle_done()
    assert (2, b"EXISTS") in responses, f"after {took:.2f} s: {responses}"
    assert client.logout().startswith(b"Logging out")
    assert subjects(backend(store, user.name)["INBOX"]) == ["new 1", "old 1"]

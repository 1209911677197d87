"""A real OpenLDAP slapd (mdb backend, slapd.conf) run as a child process.

The directory holds ``dc=example,dc=org`` with user entries below
``ou=people,dc=example,dc=org``; the admin DN writes, anonymous clients may read
everything except userPassword. Each user entry is an inetOrgPerson plus
misc.schema's inetLocalMailRecipient (``mailHost``) plus our auxiliary
``imapProxyUser`` (``mailImapPort``, ``mailPop3Port``, ``mailLoginName``, ``mailSievePort``, see
``imapproxy.schema`` beside this file).

Note: misc.schema declares ``mailHost`` SINGLE-VALUE, so slapd itself refuses an
entry with two hosts (add_user raises RuntimeError naming the constraint).

Replication (RFC 4533 syncrepl): ``Slapd(..., syncprov=True)`` is a provider (the
syncprov overlay), ``Slapd(..., provider=that)`` a read-only consumer of it, and
``ReplicatedSlapd`` starts such a pair. Why provider/consumer and not two providers
in mirror mode: the proxy only reads, so a replica that takes no writes is all it
needs, and it is the usual deployment (one writable master, read-only replicas near
the readers); a change made on the provider reaching the proxy through the consumer
is exactly the path a moved user takes in production. Mirror mode adds nothing the
proxy can observe but a second write path to keep consistent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import ldap3
from ldap3.utils.dn import escape_rdn

from .certs import CertPair
from .ports import free_port
from .processes import stop_process, tail

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
#: Our schema file, shipped next to this module.
IMAPPROXY_SCHEMA = Path(__file__).with_name("imapproxy.schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")

#: Seconds start() waits for slapd to answer a search.
START_TIMEOUT = 10.0
#: Seconds stop() waits after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: Bytes of a Unix socket path (Linux's sun_path, less its terminating NUL).
MAX_SOCKET_PATH = 107
#: Seconds between a consumer's attempts to reach its provider again (syncrepl
#: retry): short, so a restarted provider is caught up with at once.
SYNC_RETRY = 1
#: Seconds wait_for_user() polls by default: replication over loopback takes
#: milliseconds, a retry after a provider restart up to SYNC_RETRY more.
REPLICATION_TIMEOUT = 10.0

#: A user entry as read back: attribute name -> values as text.
Attributes = Mapping[str, Sequence[str]]


class _Unchanged:
    """Marker for 'leave this attribute alone' in modify_user()."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


class Slapd:
    """One slapd on free 127.0.0.1 ports; with ``cert`` also ldaps:// and StartTLS.

    It also listens on ldapi:// (a Unix socket in ``workdir``) when the path is short
    enough for a socket address, and with ``ipv6`` on a free port of [::1] too.

    With ``syncprov`` it is a syncrepl provider (RFC 4533): the syncprov overlay
    serves its changes to consumers. With ``provider`` (a Slapd made with
    ``syncprov``) it is a consumer of that one: it starts with an empty database,
    fills it by a refreshAndPersist search of the whole suffix, bound as the
    provider's admin, and follows every change from then on. It takes no writes: its
    rootdn has no password, anonymous writes are refused, and a bound client's would
    get a referral to the provider (``updateref``); admin_connection() raises.
    start() of a new consumer returns once the base entry has arrived.
    """

    host = "127.0.0.1"
    suffix = "dc=example,dc=org"
    base = "ou=people,dc=example,dc=org"
    admin_dn = "cn=admin,dc=example,dc=org"
    admin_password = "admin-secret"

    def __init__(self, workdir: Path, cert: CertPair | None = None, ipv6: bool = False, *,
                 syncprov: bool = False, provider: Slapd | None = None) -> None:
        if provider is not None and not provider.syncprov:
            raise ValueError(f"{provider!r} is no provider: make it with syncprov=True")
        self.workdir = Path(workdir).resolve()
        self.cert = cert
        self.syncprov = syncprov
        self.provider = provider
        #: True while stopped with SIGSTOP (pause()): a hung server
        self.paused = False
        self.port = free_port(self.host)
        self.ldaps_port: int | None = free_port(self.host) if cert else None
        self.ipv6_port: int | None = free_port("::1") if ipv6 else None
        socket_path = self.workdir / "ldapi"
        # A deep pytest tmp dir can be too long for a socket address: no ldapi then.
        self.ldapi_path: Path | None = (
            socket_path if len(str(socket_path).encode()) <= MAX_SOCKET_PATH else None)
        self.config_path = self.workdir / "slapd.conf"
        self.db_dir = self.workdir / "db"
        self.log_path = self.workdir / "slapd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self._config())

    @property
    def uri(self) -> str:
        """``ldap://127.0.0.1:PORT`` (StartTLS offered when a cert was given)."""
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_uri(self) -> str | None:
        """``ldaps://127.0.0.1:PORT`` (implicit TLS), or None without a cert."""
        return None if self.ldaps_port is None else f"ldaps://{self.host}:{self.ldaps_port}"

    @property
    def ldapi_uri(self) -> str | None:
        """``ldapi://%2F...%2Fldapi/`` (the socket path percent-encoded), or None."""
        if self.ldapi_path is None:
            return None
        return f"ldapi://{quote(str(self.ldapi_path), safe='')}/"

    @property
    def ipv6_uri(self) -> str | None:
        """``ldap://[::1]:PORT/`` when started with ``ipv6``, else None."""
        return None if self.ipv6_port is None else f"ldap://[::1]:{self.ipv6_port}/"

    def _replication(self) -> tuple[str, str]:
        """(module lines, database lines) for the provider's or the consumer's role."""
        if self.provider is not None:
            provider = self.provider
            # rid: the consumer's id for this provider (three digits). retry: every
            # SYNC_RETRY s, forever ("+"). timeout / network-timeout bound one
            # attempt, so a hung provider is retried rather than waited on.
            return "", f"""\
index entryUUID,entryCSN eq
syncrepl rid=001
  provider={provider.uri}
  type=refreshAndPersist
  retry="{SYNC_RETRY} +"
  timeout=2
  network-timeout=2
  searchbase="{provider.suffix}"
  bindmethod=simple
  binddn="{provider.admin_dn}"
  credentials="{provider.admin_password}"
updateref {provider.uri}
"""
        if self.syncprov:
            # checkpoint: contextCSN written every 100 writes or 1 minute; the session
            # log lets a consumer that was away catch up by delta, not by a full
            # refresh (RFC 4533 section 3.3.1).
            return "moduleload syncprov\n", """\
index entryUUID,entryCSN eq
overlay syncprov
syncprov-checkpoint 100 1
syncprov-sessionlog 1000
"""
        return "", ""

    def _config(self) -> str:
        includes = "".join(f"include {SCHEMA_DIR / name}.schema\n" for name in SCHEMAS)
        modules, replication = self._replication()
        # A consumer's rootdn is the identity syncrepl writes as; with no password no
        # one can bind as it, so every write from outside gets the referral and the
        # replica cannot drift from its provider.
        rootpw = "" if self.provider is not None else f"rootpw {self.admin_password}\n"
        tls = ""
        if self.cert is not None:
            tls = (
                f"TLSCACertificateFile {self.cert.chain_path}\n"
                f"TLSCertificateFile {self.cert.cert_path}\n"
                f"TLSCertificateKeyFile {self.cert.key_path}\n"
            )
        return f"""\
# Generated by tests/rig/slapd.py; do not edit.
{includes}include {IMAPPROXY_SCHEMA}
pidfile {self.workdir / "slapd.pid"}
argsfile {self.workdir / "slapd.args"}
modulepath {MODULE_DIR}
moduleload back_mdb
{modules}{tls}
database mdb
# mdb maps this much address space; it is sparse, not allocated
maxsize 1073741824
suffix "{self.suffix}"
rootdn "{self.admin_dn}"
{rootpw}directory {self.db_dir}
sizelimit unlimited
index objectClass eq
index uid,mail,mailLocalAddress,mailLoginName eq

access to attrs=userPassword
  by self write
  by anonymous auth
  by * none
access to *
  by * read
{replication}"""

    # -- lifecycle -----------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while slapd is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start slapd and block until it answers an anonymous search (RuntimeError otherwise)."""
        if not SLAPD.exists():
            raise RuntimeError("slapd not installed: run scripts/install-deps")
        if self.running:
            return
        if self.provider is None and not (self.db_dir / "data.mdb").exists():
            # A consumer gets everything, the suffix too, from its provider.
            self._seed()
        listeners = f"{self.uri}/"
        if self.ldaps_uri is not None:
            listeners += f" {self.ldaps_uri}/"
        if self.ldapi_uri is not None:
            listeners += f" {self.ldapi_uri}"
        if self.ipv6_uri is not None:
            listeners += f" {self.ipv6_uri}"
        with self.log_path.open("ab") as log:
            # -d keeps slapd in the foreground; "stats" logs connections and operations,
            # "sync" what syncprov sends and syncrepl receives.
            debug = ["-d", "stats"]
            if self.syncprov or self.provider is not None:
                debug += ["-d", "sync"]
            self._process = subprocess.Popen(
                [str(SLAPD), *debug, "-h", listeners, "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None:
                self._fail(f"slapd exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                self._fail(f"slapd did not answer on {self.uri} within {START_TIMEOUT} s")
            time.sleep(0.05)

    def _seed(self) -> None:
        ldif = (
            f"dn: {self.suffix}\nobjectClass: dcObject\nobjectClass: organization\n"
            f"dc: example\no: Example\n\n"
            f"dn: {self.base}\nobjectClass: organizationalUnit\nou: people\n"
        )
        result = subprocess.run(
            [str(SLAPADD), "-q", "-f", str(self.config_path)],
            input=ldif.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"slapadd failed: {result.stderr.decode(errors='replace')}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                pass
            if self.ldaps_port is not None:
                with socket.create_connection((self.host, self.ldaps_port), timeout=1.0):
                    pass
            if self.ipv6_port is not None:
                with socket.create_connection(("::1", self.ipv6_port), timeout=1.0):
                    pass
            if self.ldapi_path is not None:
                with socket.socket(socket.AF_UNIX) as unix:
                    unix.settimeout(1.0)
                    unix.connect(str(self.ldapi_path))
            connection = ldap3.Connection(
                ldap3.Server(self.host, port=self.port, connect_timeout=1), auto_bind=True
            )
            try:
                return bool(connection.search(self.base, "(objectClass=*)", ldap3.BASE))
            finally:
                connection.unbind()
        except (OSError, ldap3.core.exceptions.LDAPException):
            return False

    def _fail(self, message: str) -> None:
        raise RuntimeError(f"{message}\n--- {self.log_path} ---\n{tail(self.log_path)}")

    def stop(self) -> None:
        """Stop slapd (SIGTERM); no-op when not running. Data survives a later start()."""
        process, self._process = self._process, None
        if process is None:
            return
        if self.paused:
            # A stopped process takes SIGTERM only once it runs again.
            self.resume(process)
        stop_process(process, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL slapd, as a crash would; mdb's data survives a later start()."""
        process, self._process = self._process, None
        if process is None:
            return
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP slapd: a hung server. Its sockets stay open and the kernel still
        completes TCP handshakes on its listeners, but nothing is ever answered."""
        if self._process is None:
            raise RuntimeError(f"{self!r} is not running")
        os.killpg(self._process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self, process: subprocess.Popen[bytes] | None = None) -> None:
        """SIGCONT after pause(): slapd answers what waited, and carries on."""
        process = process or self._process
        if process is None:
            raise RuntimeError(f"{self!r} is not running")
        os.killpg(process.pid, signal.SIGCONT)
        self.paused = False

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        role = (" consumer" if self.provider is not None
                else " provider" if self.syncprov else "")
        return f"<Slapd {self.uri}{role}>"

    # -- entries -------------------------------------------------------------

    def dn(self, uid: str) -> str:
        """The DN of user ``uid``."""
        return f"uid={escape_rdn(uid)},{self.base}"

    def admin_connection(self) -> ldap3.Connection:
        """A bound admin connection (caller unbinds); a consumer has none (RuntimeError)."""
        if self.provider is not None:
            raise RuntimeError(f"{self!r} is a read-only consumer: write to {self.provider!r}")
        return ldap3.Connection(
            ldap3.Server(self.host, port=self.port),
            user=self.admin_dn,
            password=self.admin_password,
            auto_bind=True,
            raise_exceptions=False,
        )

    def _apply(self, operation: str, dn: str, call: Callable[[ldap3.Connection], bool]) -> None:
        connection = self.admin_connection()
        try:
            ok = call(connection)
            result = connection.result
        finally:
            connection.unbind()
        if not ok:
            raise RuntimeError(
                f"LDAP {operation} {dn} failed: {result.get('description')}: "
                f"{result.get('message')}"
            )

    def add_user(
        self,
        uid: str,
        mail: str | None = None,
        mail_host: list[str] | str | None = None,
        imap_port: int | None = None,
        pop3_port: int | None = None,
        login_name: str | None = None,
        sieve_port: int | None = None,
    ) -> str:
        """Add ``uid=<uid>`` below ``base`` and return its DN; None leaves an attribute out."""
        attributes: dict[str, list[str]] = {
            "objectClass": ["inetOrgPerson", "inetLocalMailRecipient", "imapProxyUser"],
            "uid": [uid],
            "cn": [uid],
            "sn": [uid],
        }
        for name, value in (
            ("mail", mail),
            ("mailHost", mail_host),
            ("mailImapPort", imap_port),
            ("mailPop3Port", pop3_port),
            ("mailLoginName", login_name),
            ("mailSievePort", sieve_port),
        ):
            if values := _values(value):
                attributes[name] = values
        dn = self.dn(uid)
        self._apply("add", dn, lambda c: c.add(dn, attributes=attributes))
        return dn

    def delete_user(self, uid: str) -> None:
        """Delete the entry of ``uid``."""
        dn = self.dn(uid)
        self._apply("delete", dn, lambda c: c.delete(dn))

    def modify_user(
        self,
        uid: str,
        *,
        mail: str | None | _Unchanged = UNCHANGED,
        mail_host: list[str] | str | None | _Unchanged = UNCHANGED,
        imap_port: int | None | _Unchanged = UNCHANGED,
        pop3_port: int | None | _Unchanged = UNCHANGED,
        login_name: str | None | _Unchanged = UNCHANGED,
    ) -> None:
        """Replace the given attributes of ``uid``; None removes one, omitted ones stay."""
        changes: dict[str, list[tuple[str, list[str]]]] = {}
        for name, value in (
            ("mail", mail),
            ("mailHost", mail_host),
            ("mailImapPort", imap_port),
            ("mailPop3Port", pop3_port),
            ("mailLoginName", login_name),
        ):
            if not isinstance(value, _Unchanged):
                changes[name] = [(ldap3.MODIFY_REPLACE, _values(value))]
        if not changes:
            return
        dn = self.dn(uid)
        self._apply("modify", dn, lambda c: c.modify(dn, changes))

    def modify_host(self, uid: str, mail_host: list[str] | str | None) -> None:
        """Replace (or with None remove) the mailHost of ``uid``."""
        self.modify_user(uid, mail_host=mail_host)

    def user(self, uid: str) -> dict[str, list[str]] | None:
        """The attributes of ``uid``'s entry as this server has them (anonymous read,
        so no userPassword), or None when it has no such entry."""
        connection = ldap3.Connection(
            ldap3.Server(self.host, port=self.port, get_info=ldap3.NONE, connect_timeout=2),
            auto_bind=True, receive_timeout=2)
        try:
            connection.search(self.dn(uid), "(objectClass=*)", ldap3.BASE, attributes=["*"])
            if not connection.response:
                return None
            raw = connection.response[0]["raw_attributes"]
            return {name: [v.decode() for v in values] for name, values in raw.items()}
        finally:
            connection.unbind()

    def wait_for_user(
        self,
        uid: str,
        predicate: Callable[[Attributes | None], bool],
        timeout: float = REPLICATION_TIMEOUT,
    ) -> Attributes | None:
        """Poll until ``predicate(self.user(uid))`` holds; return what it accepted.

        For a consumer: wait for a change made on the provider to arrive
        (replication is asynchronous). RuntimeError after ``timeout`` seconds, with
        what was read last and the log's tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.user(uid)
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                self._fail(f"{self!r}: {uid} did not reach the expected state within "
                           f"{timeout} s; last read: {found}")
            time.sleep(0.01)


def has(**expected: object) -> Callable[[Attributes | None], bool]:
    """A wait_for_user predicate: the entry exists and each given attribute has exactly
    these values (``mailImapPort=143``, ``mailHost="a"``, a list for several; None:
    the attribute is absent)."""

    def check(found: Attributes | None) -> bool:
        if found is None:
            return False
        return all(sorted(found.get(name, [])) == sorted(_values(value))
                   for name, value in expected.items())

    return check


def absent(found: Attributes | None) -> bool:
    """A wait_for_user predicate: there is no such entry (deleted)."""
    return found is None


class ReplicatedSlapd:
    """A syncrepl pair: ``provider`` takes the writes, ``consumer`` replicates them.

    Writes (add_user, modify_user, delete_user) go to the provider; wait_replicated()
    waits for the consumer to have them. ``uris`` lists both, provider first, as a
    proxy's ``[directory.ldap] uris`` would. See the module docstring for why a
    provider and a read-only consumer rather than mirror mode.
    """

    def __init__(self, workdir: Path, cert: CertPair | None = None) -> None:
        workdir = Path(workdir)
        self.provider = Slapd(workdir / "provider", cert, syncprov=True)
        self.consumer = Slapd(workdir / "consumer", cert, provider=self.provider)
        self.base = self.provider.base

    @property
    def uris(self) -> list[str]:
        """[provider URI, consumer URI]."""
        return [self.provider.uri, self.consumer.uri]

    def start(self) -> ReplicatedSlapd:
        """Start the provider, then the consumer (which returns once it has the base)."""
        self.provider.start()
        self.consumer.start()
        return self

    def stop(self) -> None:
        """Stop both (either may have been stopped, killed or paused already)."""
        # Provider first: a consumer's shutdown otherwise waits for its persistent
        # search to time out (2 s); with the provider gone that search has ended.
        self.provider.stop()
        self.consumer.stop()

    def __enter__(self) -> ReplicatedSlapd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ReplicatedSlapd {self.provider.uri} -> {self.consumer.uri}>"

    def add_user(self, uid: str, **attributes: Any) -> str:
        """Slapd.add_user on the provider, then wait until the consumer has the entry."""
        dn = self.provider.add_user(uid, **attributes)
        self.wait_replicated(uid, lambda found: found is not None)
        return dn

    def modify_user(self, uid: str, **changes: Any) -> None:
        """Slapd.modify_user on the provider (returns at once: see wait_replicated)."""
        self.provider.modify_user(uid, **changes)

    def delete_user(self, uid: str) -> None:
        """Slapd.delete_user on the provider (returns at once: see wait_replicated)."""
        self.provider.delete_user(uid)

    def wait_replicated(
        self,
        uid: str,
        predicate: Callable[[Attributes | None], bool],
        timeout: float = REPLICATION_TIMEOUT,
    ) -> Attributes | None:
        """Poll the consumer until ``uid``'s entry satisfies ``predicate`` (see has(),
        absent()); returns the entry as accepted."""
        return self.consumer.wait_for_user(uid, predicate, timeout)

# -*- test-case-name: tests.test_ldapsearch -*-
"""Blocking LDAP searches with ldap3: ``LdapSearcher``, to be run on a thread pool.

Every call here blocks (connect, StartTLS, bind, search), so it runs only on the
directory's dedicated ``ThreadPool``, never on the reactor thread (ldapdirectory.py
does the hand-over); nothing here imports Twisted. Each pool thread takes a slot of
its own: one pooled ldap3 connection, which is not thread-safe.

What Perdition's LDAP map got wrong, and what this module does instead (see
shared/reference/perdition.md): LDAPv3 only; URIs are tried in order and the first
that answers wins; connections are pooled and re-established after a server restart;
the bind password is never part of a message. URIs are read by ldapurl.py (every
RFC 4516 form, and ldapi), not by ldap3, and ldap3 is given host, port and TLS apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import queue
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote

import ldap3
from ldap3.core.exceptions import LDAPException

from .config import LdapConfig
from .ldapentry import SIZE_LIMIT, RawEntry
from .ldapurl import LdapUri, parse_ldap_uri

# RFC 4511 section 4.1.9 result codes that mean "the search ran": success, and
# sizeLimitExceeded, which with SIZE_LIMIT = 2 means "at least two entries".
_SEARCH_OK = {0, 4}
# noSuchObject (RFC 4511 appendix A.1): the base DN does not exist there, so no
# entry can match. An answer, not an outage.
_NO_SUCH_OBJECT = 32

_SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What one search attempt across the URIs gave."""

    #: the entries found, or None when no URI could answer
    entries: list[RawEntry] | None
    #: the URI that answered
    answered: str | None = None
    #: (uri, reason) for each URI that failed before the answer (or all of them)
    failures: list[tuple[str, str]] = field(default_factory=list)


Search = Callable[[Sequence[str], str], SearchResult]


class SearchFailed(Exception):
    """One URI could not answer (socket, TLS, bind or server-side error)."""


@dataclass(slots=True)
class _Slot:
    conn: Any = None  # ldap3.Connection; the stubs are not typed
    uri: str | None = None

    def drop(self) -> None:
        conn, self.conn, self.uri = self.conn, None, None
        if conn is not None:
            # It is being thrown away, usually because it is broken.
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class LdapSearcher:
    """Blocking ldap3 searches over a fixed set of pooled connections.

    ``search`` may be called from up to ``slots`` threads at once: each call takes a
    slot (one ldap3 connection, which is not thread-safe) for its duration. With one
    slot per pool thread, taking a slot never waits.
    """

    def __init__(self, cfg: LdapConfig, slots: int) -> None:
        self.cfg = cfg
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._all = [_Slot() for _ in range(slots)]
        self._targets = {uri: parse_ldap_uri(uri) for uri in cfg.uris}
        for slot in self._all:
            self._slots.put(slot)

    def _target(self, uri: str) -> LdapUri:
        target = self._targets.get(uri)
        if target is None:
            # Checked at config load, so this does not raise for configured URIs.
            target = self._targets[uri] = parse_ldap_uri(uri)
        return target

    def _starttls(self, target: LdapUri) -> bool:
        # Not over ldapi: a local socket is not on any network to protect, and a
        # certificate could not name it.
        return self.cfg.starttls and target.scheme == "ldap"

    def _server(self, uri: str) -> Any:
        target = self._target(uri)
        if target.socket_path is not None:
            # ldap3 2.9 takes the socket path from an "ldapi://" string: it
            # percent-decodes what follows "ldapi:/", the last "/" of the scheme
            # included, so the path goes in without its leading "/".
            encoded = quote(target.socket_path.removeprefix("/"), safe="")
            return ldap3.Server(f"ldapi://{encoded}", get_info=ldap3.NONE,
                                connect_timeout=self.cfg.timeout)
        tls = None
        if target.implicit_tls or self._starttls(target):
            # ldap3 checks the name itself after the handshake (ssl's check_hostname
            # is off in its context) whenever validate is CERT_REQUIRED.
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(self.cfg.ca_file) if self.cfg.ca_file else None,
                sni=None if _is_ip(target.host) else target.host,
            )
        # Host, port and TLS given apart, never the URI: ldap3 2.9 parses URIs
        # itself and fails on the trailing "/" of the usual form ("port must be an
        # integer"). An IPv6 address goes in without brackets.
        return ldap3.Server(
            target.host, port=target.port, use_ssl=target.implicit_tls,
            get_info=ldap3.NONE, connect_timeout=self.cfg.timeout, tls=tls,
        )

    def search(self, uris: Sequence[str], search_filter: str) -> SearchResult:
        """Try the URIs in order; the first that answers wins."""
        return self._first_answer(uris, partial(self._search, search_filter=search_filter))

    def probe(self, uris: Sequence[str]) -> SearchResult:
        """Read the base entry (no attributes) from the first URI that answers.

        The same connections, TLS and bind as a lookup, at the cost of one entry:
        entries is [] when the base DN is not there (noSuchObject).
        """
        return self._first_answer(uris, self._read_base)

    def _first_answer(self, uris: Sequence[str],
                      operation: Callable[[Any], list[RawEntry]]) -> SearchResult:
        slot = self._slots.get()
        try:
            failures: list[tuple[str, str]] = []
            for uri in uris:
                try:
                    entries = self._search_on(slot, uri, operation)
                except SearchFailed as e:
                    failures.append((uri, str(e)))
                    continue
                return SearchResult(entries, uri, failures)
            return SearchResult(None, None, failures)
        finally:
            self._slots.put(slot)

    def _search_on(self, slot: _Slot, uri: str,
                   operation: Callable[[Any], list[RawEntry]]) -> list[RawEntry]:
        if slot.conn is not None and slot.uri == uri:
            try:
                return operation(slot.conn)
            except (LDAPException, OSError) as e:
                slot.drop()
                if isinstance(e, TimeoutError):
                    raise SearchFailed(f"timed out: {e}") from None
                # A pooled connection dies with a restarted server (or an idle
                # timeout on its side): one retry on a fresh connection, so the
                # proxy recovers without a restart.
            except SearchFailed:
                slot.drop()
                raise
        slot.drop()
        try:
            slot.conn, slot.uri = self._connect(uri), uri
            return operation(slot.conn)
        except (LDAPException, OSError) as e:
            slot.drop()
            raise SearchFailed(str(e) or type(e).__name__) from None
        except SearchFailed:
            slot.drop()
            raise

    def _connect(self, uri: str) -> Any:
        cfg = self.cfg
        conn = ldap3.Connection(
            # A new ldap3.Server each time: a Server remembers addresses that
            # failed and refuses them later ("invalid server address"), which
            # would outlast the LDAP server's restart.
            self._server(uri),
            user=cfg.bind_dn or None,
            password=cfg.bind_password or None,
            authentication=ldap3.SIMPLE if cfg.bind_dn else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            # Not receive_timeout: ldap3 2.9 packs it into SO_RCVTIMEO with
            # struct "LL", which fails for a fractional timeout. Server's
            # connect_timeout is set with settimeout() before connect() and stays
            # on the socket (and its TLS wrapper), so it bounds every read and the
            # TLS handshake too.
            receive_timeout=None,
            read_only=True,
            auto_referrals=False,
            raise_exceptions=False,
        )
        try:
            conn.open()
            if self._starttls(self._target(uri)) and not conn.start_tls():
                raise SearchFailed("StartTLS refused")
            if not conn.bind():
                # The result's description ("invalidCredentials") names the problem;
                # the password is never part of any message we build.
                who = cfg.bind_dn or "anonymous"
                raise SearchFailed(f"bind as {who} failed: {conn.result.get('description')}")
        except BaseException:
            _Slot(conn).drop()
            raise
        return conn

    def _search(self, conn: Any, search_filter: str) -> list[RawEntry]:
        cfg = self.cfg
        attributes = [a for a in (cfg.host_attribute, cfg.imap_port_attribute,
                                  cfg.pop3_port_attribute, cfg.managesieve_port_attribute,
                                  cfg.login_attribute) if a]
        conn.search(
            search_base=cfg.base,
            search_filter=search_filter,
            search_scope=_SCOPES[cfg.scope],
            attributes=attributes,
            size_limit=SIZE_LIMIT,
            time_limit=max(1, math.ceil(cfg.timeout)),
        )
        return self._entries(conn)

    def _entries(self, conn: Any) -> list[RawEntry]:
        code = conn.result.get("result")
        if code == _NO_SUCH_OBJECT:
            return []
        if code not in _SEARCH_OK:
            raise SearchFailed(f"search failed: {conn.result.get('description')}")
        return [
            (item["dn"], item.get("raw_attributes", {}))
            for item in conn.response or []
            if item.get("type") == "searchResEntry"  # continuation references ignored
        ]

    def _read_base(self, conn: Any) -> list[RawEntry]:
        conn.search(
            search_base=self.cfg.base,
            search_filter="(objectClass=*)",
            search_scope=ldap3.BASE,
            # RFC 4511 section 4.5.1.8: "1.1" asks for no attributes at all.
            attributes=["1.1"],
            size_limit=1,
            time_limit=max(1, math.ceil(self.cfg.timeout)),
        )
        return self._entries(conn)

    def close(self) -> None:
        """Unbind every pooled connection; call when no search is running."""
        for slot in self._all:
            slot.drop()

"""Session fixtures for the real-component rig: a test CA, two Dovecot stores, slapd.

The rig lives in ``tests/rig`` and is importable as ``rig`` from any test
(``from rig.dovecot import Dovecot``) because this file puts ``tests/`` on
``sys.path``. The session-scoped daemons are shared by every test: deliver into
them freely, but compare message counts relative to a value read first, restore
any LDAP entry you change, and never stop them; use ``dovecot_factory`` /
``slapd_factory`` for a private instance you may stop, break or restart, and
``replicated_slapd`` for a private syncrepl provider/consumer pair.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from rig.certs import CertPair, TestCA  # noqa: E402
from rig.dovecot import Dovecot, MailUser  # noqa: E402
from rig.slapd import ReplicatedSlapd, Slapd  # noqa: E402

#: Which session store holds which user's mailbox (and which the directory names).
STORE1_USERS = ("alice", "carol", "erin")
STORE2_USERS = ("bob", "dave", "frank")


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway CA; its PEM is ``test_ca.ca_path``."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def server_cert(test_ca: TestCA) -> CertPair:
    """Certificate for ``localhost`` / ``127.0.0.1`` from ``test_ca``, used by every daemon."""
    return test_ca.issue("localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def mail_users() -> list[MailUser]:
    """Six users with distinct uids; bob's and carol's passwords are deliberately awkward."""
    return [
        MailUser("alice", "alice-secret", 2001),
        MailUser("bob", 'bob pass "quoted" \\ back', 2002),
        MailUser("carol", "pässwörd-çarol", 2003),
        MailUser("dave", "dave-secret", 2004),
        MailUser("erin", "erin-secret", 2005),
        MailUser("frank", "frank-secret", 2006),
    ]


def _started_dovecot(
    workdir: Path, users: list[MailUser], name: str, cert: CertPair | None
) -> Iterator[Dovecot]:
    dovecot = Dovecot(workdir, users, name=name, cert=cert)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.close()


@pytest.fixture(scope="session")
def store1(
    tmp_path_factory: pytest.TempPathFactory, mail_users: list[MailUser], server_cert: CertPair
) -> Iterator[Dovecot]:
    """Shared Dovecot "store1" with all users, STARTTLS and implicit TLS. Do not stop it."""
    workdir = tmp_path_factory.mktemp("store1")
    yield from _started_dovecot(workdir, mail_users, "store1", server_cert)


@pytest.fixture(scope="session")
def store2(
    tmp_path_factory: pytest.TempPathFactory, mail_users: list[MailUser], server_cert: CertPair
) -> Iterator[Dovecot]:
    """Shared Dovecot "store2", like store1. Do not stop it."""
    workdir = tmp_path_factory.mktemp("store2")
    yield from _started_dovecot(workdir, mail_users, "store2", server_cert)


@pytest.fixture(scope="session")
def user_stores(store1: Dovecot, store2: Dovecot) -> dict[str, Dovecot]:
    """User name -> the store the directory routes that user to."""
    return {
        **{name: store1 for name in STORE1_USERS},
        **{name: store2 for name in STORE2_USERS},
    }


@pytest.fixture(scope="session")
def slapd(
    tmp_path_factory: pytest.TempPathFactory,
    server_cert: CertPair,
    user_stores: dict[str, Dovecot],
) -> Iterator[Slapd]:
    """Shared slapd with one entry per user: mail ``<uid>@example.org``, mailHost
    127.0.0.1, mailImapPort/mailPop3Port/mailSievePort of the user's store's plain ports."""
    server = Slapd(tmp_path_factory.mktemp("slapd"), cert=server_cert)
    try:
        server.start()
        for uid, store in user_stores.items():
            server.add_user(
                uid,
                mail=f"{uid}@example.org",
                mail_host=store.host,
                imap_port=store.imap_port,
                pop3_port=store.pop3_port,
                sieve_port=store.sieve_port,
            )
        yield server
    finally:
        server.stop()


@pytest.fixture
def dovecot_factory(
    tmp_path: Path, mail_users: list[MailUser], server_cert: CertPair
) -> Iterator[Callable[..., Dovecot]]:
    """Make private, started Dovecots (closed after the test).

    ``dovecot_factory(users=None, name="scratch", tls=True, max_sessions=200)``;
    users default to ``mail_users``.
    """
    made: list[Dovecot] = []

    def factory(
        users: list[MailUser] | None = None,
        name: str = "scratch",
        tls: bool = True,
        max_sessions: int = 200,
    ) -> Dovecot:
        dovecot = Dovecot(
            tmp_path / f"dovecot-{name}-{len(made)}",
            mail_users if users is None else users,
            name=name,
            cert=server_cert if tls else None,
            max_sessions=max_sessions,
        )
        made.append(dovecot)
        dovecot.start()
        return dovecot

    yield factory
    for dovecot in made:
        dovecot.close()


@pytest.fixture
def slapd_factory(tmp_path: Path, server_cert: CertPair) -> Iterator[Callable[..., Slapd]]:
    """Make private, started, empty slapds (stopped after the test):
    ``slapd_factory(tls=True, ipv6=False)``."""
    made: list[Slapd] = []

    def factory(tls: bool = True, ipv6: bool = False) -> Slapd:
        server = Slapd(tmp_path / f"slapd-{len(made)}", cert=server_cert if tls else None,
                       ipv6=ipv6)
        made.append(server)
        server.start()
        return server

    yield factory
    for server in made:
        server.stop()


@pytest.fixture
def replicated_slapd(tmp_path: Path) -> Iterator[ReplicatedSlapd]:
    """A private, started, empty syncrepl pair (provider and read-only consumer, no
    TLS), stopped after the test; stop, kill or pause either freely."""
    pair = ReplicatedSlapd(tmp_path / "slapd-pair")
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()

"""TLS towards the backend: STARTTLS and implicit, certificates verified."""

from __future__ import annotations

import imaplib

import pytest
from rig.certs import TestCA
from rig.ports import free_port
from rig.proxy import imap_config

HOST = "127.0.0.1"


def _alice(mail_users):
    return next(u for u in mail_users if u.name == "alice")


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_backend_tls_verified(mode, start_proxy, store1, mail_users, test_ca):
    port = free_port()
    backend_port = store1.imap_port if mode == "starttls" else store1.imaps_port
    extra = f'[backend]\ntls = "{mode}"\nca_file = "{test_ca.ca_path}"\n'
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": f"*  localhost:{backend_port}\n"})
    alice = _alice(mail_users)
    client = imaplib.IMAP4(HOST, proxy.port)
    assert client.login(alice.name, alice.password)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_backend_certificate_from_unknown_ca_is_refused(mode, start_proxy, store1, mail_users,
                                                        tmp_path):
    other_ca = TestCA(tmp_path / "other-ca")
    port = free_port()
    backend_port = store1.imap_port if mode == "starttls" else store1.imaps_port
    extra = f'[backend]\ntls = "{mode}"\nca_file = "{other_ca.ca_path}"\n'
    proxy = start_proxy(imap_config(port, extra=extra), [port],
                        {"users.map": f"*  localhost:{backend_port}\n"})
    alice = _alice(mail_users)
    client = imaplib.IMAP4(HOST, proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(alice.name, alice.password)
    client.logout()
    assert alice.password not in proxy.log()

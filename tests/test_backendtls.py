"""Backend TLS: certificate verification and the optional client certificate (tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from OpenSSL import SSL
from rig.certs import TestCA
from tlspump import pump

from imapproxy.backendtls import (
    backend_client_certificate,
    backend_client_options,
    backend_trust_root,
    cleartext_warning,
)
from imapproxy.config import BackendConfig, ConfigError
from imapproxy.directory import StaticDirectory, parse_map


class FakeTLSProtocol:
    """What Twisted's verifying info callback reports a failed verification to."""

    def __init__(self) -> None:
        self.failures: list[object] = []
        self.factory = SimpleNamespace(wrappedFactory=object())  # no ALPN

    def failVerification(self, reason: object) -> None:  # noqa: N802
        self.failures.append(reason)


def backend_handshake(test_ca: TestCA, creator: object) -> tuple[ssl.SSLObject, FakeTLSProtocol]:
    """A Python TLS server demanding a client certificate from our test CA."""
    server_pair = test_ca.issue("localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pair.chain_path, server_pair.key_path)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(test_ca.ca_path)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    protocol = FakeTLSProtocol()
    client = creator.clientConnectionForTLS(protocol)  # type: ignore[attr-defined]
    client.set_connect_state()
    pump(client, server, incoming, outgoing)
    return server, protocol


def test_client_certificate_is_shown_to_a_backend_that_asks(test_ca: TestCA) -> None:
    pair = test_ca.issue("imapproxy.example.org")
    certificate = backend_client_certificate(
        BackendConfig(client_certificate=pair.chain_path, client_key=pair.key_path), "/x")
    trust = backend_trust_root(BackendConfig(ca_file=test_ca.ca_path))
    server, protocol = backend_handshake(
        test_ca, backend_client_options("localhost", trust, client_certificate=certificate))
    peer = server.getpeercert()
    assert peer is not None
    assert ("DNS", "imapproxy.example.org") in peer["subjectAltName"]
    assert protocol.failures == []  # the backend's certificate and name were verified


def test_without_a_client_certificate_such_a_backend_refuses(test_ca: TestCA) -> None:
    trust = backend_trust_root(BackendConfig(ca_file=test_ca.ca_path))
    with pytest.raises(ssl.SSLError):
        backend_handshake(test_ca, backend_client_options("localhost", trust))


def test_insecure_mode_still_presents_the_client_certificate(test_ca: TestCA) -> None:
    pair = test_ca.issue("imapproxy.example.org")
    certificate = backend_client_certificate(
        BackendConfig(client_certificate=pair.chain_path, client_key=pair.key_path), "/x")
    server, _protocol = backend_handshake(
        test_ca, backend_client_options("wrong-name", None, insecure=True,
                                        client_certificate=certificate))
    assert server.getpeercert() is not None


def test_wrong_backend_name_fails_verification(test_ca: TestCA) -> None:
    trust = backend_trust_root(BackendConfig(ca_file=test_ca.ca_path))
    pair = test_ca.issue("imapproxy.example.org")
    certificate = backend_client_certificate(
        BackendConfig(client_certificate=pair.chain_path, client_key=pair.key_path), "/x")
    creator = backend_client_options("mail.example.org", trust, client_certificate=certificate)
    # Refused inside OpenSSL (host name check) or by service_identity afterwards.
    try:
        _server, protocol = backend_handshake(test_ca, creator)
    except SSL.Error as e:
        assert "certificate verify failed" in str(e)
    else:
        assert len(protocol.failures) == 1


def test_client_certificate_config_errors(test_ca: TestCA, tmp_path: Path) -> None:
    assert backend_client_certificate(BackendConfig(), "/x") is None
    one, other = test_ca.issue("one.example"), test_ca.issue("other.example")
    with pytest.raises(ConfigError, match="backend.client_key"):
        backend_client_certificate(
            BackendConfig(client_certificate=one.chain_path, client_key=other.key_path), "/x")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ConfigError, match="backend.client_certificate"):
        backend_client_certificate(
            BackendConfig(client_certificate=empty, client_key=one.key_path), "/x")


# -- [backend] tls = "none": passwords in clear --------------------------------------------

def static(text: str) -> StaticDirectory:
    return StaticDirectory(parse_map(text))


def test_no_warning_for_backend_tls_or_loopback_backends() -> None:
    anywhere = static("* mail.example.org\n")
    assert cleartext_warning(BackendConfig(tls="starttls"), anywhere) is None
    assert cleartext_warning(BackendConfig(tls="implicit"), anywhere) is None
    local = static("a* 127.0.0.1:1143\nb* [::1]:143,localhost\nc* 127.9.9.9,imap.localhost\n"
                   "* ::ffff:127.0.0.1\n")
    assert cleartext_warning(BackendConfig(tls="none"), local) is None


def test_warning_names_the_backends_that_get_passwords_in_clear() -> None:
    directory = static("a* 127.0.0.1\nb* 192.0.2.10:143,127.0.0.1\n* mail.example.org\n")
    warning = cleartext_warning(BackendConfig(tls="none"), directory)
    assert warning is not None
    assert "in clear" in warning and 'tls = "none"' in warning
    assert "192.0.2.10" in warning and "mail.example.org" in warning
    assert "127.0.0.1" not in warning
    many = static("* " + ",".join(f"10.0.0.{i}" for i in range(1, 8)) + "\n")
    warning = cleartext_warning(BackendConfig(tls="none"), many)
    assert warning is not None and "10.0.0.1, 10.0.0.2, 10.0.0.3 and 4 more" in warning


def test_warning_for_a_directory_that_names_backends_at_run_time() -> None:
    """LDAP: the backends are only known per user, so the warning is given at start."""
    warning = cleartext_warning(BackendConfig(tls="none"), object())
    assert warning is not None
    assert "directory" in warning and "in clear" in warning

# -*- test-case-name: tests.test_backendtls -*-
"""TLS towards the backends: the CAs their certificates are checked against
(service_identity, through Twisted), the client certificate shown to them, and the
warning when passwords go to them in clear."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from .certificates import read_pem_certificates
from .config import BackendConfig, ConfigError
from .directory import StaticDirectory
from .proxyprotocol import parse_ip


def cleartext_warning(config: BackendConfig, directory: object) -> str | None:
    """The start-up warning for ``[backend] tls = "none"``, or None when none is due.

    Client passwords then go to the backends in clear: fine on this host (or over a
    private link the operator vouches for). A static map names every backend, so only
    the ones off this host are named in the warning, and a map of loopback addresses
    gets none. A directory like LDAP names backends per user at run time, so the warning
    is given at start all the same: a warning at the first login to a remote backend
    would come later, from a busy log, and not at all on a quiet test install.
    """
    if config.tls != "none":
        return None
    if isinstance(directory, StaticDirectory):
        remote = sorted({server.host for _pattern, servers in directory.rules
                         for server in servers if not _is_loopback(server.host)})
        if not remote:
            return None
        shown = ", ".join(remote[:3]) + (f" and {len(remote) - 3} more" if len(remote) > 3
                                         else "")
        where = f"to {shown}"
    else:
        where = "to the backends the directory names (harmless only for backends on this host)"
    return (f'CLEARTEXT: [backend] tls = "none": client passwords go in clear {where}. '
            'Use tls = "starttls" or "implicit" unless the link is private.')


def _is_loopback(host: str) -> bool:
    # RFC 6761 section 6.3: "localhost" and names below it are the loopback.
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = parse_ip(host)
    return address is not None and address.is_loopback


def backend_trust_root(config: BackendConfig, config_path: Path | str = "") -> object:
    """The CAs that backend certificates are checked against: ca_file or the system's.
    A ca_file that cannot be read, or holds no certificate (it would trust nothing, and
    every backend would fail verification), is a config error."""
    if config.ca_file is None:
        return ssl.platformTrust()
    try:
        certificates = [ssl.Certificate(c) for c in read_pem_certificates(config.ca_file)]
    except (OSError, crypto.Error, ValueError) as e:
        raise ConfigError(config_path, "backend.ca_file",
                          f"cannot load CA certificates from {config.ca_file}: {e}") from None
    if not certificates:
        raise ConfigError(config_path, "backend.ca_file",
                          f"no PEM certificate in {config.ca_file}")
    return ssl.trustRootFromCertificates(certificates)


def backend_client_certificate(config: BackendConfig,
                               config_path: Path | str) -> ssl.PrivateCertificate | None:
    """[backend] client_certificate and client_key, loaded and checked at start-up."""
    if config.client_certificate is None or config.client_key is None:
        return None
    try:
        chain = read_pem_certificates(config.client_certificate)
        if not chain:
            raise ConfigError(config_path, "backend.client_certificate",
                              "no PEM certificate in file")
        key = ssl.KeyPair.load(config.client_key.read_bytes(), crypto.FILETYPE_PEM)
        # Raises VerifyError when the key does not belong to the certificate.
        certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(chain[0]), key)
    except (OSError, crypto.Error, ValueError, VerifyError) as e:
        raise ConfigError(config_path, "backend.client_key",
                          f"cannot load client certificate/key: {e}") from None
    return certificate


def backend_client_options(hostname: str, trust_root: object, insecure: bool = False,
                           client_certificate: ssl.PrivateCertificate | None = None,
                           ) -> IOpenSSLClientConnectionCreator:
    """Client TLS towards a backend, verifying its certificate and host name."""
    if insecure:
        return _InsecureCreator(hostname, client_certificate)  # type: ignore[return-value]
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root,  # type: ignore[arg-type]
                                   clientCertificate=client_certificate)


@implementer(IOpenSSLClientConnectionCreator)
class _InsecureCreator:
    """No verification at all: only behind [backend] insecure_skip_verify = true."""

    def __init__(self, hostname: str,
                 client_certificate: ssl.PrivateCertificate | None = None) -> None:
        if client_certificate is not None:
            self._options = ssl.CertificateOptions(
                privateKey=client_certificate.privateKey.original,
                certificate=client_certificate.original, verify=False)
        else:
            self._options = ssl.CertificateOptions(verify=False)
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        context = self._options.getContext()
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        return connection

"""A throwaway certificate authority for tests, built with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Certificates are valid from a day ago (clock skew) until this many days from now.
VALIDITY_DAYS = 30


@dataclass(frozen=True)
class CertPair:
    """PEM files of one issued leaf certificate."""

    cert_path: Path
    key_path: Path
    #: leaf followed by its issuing CA, for servers that want a full chain file
    chain_path: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)


class _Authority:
    """One self-signed CA that signs leaf certificates into ``directory``."""

    def __init__(self, directory: Path, common_name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imapproxy tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, stem: str, hostname: str, ip: str | None) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        names: list[x509.GeneralName] = [x509.DNSName(hostname)]
        if ip is not None:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        leaf_pem = cert.public_bytes(serialization.Encoding.PEM)
        pair = CertPair(
            cert_path=self.directory / f"{stem}.crt",
            key_path=self.directory / f"{stem}.key",
            chain_path=self.directory / f"{stem}.chain.pem",
        )
        _write(pair.cert_path, leaf_pem)
        _write(
            pair.key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        _write(pair.chain_path, leaf_pem + self.pem)
        return pair


class TestCA:
    """A CA whose PEM certificate is at ``ca_path``; issues server certificates.

    Daemons in the rig run as root, so 0600 key files are readable by them.
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._trusted = _Authority(self.directory, "imapproxy test CA")
        self.ca_path = self.directory / "ca.pem"
        _write(self.ca_path, self._trusted.pem)
        self._untrusted: _Authority | None = None
        self._serial = itertools.count(1)

    def _stem(self, prefix: str, hostname: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9.-]", "_", hostname)
        return f"{prefix}{next(self._serial)}-{safe}"

    def issue(self, hostname: str, ip: str | None = "127.0.0.1") -> CertPair:
        """Issue a server certificate with SAN ``DNS:hostname`` (and ``IP:ip``)."""
        return self._trusted.issue(self._stem("leaf", hostname), hostname, ip)

    def issue_untrusted(self, hostname: str, ip: str | None = "127.0.0.1") -> CertPair:
        """Issue a certificate from a second, unrelated CA that nobody trusts."""
        if self._untrusted is None:
            self._untrusted = _Authority(self.directory, "imapproxy UNTRUSTED test CA")
            _write(self.directory / "untrusted-ca.pem", self._untrusted.pem)
        return self._untrusted.issue(self._stem("untrusted", hostname), hostname, ip)

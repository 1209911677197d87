# -*- test-case-name: tests.test_certificates -*-
"""PEM certificate files: the certificates in them, and when they expire.

Shared by the client-facing TLS (clienttls.py) and the backend TLS (backendtls.py).
No Twisted here.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from OpenSSL import crypto


def read_pem_certificates(path: Path) -> list[crypto.X509]:
    data = path.read_bytes()
    certificates = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in data.split(marker)[1:]:
        certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + chunk))
    return certificates


def not_after(path: Path | None) -> float:
    """When the (first) certificate in a PEM file stops being valid (Unix time)."""
    if path is None:
        return 0.0
    certificates = read_pem_certificates(path)
    stamp = certificates[0].get_notAfter() if certificates else None
    if not stamp:
        return 0.0
    when = datetime.datetime.strptime(stamp.decode("ascii"), "%Y%m%d%H%M%SZ")
    return when.replace(tzinfo=datetime.UTC).timestamp()

"""In-memory TLS handshakes between pyOpenSSL (the proxy's side) and Python's ssl module."""

from __future__ import annotations

import ssl
from typing import Any

from cryptography import x509
from OpenSSL import SSL


def pump(openssl: SSL.Connection, python: ssl.SSLObject, incoming: ssl.MemoryBIO,
         outgoing: ssl.MemoryBIO, python_sees_alerts: bool = False) -> None:
    """Run both handshakes to the end (or raise the side's error).

    With ``python_sees_alerts``, a handshake that pyOpenSSL refuses raises the error the
    Python side gets from pyOpenSSL's alert (what a client would report) instead.
    """
    for _ in range(50):
        python_done = openssl_done = False
        try:
            python.do_handshake()
            python_done = True
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            openssl.bio_write(data)
        try:
            openssl.do_handshake()
            openssl_done = True
        except SSL.WantReadError:
            pass
        except SSL.Error:
            if not python_sees_alerts:
                raise
            _drain(openssl, incoming)
            python.do_handshake()  # raises ssl.SSLError naming the alert
            raise
        _drain(openssl, incoming)
        if python_done and openssl_done:
            return
    raise AssertionError("handshake did not finish")


def _drain(openssl: SSL.Connection, incoming: ssl.MemoryBIO) -> None:
    while True:
        try:
            chunk = openssl.bio_read(65536)
        except SSL.WantReadError:
            break
        incoming.write(chunk)


def client_handshake(server: SSL.Connection, sni: str | None,
                     maximum: ssl.TLSVersion | None = None,
                     alpn: list[str] | None = None,
                     ) -> tuple[x509.Certificate, ssl.SSLObject]:
    """Handshake a Python client against ``server``; the certificate it was shown.

    ``alpn``: the protocols the client offers (RFC 7301); none offered by default.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    server.set_accept_state()
    pump(server, client, incoming, outgoing, python_sees_alerts=True)
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der), client


def dns_names(certificate: x509.Certificate) -> list[str]:
    san: Any = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(san.value.get_values_for_type(x509.DNSName))

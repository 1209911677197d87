"""PEM files: every certificate in a chain file, and when the first one expires."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from rig.certs import TestCA

from imapproxy.certificates import not_after, read_pem_certificates


def test_a_chain_file_holds_the_leaf_then_its_ca(test_ca: TestCA) -> None:
    pair = test_ca.issue("mail.example.org")
    chain = read_pem_certificates(pair.chain_path)
    assert len(chain) == 2
    assert chain[0].get_subject().CN == "mail.example.org"


def test_not_after_is_the_leafs(test_ca: TestCA) -> None:
    pair = test_ca.issue("mail.example.org")
    leaf = x509.load_pem_x509_certificate(pair.cert_path.read_bytes())
    expected = leaf.not_valid_after.replace(tzinfo=datetime.UTC).timestamp()
    assert not_after(pair.chain_path) == expected


def test_no_file_or_no_certificate(tmp_path: Path) -> None:
    assert not_after(None) == 0.0
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert not_after(empty) == 0.0

"""Client-facing TLS: SNI picks the certificate, reload() swaps them, policy is applied."""

from __future__ import annotations

import shutil
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from OpenSSL import SSL
from rig.certs import CertPair, TestCA
from tlspump import client_handshake, dns_names, pump

from imapproxy.clienttls import ServerTLS
from imapproxy.config import ConfigError, SniCertificate, TlsConfig, load


def copy_pair(pair: CertPair, directory: Path, stem: str) -> tuple[Path, Path]:
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    shutil.copy(pair.chain_path, cert)
    shutil.copy(pair.key_path, key)
    return cert, key


@pytest.fixture
def certs(test_ca: TestCA, tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: copy_pair(test_ca.issue(name), tmp_path, name.replace("*", "star"))
            for name in ("default.example.com", "mail.example.org", "any.example.net")}


def sni_config(certs: dict[str, tuple[Path, Path]], **kwargs: object) -> TlsConfig:
    default = certs["default.example.com"]
    return TlsConfig(certificate=default[0], key=default[1], sni=(
        SniCertificate("mail.example.org", *certs["mail.example.org"]),
        SniCertificate("*.example.net", *certs["any.example.net"]),
    ), **kwargs)  # type: ignore[arg-type]


def served(tls: ServerTLS, sni: str | None) -> list[str]:
    certificate, _client = client_handshake(tls.serverConnectionForTLS(None), sni)
    return dns_names(certificate)


def test_sni_picks_the_certificate_and_unknown_names_get_the_default(
        certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml")
    assert served(tls, "mail.example.org") == ["mail.example.org"]
    assert served(tls, "MAIL.Example.ORG") == ["mail.example.org"]
    assert served(tls, "imap.example.net") == ["any.example.net"]
    assert served(tls, "a.b.example.net") == ["default.example.com"]  # one label only
    assert served(tls, "example.net") == ["default.example.com"]
    assert served(tls, "unknown.example") == ["default.example.com"]
    assert served(tls, None) == ["default.example.com"]


def test_reload_serves_renewed_files_to_new_connections(
        certs: dict[str, tuple[Path, Path]], test_ca: TestCA) -> None:
    config = sni_config(certs)
    tls = ServerTLS(config, "/x.toml")
    established = tls.serverConnectionForTLS(None)
    renewed = test_ca.issue("renewed.example.com")
    shutil.copy(renewed.chain_path, config.certificate)  # type: ignore[arg-type]
    shutil.copy(renewed.key_path, config.key)  # type: ignore[arg-type]
    assert served(tls, None) == ["default.example.com"]  # nothing re-read yet
    tls.reload()
    assert served(tls, None) == ["renewed.example.com"]
    assert served(tls, "mail.example.org") == ["mail.example.org"]
    # A connection created before the reload finishes with the old certificate.
    certificate, _client = client_handshake(established, None)
    assert dns_names(certificate) == ["default.example.com"]


def test_reload_with_a_new_config_and_a_broken_one_keeps_the_old(
        certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml")
    mail = certs["mail.example.org"]
    tls.reload(TlsConfig(certificate=mail[0], key=mail[1]))
    assert served(tls, "imap.example.net") == ["mail.example.org"]
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tls.sni\\[0\\].certificate"):
        tls.reload(TlsConfig(certificate=mail[0], key=mail[1],
                             sni=(SniCertificate("x.example", broken, mail[1]),)))
    with pytest.raises(ConfigError, match="tls.certificate"):
        tls.reload(TlsConfig())
    assert served(tls, "x.example") == ["mail.example.org"]  # still the last good set
    assert tls.config.certificate == mail[0]


def test_mismatched_sni_key_is_refused_with_its_table_named(
        certs: dict[str, tuple[Path, Path]]) -> None:
    config = sni_config(certs)
    wrong = replace(config.sni[0], key=certs["any.example.net"][1])
    with pytest.raises(ConfigError, match=r"tls.sni\[0\].key"):
        ServerTLS(replace(config, sni=(wrong,)), "/x.toml")


def test_tls_1_2_minimum_by_default_and_1_3_when_configured(
        certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml")
    _cert, client = client_handshake(tls.serverConnectionForTLS(None), None,
                                     maximum=ssl.TLSVersion.TLSv1_2)
    assert client.version() == "TLSv1.2"
    strict = ServerTLS(sni_config(certs, min_version="1.3"), "/x.toml")
    with pytest.raises(Exception, match="(?i)version|protocol|alert"):
        client_handshake(strict.serverConnectionForTLS(None), None,
                         maximum=ssl.TLSVersion.TLSv1_2)
    # The SNI contexts carry the same policy.
    with pytest.raises(Exception, match="(?i)version|protocol|alert"):
        client_handshake(strict.serverConnectionForTLS(None), "mail.example.org",
                         maximum=ssl.TLSVersion.TLSv1_1)


def test_old_protocols_are_refused_by_default(certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml")
    with pytest.raises(Exception):  # noqa: B017 - refused by us or by the client's OpenSSL
        client_handshake(tls.serverConnectionForTLS(None), None,
                         maximum=ssl.TLSVersion.TLSv1_1)


def test_cipher_string_is_applied_and_validated(certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs, ciphers="ECDHE+CHACHA20"), "/x.toml")
    _cert, client = client_handshake(tls.serverConnectionForTLS(None), "mail.example.org",
                                     maximum=ssl.TLSVersion.TLSv1_2)
    cipher = client.cipher()
    assert cipher is not None and "CHACHA20" in cipher[0]
    with pytest.raises(ConfigError, match="tls.ciphers"):
        ServerTLS(sni_config(certs, ciphers="NO-SUCH-CIPHER"), "/x.toml")


def test_get_context_is_the_default_context(certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml")
    assert tls.getContext() is tls.serverConnectionForTLS(None).get_context()


def test_sni_tables_in_the_config_file(certs: dict[str, tuple[Path, Path]],
                                       tmp_path: Path) -> None:
    (tmp_path / "users.map").write_text("* 127.0.0.1:143\n")
    default, mail = certs["default.example.com"], certs["mail.example.org"]
    config_path = tmp_path / "c.toml"
    config_path.write_text(f"""
[[listen]]
address = "127.0.0.1:993"
tls = "implicit"

[tls]
certificate = "{default[0]}"
key = "{default[1]}"
ciphers = "ECDHE+AESGCM"

[[tls.sni]]
domain = "Mail.Example.org."
certificate = "{mail[0]}"
key = "{mail[1]}"

[[tls.sni]]
domain = "*.example.net"
certificate = "{mail[0]}"
key = "{mail[1]}"

[directory]
map = "users.map"
""")
    config = load(config_path)
    assert [s.domain for s in config.tls.sni] == ["mail.example.org", "*.example.net"]
    assert config.tls.ciphers == "ECDHE+AESGCM"
    assert served(ServerTLS(config.tls, config_path), "mail.example.org") == [
        "mail.example.org"]


# -- ALPN (RFC 7301) and cross-protocol attacks (ALPACA) ----------------------------------

def alpn_handshake(creator: object, sni: str | None, offered: list[str] | None,
                   ) -> tuple[list[str], str | None]:
    """The certificate's names and the protocol selected for a client offering ``offered``."""
    server = creator.serverConnectionForTLS(None)  # type: ignore[attr-defined]
    certificate, client = client_handshake(server, sni, alpn=offered)
    return dns_names(certificate), client.selected_alpn_protocol()


@pytest.mark.parametrize("protocol", ["imap", "pop3", "managesieve"])
def test_alpn_selects_the_listener_protocol(certs: dict[str, tuple[Path, Path]],
                                            protocol: str) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml").for_protocol(protocol)
    assert alpn_handshake(tls, None, [protocol]) == (["default.example.com"], protocol)
    # Among others, and with either TLS version.
    assert alpn_handshake(tls, None, ["h2", protocol, "http/1.1"])[1] == protocol
    _cert, client = client_handshake(tls.serverConnectionForTLS(None), None,
                                     maximum=ssl.TLSVersion.TLSv1_2, alpn=[protocol])
    assert (client.version(), client.selected_alpn_protocol()) == ("TLSv1.2", protocol)


@pytest.mark.parametrize(("protocol", "offered"), [
    ("imap", ["http/1.1"]), ("imap", ["h2", "http/1.1"]), ("imap", ["pop3"]),
    ("pop3", ["imap"]), ("pop3", ["smtp"]), ("managesieve", ["imap"]),
])
def test_alpn_without_the_listener_protocol_is_refused(
        certs: dict[str, tuple[Path, Path]], protocol: str, offered: list[str]) -> None:
    """RFC 7301 section 3.2: no overlap is a fatal no_application_protocol alert, so an
    HTTPS page cannot talk to the mail server through a browser (ALPACA)."""
    tls = ServerTLS(sni_config(certs), "/x.toml").for_protocol(protocol)
    for sni in (None, "mail.example.org", "imap.example.net"):
        with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
            alpn_handshake(tls, sni, offered)


def test_no_alpn_is_served_as_before(certs: dict[str, tuple[Path, Path]]) -> None:
    for protocol in ("imap", "pop3"):
        tls = ServerTLS(sni_config(certs), "/x.toml").for_protocol(protocol)
        assert alpn_handshake(tls, None, None) == (["default.example.com"], None)


def test_alpn_policy_holds_on_the_sni_certificates_and_after_reload(
        certs: dict[str, tuple[Path, Path]]) -> None:
    server_tls = ServerTLS(sni_config(certs), "/x.toml")
    imap, pop3 = server_tls.for_protocol("imap"), server_tls.for_protocol("pop3")
    assert alpn_handshake(imap, "mail.example.org", ["imap"]) == (["mail.example.org"], "imap")
    assert alpn_handshake(pop3, "x.example.net", ["pop3"]) == (["any.example.net"], "pop3")
    mail = certs["mail.example.org"]
    server_tls.reload(TlsConfig(certificate=mail[0], key=mail[1]))
    # The creators handed to the listeners follow the reload.
    assert alpn_handshake(imap, None, ["imap"]) == (["mail.example.org"], "imap")
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        alpn_handshake(pop3, None, ["imap"])


def test_an_unknown_listener_protocol_is_a_programming_error(
        certs: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ValueError, match="smtp"):
        ServerTLS(sni_config(certs), "/x.toml").for_protocol("smtp")


def test_a_refused_handshake_does_not_spoil_the_next(
        certs: dict[str, tuple[Path, Path]]) -> None:
    tls = ServerTLS(sni_config(certs), "/x.toml").for_protocol("imap")
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        alpn_handshake(tls, None, ["http/1.1"])
    assert alpn_handshake(tls, None, ["imap"]) == (["default.example.com"], "imap")
    assert alpn_handshake(tls, None, None) == (["default.example.com"], None)


def test_the_refusal_reads_as_openssl_errors_do_and_leaves_none_behind(
        certs: dict[str, tuple[Path, Path]]) -> None:
    """Twisted's TLS layer reads an SSL.Error's args as (library, function, reason). And
    OpenSSL's error queue is per thread: a failure left in it would fail the next TLS call
    of another connection (SSL_get_error reads the queue first)."""
    tls = ServerTLS(sni_config(certs), "/x.toml").for_protocol("pop3")
    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["imap"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(SSL.Error) as refused:
        pump(server, context.wrap_bio(incoming, outgoing), incoming, outgoing)
    _library, _function, reason = refused.value.args[0][-1]
    assert reason.startswith("no application protocol") and "'imap'" in reason
    # Nothing was left in OpenSSL's error queue (Python's ssl clears it before each call,
    # so only pyOpenSSL calls can tell): a new connection just waits for its ClientHello.
    fresh = tls.serverConnectionForTLS(None)
    fresh.set_accept_state()
    with pytest.raises(SSL.WantReadError):
        fresh.do_handshake()


def test_expiry_of_each_certificate_for_the_metrics(certs: dict[str, tuple[Path, Path]],
                                                    tmp_path: Path) -> None:
    import datetime

    from cryptography import x509

    tls = ServerTLS(sni_config(certs), tmp_path / "imapproxy.toml")
    default = x509.load_pem_x509_certificate(certs["default.example.com"][0].read_bytes())
    expected = default.not_valid_after.replace(tzinfo=datetime.UTC).timestamp()
    assert tls.expiry["default"] == expected
    assert set(tls.expiry) == {"default", "mail.example.org", "*.example.net"}

"""forwarding: what the backend is told about the client, per [backend] forward_client;
and, through the adapters, the ID and PROXY header a backend really receives."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from helpers import DOVECOT_GREETING, Harness
from twisted.internet.address import IPv4Address, UNIXAddress

from imapproxy.config import BackendConfig
from imapproxy.credentials import Credentials, Secret
from imapproxy.errors import RoutingLoop
from imapproxy.forwarding import (
    MAX_ID_PAIRS,
    for_login,
    ip_endpoint,
    next_ttl,
    origin_params,
    strip_trusted_keys,
)
from imapproxy.imapbackend import ImapBackendLogin
from imapproxy.proxyprotocol import HeaderReader


def test_origin_params() -> None:
    assert origin_params(("192.0.2.7", 40000), ("10.0.0.1", 143), "9-3") == (
        ("x-originating-ip", "192.0.2.7"), ("x-originating-port", "40000"),
        ("x-connected-ip", "10.0.0.1"), ("x-connected-port", "143"),
        ("x-session-id", "9-3"))
    assert origin_params(("::ffff:192.0.2.7", 1), None, "s")[0] == ("x-originating-ip",
                                                                    "192.0.2.7")
    assert origin_params(("[2001:db8::7]", 1), None, "s")[0] == ("x-originating-ip",
                                                                 "2001:db8::7")


def test_a_client_cannot_claim_an_address() -> None:
    claimed = (("name", "Thunderbird"), ("X-Originating-IP", "1.2.3.4"),
               ("x-session-id", "mine"), ("x-forward-foo", "bar"), ("x-proxy-ttl", "3"),
               ("version", None))
    assert strip_trusted_keys(claimed) == (("name", "Thunderbird"), ("version", None))
    for mode in ("id", "proxy-v2", "none"):
        sent = for_login(mode, claimed, ("192.0.2.7", 1), None, "s").client_id
        assert ("X-Originating-IP", "1.2.3.4") not in sent
        assert ("x-forward-foo", "bar") not in sent


def test_modes() -> None:
    client, local = ("192.0.2.7", 40000), ("10.0.0.1", 143)
    by_id = for_login("id", (("name", "mutt"),), client, local, "s")
    assert by_id.proxy_header == b""
    assert by_id.client_id[0] == ("name", "mutt")
    assert ("x-originating-ip", "192.0.2.7") in by_id.client_id
    proxied = for_login("proxy-v2", (("name", "mutt"),), client, local, "s")
    assert proxied.client_id == (("name", "mutt"),)
    header, _ = HeaderReader().feed(proxied.proxy_header)
    assert header.addresses == ((ip_address(client[0]), client[1]),
                                (ip_address(local[0]), local[1]))
    assert for_login("none", (), client, local, "s").client_id == ()
    # No IP address to tell (a UNIX socket client): ID carries nothing of ours.
    assert for_login("id", (), None, None, "s").client_id == ()


def test_id_stays_within_rfc_2971_pair_limit() -> None:
    many = tuple((f"k{i}", "v") for i in range(40))
    sent = for_login("id", many, ("192.0.2.7", 1), ("10.0.0.1", 2), "s").client_id
    assert len(sent) == MAX_ID_PAIRS
    assert sent[-1] == ("x-session-id", "s")


def test_ip_endpoint() -> None:
    assert ip_endpoint(IPv4Address("TCP", "192.0.2.7", 5)) == ("192.0.2.7", 5)
    assert ip_endpoint(UNIXAddress(b"/tmp/s")) is None
    assert ip_endpoint(None) is None


def test_backend_login_sends_the_origin_as_id_before_login() -> None:
    login = ImapBackendLogin(Credentials("alice", Secret(b"pw")), "alice", starttls=False,
                             client_id=for_login("id", (), ("192.0.2.7", 4), None, "7-1").client_id)
    sent = login.receive_data(DOVECOT_GREETING)[0].data
    assert sent.startswith(b'P2 ID ("x-proxy-ttl" "4" "x-originating-ip" "192.0.2.7" '
                           b'"x-originating-port" "4" '
                           b'"x-session-id" "7-1")\r\nP3 LOGIN ')


# -- through the adapters (tests/helpers.py Harness) ---------------------------------------


def test_proxy_sends_client_address_by_id_by_default() -> None:
    h = Harness()
    client, transport = h.connect_client("192.0.2.7")
    client.dataReceived(b'a0 ID ("name" "mutt" "x-originating-ip" "6.6.6.6")\r\n'
                        b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    sent = backend.transport.value()
    assert sent.startswith(b'P2 ID ("name" "mutt" "x-proxy-ttl" "4" '
                           b'"x-originating-ip" "192.0.2.7" '
                           b'"x-originating-port" "40000" "x-connected-ip" ')
    assert b"6.6.6.6" not in sent
    assert b'"x-session-id" "' in sent


def test_proxy_v2_header_is_the_first_thing_the_backend_gets() -> None:
    h = Harness(backend=BackendConfig(forward_client="proxy-v2"))
    client, transport = h.connect_client("192.0.2.7")
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    raw = backend.transport.value()
    header, remaining = HeaderReader().feed(raw)
    assert header.addresses is not None and remaining == b""  # the LOGIN waits for the greeting
    assert header.addresses[0] == (ip_address("192.0.2.7"), 40000)
    backend.transport.clear()
    backend.dataReceived(DOVECOT_GREETING)
    assert backend.transport.value().startswith(b"P3 LOGIN ")  # no ID: nothing to say
    backend.dataReceived(b"P3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert transport.value().endswith(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")


def test_forward_none_sends_no_id() -> None:
    h = Harness(backend=BackendConfig(forward_client="none"))
    client, _ = h.connect_client()
    client.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = h.backends[-1]
    backend.dataReceived(DOVECOT_GREETING)
    assert backend.transport.value().startswith(b"P3 LOGIN ")


def test_proxy_ttl_counts_down_and_a_loop_is_refused() -> None:
    client = ("192.0.2.7", 1)
    fresh = for_login("id", (), client, None, "s").client_id
    assert ("x-proxy-ttl", "4") in fresh  # PROXY_TTL - 1, as Dovecot's proxies do
    # Another proxy (ours or Dovecot's) in front: one less, and its value is not kept.
    hop = for_login("id", (("x-proxy-ttl", "3"),), client, None, "s").client_id
    assert ("x-proxy-ttl", "2") in hop and ("x-proxy-ttl", "3") not in hop
    # A client cannot buy itself more hops than we start with.
    assert ("x-proxy-ttl", "4") in for_login("id", (("x-proxy-ttl", "99"),), client, None,
                                             "s").client_id
    with pytest.raises(RoutingLoop):
        for_login("id", (("x-proxy-ttl", "1"),), client, None, "s")
    assert next_ttl((("X-Proxy-TTL", "junk"),)) == 4

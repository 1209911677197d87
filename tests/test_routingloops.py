"""Loop protection: our own listening addresses are never a backend."""

from __future__ import annotations

from imapproxy.config import Listener
from imapproxy.routingloops import is_own_listener, names_own_listener

EXPLICIT = (Listener("imap", "127.0.0.1", 143, "starttls"),
            Listener("imap", "2001:db8::10", 993, "implicit"))
WILDCARD = (Listener("imap", "0.0.0.0", 143, "starttls"), Listener("pop3", "::", 110, "none"))


def test_before_dialling_explicit_listener_addresses() -> None:
    assert names_own_listener(EXPLICIT, "127.0.0.1", 143)
    assert names_own_listener(EXPLICIT, "2001:db8::10", 993)
    assert names_own_listener(EXPLICIT, "2001:DB8:0::10", 993)
    assert not names_own_listener(EXPLICIT, "127.0.0.1", 10143)  # a backend on this host
    assert not names_own_listener(EXPLICIT, "127.0.0.2", 143)
    assert not names_own_listener(EXPLICIT, "mail.example.org", 143)


def test_before_dialling_wildcard_listeners_catch_loopback() -> None:
    assert names_own_listener(WILDCARD, "127.0.0.1", 143)
    assert names_own_listener(WILDCARD, "127.1.2.3", 143)
    assert names_own_listener(WILDCARD, "::1", 110)
    assert not names_own_listener(WILDCARD, "10.0.0.5", 143)  # known only once connected
    assert not names_own_listener(WILDCARD, "127.0.0.1", 993)


def test_after_connecting() -> None:
    # A name that resolved to our own explicit listener.
    assert is_own_listener(EXPLICIT, "127.0.0.1", 143, "127.0.0.1")
    assert is_own_listener(EXPLICIT, "::ffff:127.0.0.1", 143, "127.0.0.1")
    # A wildcard listener reached on one of this machine's addresses: the kernel picks
    # that same address as our end of the connection.
    assert is_own_listener(WILDCARD, "10.0.0.5", 143, "10.0.0.5")
    assert is_own_listener(WILDCARD, "::1", 110, "::1")
    # A real backend elsewhere, or on this machine on another port.
    assert not is_own_listener(WILDCARD, "10.0.0.6", 143, "10.0.0.5")
    assert not is_own_listener(WILDCARD, "10.0.0.5", 1143, "10.0.0.5")
    assert not is_own_listener(EXPLICIT, "10.0.0.5", 143, "10.0.0.5")


def test_listener_given_by_name() -> None:
    named = (Listener("imap", "localhost", 143, "none"),)
    assert names_own_listener(named, "LOCALHOST", 143)
    assert not names_own_listener(named, "127.0.0.1", 1430)

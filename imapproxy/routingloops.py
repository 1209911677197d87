# -*- test-case-name: tests.test_routingloops -*-
"""Loop protection: never use one of the proxy's own listeners as a backend.

A map entry or an LDAP mailHost that names the proxy itself (a typo, a DNS name that
resolves to the proxy, "127.0.0.1:143" copied from a backend's config) would make every
login open connections to itself until descriptors run out. Pure functions, no I/O.

Two checks: before dialling, an IP-literal backend that is one of our listening
addresses; after connecting (which also covers host names and wildcard listeners), a
connection whose far end is a listening address of ours on this machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .config import Listener

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same(a: str, b: str) -> bool:
    ip_a, ip_b = _ip(a), _ip(b)
    if ip_a is None or ip_b is None:
        return a.lower() == b.lower()
    return ip_a == ip_b


def names_own_listener(listeners: Iterable[Listener], host: str, port: int) -> bool:
    """Before dialling: is ``host:port`` one of our listening addresses?

    For a wildcard listener only loopback addresses are known to be ours here; other
    local addresses are caught by ``is_own_listener`` once connected.
    """
    address = _ip(host)
    for listener in listeners:
        if listener.port != port:
            continue
        if listener.host in _WILDCARDS:
            if address is not None and address.is_loopback:
                return True
        elif _same(listener.host, host):
            return True
    return False


def is_own_listener(listeners: Iterable[Listener], peer_host: str, peer_port: int,
                    local_host: str) -> bool:
    """After connecting: does this connection (peer, our local end) reach our own listener?

    A wildcard listener is ours on every local address; a connection to a local
    address has that same address as its local end (the kernel picks it as the
    source), so ``peer_host == local_host`` marks the peer as this machine.
    """
    for listener in listeners:
        if listener.port != peer_port:
            continue
        if listener.host in _WILDCARDS:
            peer = _ip(peer_host)
            if _same(peer_host, local_host) or (peer is not None and peer.is_loopback):
                return True
        elif _same(listener.host, peer_host):
            return True
    return False

# -*- test-case-name: tests.test_forwarding -*-
"""Telling the backend who the client really is (``[backend] forward_client``).

Behind a proxy every login comes from the proxy's address, so the backend's own
logs, fail2ban and per-IP limits see one host. Three ways out:

- ``"id"`` (the default): IMAP ID (RFC 2971) before LOGIN with ``x-originating-ip``,
  ``x-originating-port``, ``x-connected-ip``, ``x-connected-port`` and
  ``x-session-id``. Dovecot believes them from its ``login_trusted_networks`` and
  ignores them from anyone else; servers that do not know them ignore them, and an
  ID the backend refuses does not stop the login. For POP3 the same facts go out as
  XCLIENT, where the backend offers it (pop3backend.py).
- ``"proxy-v2"``: a PROXY protocol v2 header before the first byte (the backend must
  expect it on that port, e.g. Dovecot ``haproxy = yes``).
- ``"none"``: nothing.

Whatever the mode, a client's own ``x-originating-*`` (and the other keys a trusted
peer may set) are never passed on: the backend trusts the proxy, so it would
believe a client claiming any address it likes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RoutingLoop
from .proxyprotocol import Address, encode_v2, parse_ip

IdParams = tuple[tuple[str, str | None], ...]

#: Keys Dovecot (login-common/client-common.c) accepts from trusted peers only.
TRUSTED_KEYS = frozenset({"x-originating-ip", "x-originating-port", "x-connected-ip",
                          "x-connected-port", "x-proxy-ttl", "x-session-id",
                          "x-session-ext-id", "x-client-transport"})
TRUSTED_PREFIXES = ("x-forward-",)
#: RFC 2971 section 3.3: at most 30 field-value pairs.
MAX_ID_PAIRS = 30
#: Loop guard between proxies, Dovecot's own convention (login-proxy's proxy_ttl, which
#: also starts at 5): every hop passes ``x-proxy-ttl`` on one lower, and a login that
#: arrives with nothing left is refused. Our own-listener check (routingloops.py) cannot see a
#: loop through a second proxy instance; this can, with imapproxy or Dovecot proxies.
PROXY_TTL = 5


def next_ttl(client_id: IdParams) -> int:
    """The x-proxy-ttl to pass on: one less than the client's (capped), or PROXY_TTL - 1."""
    for key, value in client_id:
        if key.lower() == "x-proxy-ttl" and value is not None and value.isascii() \
                and value.isdigit():
            return min(int(value), PROXY_TTL) - 1
    return PROXY_TTL - 1


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What goes to the backend for one login: ID parameters and/or a PROXY header."""

    client_id: IdParams = ()
    proxy_header: bytes = b""


def strip_trusted_keys(client_id: IdParams) -> IdParams:
    """The client's ID parameters without the ones only the proxy may set."""
    return tuple((key, value) for key, value in client_id
                 if key.lower() not in TRUSTED_KEYS
                 and not key.lower().startswith(TRUSTED_PREFIXES))


def origin_params(client: Address, local: Address | None, session: str) -> IdParams:
    """The ID parameters describing the client's connection to the proxy."""
    params: list[tuple[str, str | None]] = [("x-originating-ip", _bare(client[0])),
                                            ("x-originating-port", str(client[1]))]
    if local is not None:
        params += [("x-connected-ip", _bare(local[0])), ("x-connected-port", str(local[1]))]
    params.append(("x-session-id", session))
    return tuple(params)


def for_login(mode: str, client_id: IdParams, client: Address | None, local: Address | None,
              session: str) -> Forwarding:
    """What to send the backend, for ``[backend] forward_client = mode``.

    Raises RoutingLoop when the client (another proxy) passed on an x-proxy-ttl with
    nothing left.

    ``client`` is None when the client's address is not an IP one (then there is
    nothing true to forward).
    """
    own = strip_trusted_keys(client_id)
    if mode == "id" and client is not None:
        ttl = next_ttl(client_id)
        if ttl <= 0:
            raise RoutingLoop()
        ours = (("x-proxy-ttl", str(ttl)),) + origin_params(client, local, session)
        return Forwarding(client_id=own[:MAX_ID_PAIRS - len(ours)] + ours)
    if mode == "proxy-v2":
        return Forwarding(client_id=own, proxy_header=encode_v2(client, local))
    return Forwarding(client_id=own)


def ip_endpoint(address: object) -> Address | None:
    """(host, port) of a transport address with an IP host (IPv4Address, IPv6Address)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int) and parse_ip(host) is not None:
        return host, port
    return None


def _bare(host: str) -> str:
    """An address as Dovecot parses it: no brackets, no zone, IPv4-mapped unwrapped."""
    host = host.strip("[]").partition("%")[0]
    if host.lower().startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host

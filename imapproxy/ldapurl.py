# -*- test-case-name: tests.test_ldapurl -*-
"""LDAP URIs as operators write them (RFC 4516 section 2), parsed once at start-up.

``parse_ldap_uri`` turns ``[directory.ldap] uris`` entries into ``LdapUri`` values:
scheme, host, port, socket path and DN, percent-decoded and checked, or raises
ValueError with a reason an operator can act on. Pure: no Twisted, no ldap3.

Accepted forms:

- ``ldap://host``, ``ldap://host:port``, each with or without a trailing ``/``
  (the form of OpenLDAP's ldap.conf), and ``ldaps://`` likewise. The host is a DNS
  name, an IPv4 address or an IPv6 address in brackets (RFC 3986 section 3.2.2).
  The port defaults to 389 for ldap and 636 for ldaps; ``host:`` (an empty port,
  RFC 3986 section 3.2.3) means the default too.
- ``ldap://host/DN``: the DN (percent-encoded, RFC 4516 section 2.1) names the
  search base (RFC 4516 section 2: "the base object of the LDAP search"). An empty
  or absent DN leaves the base to the ``base`` key (RFC 4516 section 3 would make
  it the zero-length DN, which is no useful base for finding users).
- ``ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/``: LDAP over a Unix socket (an OpenLDAP
  extension, not in RFC 4516), the absolute socket path percent-encoded as host.

Refused, each with its reason: other schemes; non-ASCII or whitespace (RFC 4516
section 2.1: percent-encode them); user information (``user@host``: the bind DN
is a key of its own); an empty host (it means "the client library's default",
libldap's compile-time choice, which imapproxy does not guess, for ldapi as
well); ports outside 1-65535; IPv6 zone identifiers; fragments; and the
``?attributes?scope?filter?extensions`` parts when any is non-empty. Those parts
say how to search, which the ``scope``, ``filter`` and ``*_attribute`` keys say
for every URI at once; a URL that carried its own (a Perdition map URL pasted
in, say) would be silently overruled, so it is refused and the message points
at the keys.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

#: scheme -> default port (None: no port, a Unix socket)
DEFAULT_PORTS: dict[str, int | None] = {"ldap": 389, "ldaps": 636, "ldapi": None}

#: Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107

#: RFC 1035 section 2.3.4
MAX_HOST_NAME = 253
MAX_LABEL = 63

# A host name label: letters, digits and hyphens (RFC 1123 section 2.1), plus "_",
# which some internal DNS zones use and which resolvers accept.
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
_PORT = re.compile(r"[0-9]+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 section 3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims )
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]*")
# RFC 4512 section 1.4: descr (keystring) or numericoid, the attribute types of RFC 4514
_ATTRIBUTE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)*")
# RFC 4514 section 3: what may follow a backslash besides two hex digits
_ESCAPABLE = ' "#+,;<=>\\'
_HEX_PAIR = re.compile(r"[0-9A-Fa-f]{2}")
# Left unencoded when formatting a DN: RFC 4514's separators read better plain.
_DN_SAFE = "=,+;"


@dataclass(frozen=True, slots=True)
class LdapUri:
    """One parsed LDAP URI; ``str()`` gives its canonical form."""

    #: "ldap", "ldaps" or "ldapi" (lower case)
    scheme: str
    #: DNS name (lower case), IPv4 address, or IPv6 address without brackets; "" for ldapi
    host: str = ""
    #: TCP port (the scheme's default when the URI has none); None for ldapi
    port: int | None = None
    #: absolute path of the Unix socket, for ldapi only
    socket_path: str | None = None
    #: the percent-decoded DN part, "" when absent
    dn: str = ""

    @property
    def implicit_tls(self) -> bool:
        """True for ldaps: TLS from the first byte (no StartTLS)."""
        return self.scheme == "ldaps"

    def __str__(self) -> str:
        return format_ldap_uri(self)


def format_ldap_uri(uri: LdapUri) -> str:
    """The canonical text of ``uri``: explicit port, trailing "/", DN percent-encoded."""
    dn = quote(uri.dn, safe=_DN_SAFE)
    if uri.scheme == "ldapi":
        return f"ldapi://{quote(uri.socket_path or '', safe='')}/{dn}"
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    return f"{uri.scheme}://{host}:{uri.port}/{dn}"


def redact(text: str) -> str:
    """``text`` with any user information (``user:password@``) masked, for messages."""
    scheme, sep, rest = text.partition("://")
    authority_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
                        default=len(rest))
    at = rest.rfind("@", 0, authority_end)
    if not sep or at < 0:
        return text
    return f"{scheme}://...@{rest[at + 1:]}"


def parse_ldap_uri(text: str) -> LdapUri:
    """Parse one LDAP URI; raises ValueError (and nothing else) saying what is wrong."""
    if not text:
        raise ValueError("is empty")
    if not text.isascii():
        raise ValueError("contains non-ASCII characters; percent-encode them "
                         "(RFC 4516 section 2.1)")
    for position, char in enumerate(text):
        if char.isspace() or not char.isprintable():
            raise ValueError(f"contains whitespace or a control character at position "
                             f"{position}; percent-encode it (%20 for a space), and give "
                             "several servers as several URIs")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError("is not an LDAP URI: expected ldap://, ldaps:// or ldapi://")
    scheme = scheme.lower()  # RFC 3986 section 3.1: schemes are case-insensitive
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"has scheme {scheme!r}: expected ldap, ldaps or ldapi")
    if "#" in rest:
        raise ValueError("has a fragment (#); LDAP URIs have none")
    # RFC 3986 section 3.2: the authority ends at the first "/" or "?".
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends, default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise ValueError("has user information (user@host); give the bind DN in "
                         "bind_dn and the password in bind_password_file")
    if tail.startswith("?"):
        raise ValueError("has '?' parts without a '/' before them (RFC 4516 section 2)")
    if scheme == "ldapi":
        host, port, socket_path = "", None, _socket_path(authority)
    else:
        (host, port), socket_path = _host_port(authority, scheme), None
    dn = ""
    if tail:
        path, question, query = tail[1:].partition("?")
        if question:
            _check_query(query)
        dn = _decode(path, "the DN part")
        if dn:
            check_dn(dn)
    return LdapUri(scheme, host, port, socket_path, dn)


def _check_query(query: str) -> None:
    parts = query.split("?")
    if len(parts) > 4:
        raise ValueError("has more than four '?' parts (RFC 4516 section 2: "
                         "?attributes?scope?filter?extensions)")
    if any(parts):
        hint = " ({user} where a Perdition map has %s)" if "%s" in query else ""
        raise ValueError(f"has search parts ?{query}, which imapproxy does not read: "
                         f"give them as the scope, filter{hint} and *_attribute keys of "
                         f"[directory.ldap], and keep the URI to scheme://host:port/")


def _decode(text: str, what: str) -> str:
    if _BAD_PERCENT.search(text):
        raise ValueError(f"{what} has a '%' not followed by two hex digits "
                         "(write a literal '%' as %25)")
    try:
        decoded = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 once percent-decoded") from None
    if any(not c.isprintable() for c in decoded):
        raise ValueError(f"{what} contains a control character once percent-decoded")
    return decoded


def _host_port(authority: str, scheme: str) -> tuple[str, int]:
    default = DEFAULT_PORTS[scheme]
    assert default is not None
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise ValueError("has '[' without ']' around its IPv6 address")
        host = _ipv6(authority[1:close])
        after = authority[close + 1:]
        if after and not after.startswith(":"):
            raise ValueError(f"has {after!r} after the IPv6 address; expected ':port'")
        port_text = after[1:] if after else ""
    else:
        host_text, _, port_text = authority.partition(":")
        if ":" in port_text:
            raise ValueError("has several ':'; an IPv6 address goes in brackets, "
                             "as in ldap://[2001:db8::1]:389/")
        host = _host_name(host_text, scheme)
    if not port_text:
        return host, default
    if not _PORT.fullmatch(port_text):
        raise ValueError(f"has port {port_text!r}; a port is a number from 1 to 65535")
    port = int(port_text) if len(port_text) <= 5 else 0
    if not 0 < port < 65536:
        raise ValueError(f"has port {port_text}; a port is a number from 1 to 65535")
    return host, port


def _ipv6(literal: str) -> str:
    if "%" in literal:
        raise ValueError("has an IPv6 zone identifier, which is not supported; "
                         "use a global or loopback address, or a host name")
    if literal[:1] in ("v", "V"):
        raise ValueError("has an IPvFuture address, which is not supported")
    try:
        return str(ipaddress.IPv6Address(literal))
    except ValueError:
        raise ValueError(f"has [{literal}], which is not an IPv6 address") from None


def _host_name(text: str, scheme: str) -> str:
    if not text:
        raise ValueError(f"has no host; name the server, as in {scheme}://ldap.example.org/ "
                         "(an empty host means the client library's default, which "
                         "imapproxy does not guess)")
    if not _REG_NAME.fullmatch(text):
        raise ValueError(f"has host {text!r}, which is not a host name or address")
    host = _decode(text, "the host").lower()
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (len(host) > MAX_HOST_NAME or not all(len(label) <= MAX_LABEL and _LABEL.fullmatch(label)
                                             for label in labels)):
        raise ValueError(f"has host {host!r}, which is not a DNS name "
                         "(letters, digits, '-' and '.'; non-ASCII names in xn-- form)")
    if labels[-1].isdigit():
        # RFC 3696 section 2: a top-level label is never all digits; "10.1" or
        # "127.000.0.1" would be read by inet_aton in surprising ways.
        raise ValueError(f"has host {host!r}, which is neither an IPv4 address "
                         "(four decimal numbers) nor a DNS name")
    return host


def _socket_path(authority: str) -> str:
    example = "ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/"
    if not authority:
        raise ValueError(f"has no socket path; give it percent-encoded as the host, as in "
                         f"{example} (an empty host means libldap's built-in default, "
                         "which imapproxy does not guess)")
    if ":" in authority:
        raise ValueError("has a ':' in its host; ldapi:// takes no port "
                         "(percent-encode a ':' in the path as %3A)")
    if not _REG_NAME.fullmatch(authority):
        raise ValueError(f"has {authority!r} as socket path; percent-encode it, as in {example}")
    path = _decode(authority, "the socket path")
    if not path.startswith("/"):
        raise ValueError(f"has socket path {path!r}, which is not absolute; "
                         f"percent-encode every '/', as in {example}")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"has a socket path longer than {MAX_SOCKET_PATH} bytes, "
                         "the limit of a Unix socket address")
    return path


# --------------------------------------------------------------------------------------
# Distinguished names (RFC 4514), just enough to check and compare them


def _split_dn(dn: str) -> list[list[tuple[str, str]]]:
    """RDNs as lists of (type, value) pairs, escapes kept; raises ValueError."""
    rdns: list[list[tuple[str, str]]] = []
    avas: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(dn):
        char = dn[i]
        if char == "\\":
            if _HEX_PAIR.fullmatch(dn[i + 1:i + 3]):
                current.append(dn[i:i + 3].lower())
                i += 3
                continue
            if dn[i + 1:i + 2] and dn[i + 1] in _ESCAPABLE:
                current.append(dn[i:i + 2])
                i += 2
                continue
            raise ValueError("has a '\\' not followed by a special character or two hex "
                             "digits (RFC 4514 section 3)")
        if char in ",+":
            avas.append("".join(current))
            current = []
            if char == ",":
                rdns.append(_pairs(avas))
                avas = []
        else:
            current.append(char)
        i += 1
    avas.append("".join(current))
    rdns.append(_pairs(avas))
    return rdns


def _pairs(avas: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for ava in avas:
        kind, equals, value = ava.partition("=")
        kind = kind.strip()
        if not equals or not _ATTRIBUTE_TYPE.fullmatch(kind):
            raise ValueError(f"has {ava!r} where a DN needs type=value (RFC 4514 section 3)")
        pairs.append((kind, value))
    return pairs


def check_dn(dn: str) -> None:
    """Raise ValueError unless ``dn`` reads as an RFC 4514 distinguished name."""
    try:
        _split_dn(dn)
    except ValueError as e:
        raise ValueError(f"the DN part {dn!r} {e}") from None


def same_dn(a: str, b: str) -> bool:
    """Whether two DNs name the same entry, ignoring case and spaces around separators.

    Case-insensitive on values too: the naming attributes of search bases (dc, ou,
    o, cn) compare with caseIgnoreMatch. A DN that does not parse compares as text.
    """
    try:
        keys = [
            [sorted((kind.lower(), value.strip().lower()) for kind, value in rdn)
             for rdn in _split_dn(dn)]
            for dn in (a, b)
        ]
    except ValueError:
        return a.strip().lower() == b.strip().lower()
    return keys[0] == keys[1]

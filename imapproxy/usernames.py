# -*- test-case-name: tests.test_usernames -*-
"""Username rewriting before the directory lookup and the backend login.

The same vocabulary as Perdition's ``--domain_delimiter``, ``--strip_domain``,
``--explicit_domain`` and ``--lower_case``: split at the delimiter, give bare names a
default domain, lower-case, and drop the domain for the lookup and/or the backend.
The login name a directory entry carries (``login_attribute``) is applied later,
by the directory, and wins over ``Names.backend``.

Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .config import UsernameConfig


@dataclass(frozen=True, slots=True)
class Names:
    """The names one login is known by."""

    #: the key handed to the directory (``{user}`` in an LDAP filter)
    lookup: str
    #: the name to log in with at the backend, unless the directory names another
    backend: str
    #: the part before the (last) delimiter
    local: str
    #: the part after it; "" for a bare name without a default domain
    domain: str


def split(username: str, delimiter: str = "@") -> tuple[str, str]:
    """Split at the last delimiter into (local, domain); ("name", "") for a bare name.

    The last occurrence, as Perdition does: RFC 5321 section 4.1.2 lets a quoted
    local part contain "@", a domain never does.
    """
    local, sep, domain = username.rpartition(delimiter)
    if not sep:
        return username, ""
    return local, domain


def rewrite(username: str, cfg: UsernameConfig) -> Names:
    """Apply the [username] rules to a login name as the client sent it.

    Order: split, default domain for bare names, lower-case, then strip per use.
    A trailing delimiter ("bob@") counts as a bare name: there is no empty domain.
    """
    local, domain = split(username, cfg.domain_delimiter)
    if not domain:
        domain = cfg.default_domain
    if cfg.lowercase:
        # str.lower, not casefold: casefold maps "ß" to "ss", which would name
        # another mailbox rather than spell the same one differently.
        local = local.lower()
        domain = domain.lower()
    full = f"{local}{cfg.domain_delimiter}{domain}" if domain else local
    return Names(
        lookup=local if cfg.strip_domain_for_lookup else full,
        backend=local if cfg.strip_domain_for_backend else full,
        local=local,
        domain=domain,
    )


def username_problem(username: str, max_bytes: int) -> str | None:
    """Why this login name is refused before any lookup, or None if it is acceptable.

    Longer than ``max_bytes`` (RFC 5321 section 4.5.3.1: 64 + 1 + 255), empty, not
    UTF-8, or holding a control character (the C0 and C1 controls, NUL, CR, LF and
    U+0085 among them) or a line or paragraph separator (U+2028, U+2029): none of
    these can be a mailbox's name, and each of them has been used to cut log lines or
    protocol lines short. The client gets the ordinary authentication failure.
    """
    if not username:
        return "empty username"
    try:
        size = len(username.encode("utf-8"))
    except UnicodeEncodeError:
        return "username is not UTF-8"
    if size > max_bytes:
        return f"username longer than {max_bytes} bytes"
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in username):
        return "control character in username"
    return None

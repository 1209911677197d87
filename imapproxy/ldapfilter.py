# -*- test-case-name: tests.test_ldapfilter -*-
"""The LDAP search filter for one login, with every substituted value escaped.

Perdition pastes the login into its filter as is, so the login ``a*`` matched alice's
entry and routed the client to her server. Here each value goes through RFC 4515
section 3 escaping before it touches the template, so a login can only ever be an
assertion value, never filter syntax.

Pure: no I/O, no Twisted, no ldap3.
"""

from __future__ import annotations

from .usernames import split

# RFC 4515 section 3: in a filter's assertion value, the octets for NUL, "(", ")",
# "*" and "\" must be written as "\" and two hex digits. Everything else may stay
# literal UTF-8 (the UTF1SUBSET / UTFMB productions), so non-ASCII logins keep
# their readable form in slapd's logs.
_ESCAPES = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\x00": r"\00"}
_TABLE = str.maketrans(_ESCAPES)


def escape(value: str) -> str:
    """Escape one assertion value per RFC 4515 section 3."""
    return value.translate(_TABLE)


def build_filter(template: str, user: str, delimiter: str = "@") -> str:
    """Fill ``{user}``, ``{local}`` and ``{domain}`` in a filter template, escaped.

    ``user`` is the lookup name (already rewritten); ``local`` and ``domain`` are its
    parts around the last delimiter, ``domain`` being "" for a bare name.
    Raises ValueError for a name that is not valid Unicode text (a lone surrogate
    from a client's undecodable bytes): it can never match an entry, and ldap3
    would fail to encode it deep in a worker thread.
    """
    user.encode("utf-8")  # UnicodeEncodeError is a ValueError
    local, domain = split(user, delimiter)
    return template.format(user=escape(user), local=escape(local), domain=escape(domain))

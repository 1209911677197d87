"""Credentials that cannot leak into a log: the password lives in a redacting type.

Also decodes SASL PLAIN (RFC 4616).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass, field

from .errors import AuthenticationFailed, ClientProtocolError


class Secret:
    """Holds bytes that must never be printed; repr and str are redacted."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Credentials:
    """A username (safe to log) and its password (a Secret)."""

    username: str
    password: Secret = field(repr=False)
    #: SASL authorization identity, if the client gave one (RFC 4616 section 2).
    authzid: str = ""
    #: how the client authenticated: "LOGIN", "PLAIN", "USER" (POP3), "OAUTHBEARER",
    #: "XOAUTH2"; for the last two ``password`` is the bearer token
    mechanism: str = "LOGIN"
    #: the client's whole SASL message (decoded), replayed to the backend as it came
    #: (sasl.py): set for the token mechanisms, which the proxy passes through
    message: Secret | None = field(default=None, repr=False)


def decode_username(raw: bytes) -> str:
    """A username as text. RFC 9051 allows UTF-8 in LOGIN; bytes that are not UTF-8 are
    kept as surrogates, so that usernames.username_problem() refuses the name as a
    failed login (counted by the penalty) rather than as a protocol error here."""
    return raw.decode("utf-8", "surrogateescape")


def decode_sasl_plain(encoded: bytes, mechanism: str = "PLAIN") -> Credentials:
    """Decode a base64 SASL PLAIN response: authzid NUL authcid NUL passwd (RFC 4616 section 2)."""
    try:
        message = b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ClientProtocolError("Invalid base64 in SASL response") from None
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise ClientProtocolError("Malformed SASL PLAIN response")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise ClientProtocolError("Malformed SASL PLAIN response")
    username = decode_username(authcid)
    try:
        authz = authzid.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientProtocolError("Authorization identity is not valid UTF-8") from None
    # Proxy logins on behalf of someone else are not supported: the backend would have to
    # trust us as a master user. RFC 4616 lets a server refuse any authzid it won't honour.
    if authz and authz != username:
        raise AuthenticationFailed()
    return Credentials(username, Secret(password), authz, mechanism)

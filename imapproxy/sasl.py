# -*- test-case-name: tests.test_sasl -*-
"""SASL mechanisms, protocol-neutral and sans-IO: what the client says, what the backend
is sent.

The client side (``ServerExchange``): the proxy plays the SASL server for PLAIN (RFC 4616),
LOGIN (draft-murchison-sasl-login), OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's
``user=...^Aauth=Bearer ...^A^A``) until it knows who the user is and holds their
credentials. IMAP's AUTHENTICATE, POP3's AUTH and ManageSieve's AUTHENTICATE only
frame the messages: base64 lines ("+" challenges) or strings (ManageSieve), "*" to cancel.

The backend side (``backend_message``, ``dummy_response``): a password is sent with the
backend protocol's own login; a token cannot be checked here, so the client's message
is replayed to the backend as it came, and the backend decides.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode, b64encode
from dataclasses import dataclass

from .credentials import Credentials, Secret, decode_sasl_plain, decode_username
from .errors import AuthenticationFailed, ClientProtocolError, ProxyError, TokenRefused

#: Every mechanism the proxy knows, in the order CAPABILITY lists them.
MECHANISMS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
#: What [auth] mechanisms is when not set: the password mechanisms.
DEFAULT_MECHANISMS = ("PLAIN", "LOGIN")
#: Mechanisms whose credential is a bearer token that only the backend can check.
TOKEN_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2"})

#: draft-murchison-sasl-login section 2: the server's two prompts.
LOGIN_PROMPTS = (b"Username:", b"Password:")

#: RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
#: RFC 7628 section 3.1: key = 1*(ALPHA); value = *(VCHAR / SP / HTAB / CR / LF), and
#: UTF-8 too: XOAUTH2's user= holds an address, which may be one (RFC 6531).
_KEY = re.compile(rb"[A-Za-z]+")
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n\x80-\xff]*")
#: What a backend's challenge may be before it is shown to a client: base64, nothing else.
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send the client this challenge (raw; the protocol base64-encodes it)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Complete:
    """The exchange is over: these are the client's credentials."""

    credentials: Credentials


Step = Challenge | Complete


def decode_base64(encoded: bytes) -> bytes:
    """A client's base64 SASL line, strictly (RFC 4648 section 4; no spaces, no junk)."""
    try:
        return b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ClientProtocolError("Invalid base64 in SASL response") from None


class ServerExchange:
    """The proxy's side of one SASL exchange with a client, for one mechanism."""

    __slots__ = ("mechanism", "_username")

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        #: LOGIN: the name, once given
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        """The command arrived, with its initial response (base64) or None without one.

        Raises ClientProtocolError for a message that is not one (base64 or syntax), and
        AuthenticationFailed (PLAIN) for one the proxy refuses.
        """
        if initial is None:
            if self.mechanism == "LOGIN":
                return Challenge(LOGIN_PROMPTS[0])
            # RFC 4422 section 5: a client-first mechanism without an initial response
            # gets an empty challenge.
            return Challenge(b"")
        # RFC 4959 section 3 (IMAP) and RFC 5034 section 4 (POP3): "=" is an empty one.
        return self.respond(b"" if initial == b"=" else initial)

    def respond(self, line: bytes) -> Step:
        """The client's next response line (base64); "*" is the protocol's to handle."""
        if self.mechanism == "PLAIN":
            return Complete(decode_sasl_plain(line))
        message = decode_base64(line)
        if self.mechanism == "LOGIN":
            return self._login(message)
        if self.mechanism == "OAUTHBEARER":
            return Complete(parse_oauthbearer(message))
        return Complete(parse_xoauth2(message))

    def _login(self, message: bytes) -> Step:
        if self._username is None:
            if not message:
                raise ClientProtocolError("Empty user name")
            self._username = decode_username(message)
            return Challenge(LOGIN_PROMPTS[1])
        if not message:
            raise ClientProtocolError("Empty password")
        return Complete(Credentials(self._username, Secret(message), "", "LOGIN"))


def _bearer(value: bytes) -> bytes:
    """The token of an ``auth`` value: "Bearer" 1*SP b64token (RFC 6750 section 2.1)."""
    scheme, _, rest = value.partition(b" ")
    token = rest.lstrip(b" ")
    if scheme.lower() != b"bearer" or not _B64TOKEN.fullmatch(token):
        raise ClientProtocolError("Malformed bearer token")
    return token


def _pairs(text: bytes) -> dict[bytes, bytes]:
    """``key=value^A`` pairs (RFC 7628 section 3.1 kvpair); each key once."""
    pairs: dict[bytes, bytes] = {}
    for item in text.split(b"\x01"):
        key, equals, value = item.partition(b"=")
        if not equals or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value) \
                or key in pairs:
            raise ClientProtocolError("Malformed key/value pair")
        pairs[key] = value
    return pairs


def _saslname(raw: bytes) -> bytes:
    """RFC 5801 section 4: in a saslname "," is "=2C" and "=" is "=3D"; no other "="."""
    out = bytearray()
    rest = raw
    while rest:
        head, equals, rest = rest.partition(b"=")
        out += head
        if equals:
            escape, rest = rest[:2], rest[2:]
            if escape == b"2C":
                out += b","
            elif escape == b"3D":
                out += b"="
            else:
                raise ClientProtocolError("Malformed authorization identity")
    return bytes(out)


def _encode_saslname(name: bytes) -> bytes:
    return name.replace(b"=", b"=3D").replace(b",", b"=2C")


def parse_oauthbearer(message: bytes) -> Credentials:
    """An OAUTHBEARER initial client response (RFC 7628 section 3.1)::

        gs2-header ^A auth=Bearer <token> ^A [host=... ^A port=... ^A] ^A

    The GS2 header's authzid (``n,a=user,``) names the user; the proxy routes by it,
    so it is required here, though RFC 7628 makes it optional.
    """
    if not message.endswith(b"\x01\x01"):
        raise ClientProtocolError("Malformed OAUTHBEARER message")
    header, kvsep, body = message[:-2].partition(b"\x01")
    if not kvsep or not body:
        raise ClientProtocolError("Malformed OAUTHBEARER message")
    # RFC 5801 section 4: gs2-cbind-flag "," [authzid] ","; OAUTHBEARER has no channel
    # binding (RFC 7628 section 3.1), so "p=" is refused.
    fields = header.split(b",")
    if len(fields) != 3 or fields[0] not in (b"n", b"y") or fields[2]:
        raise ClientProtocolError("Malformed OAUTHBEARER GS2 header")
    if not fields[1].startswith(b"a=") or len(fields[1]) == 2:
        raise ClientProtocolError("OAUTHBEARER needs the user in the GS2 header (a=)")
    user = _saslname(fields[1][2:])
    pairs = _pairs(body)
    if b"auth" not in pairs:
        raise ClientProtocolError("OAUTHBEARER message without auth=")
    token = _bearer(pairs[b"auth"])
    username = decode_username(user)
    return Credentials(username, Secret(token), username, "OAUTHBEARER", Secret(message))


def parse_xoauth2(message: bytes) -> Credentials:
    """An XOAUTH2 client response: ``user=<name>^Aauth=Bearer <token>^A^A`` (Google's
    XOAUTH2 protocol, the form Microsoft 365 takes too)."""
    if not message.endswith(b"\x01\x01"):
        raise ClientProtocolError("Malformed XOAUTH2 message")
    pairs = _pairs(message[:-2])
    if set(pairs) != {b"user", b"auth"} or not pairs[b"user"]:
        raise ClientProtocolError("XOAUTH2 message needs user= and auth=")
    token = _bearer(pairs[b"auth"])
    username = decode_username(pairs[b"user"])
    return Credentials(username, Secret(token), username, "XOAUTH2", Secret(message))


def backend_message(credentials: Credentials, login: str) -> bytes:
    """The token message for the backend, whose name for the user is ``login``: the
    client's own bytes when the name is the same (the usual case), else the same message
    naming ``login``. Raw: the backend dialogue base64-encodes it."""
    assert credentials.message is not None, "not a token mechanism"
    message = credentials.message.reveal()
    if login == credentials.username:
        return message
    name = login.encode("utf-8", "surrogateescape")
    if credentials.mechanism == "OAUTHBEARER":
        header, _, rest = message.partition(b"\x01")
        flag = header.split(b",", 1)[0]
        return flag + b",a=" + _encode_saslname(name) + b",\x01" + rest
    token = credentials.password.reveal()
    return b"user=" + name + b"\x01auth=Bearer " + token + b"\x01\x01"


def dummy_response(mechanism: str) -> bytes:
    """What a client answers to a token mechanism's error challenge, base64: RFC 7628
    section 3.2.3's single %x01 for OAUTHBEARER; an empty response for XOAUTH2 (Google's
    XOAUTH2 protocol)."""
    return b"AQ==" if mechanism == "OAUTHBEARER" else b""


#: RFC 7628 section 3.2.2 error challenges for a token the proxy refuses itself (a user it
#: cannot route, a name it refuses), as Dovecot words them for its own refusals: the
#: client cannot tell the proxy's refusal from the backend's.
ERROR_CHALLENGES = {
    "OAUTHBEARER": b64encode(b'{"status":"invalid_token"}'),
    "XOAUTH2": b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}'),
}


def failure_challenge(mechanism: str, error: ProxyError) -> bytes | None:
    """The error challenge (base64) a client of a token mechanism is shown before the
    failure: the backend's own if it sent one, else ours; None for anything but a refused
    login (a backend that is down is no reason to refresh a token), or another mechanism."""
    if isinstance(error, TokenRefused):
        return error.challenge
    if mechanism in ERROR_CHALLENGES and isinstance(error, AuthenticationFailed):
        return ERROR_CHALLENGES[mechanism]
    return None


def relayable_challenge(encoded: bytes) -> bytes | None:
    """A backend's error challenge if it is plain base64 (safe to put on a client's line),
    else None."""
    return encoded if encoded and _BASE64.fullmatch(encoded) else None

# -*- test-case-name: tests.test_clienttls -*-
"""Client-facing TLS: the default certificate, certificates chosen by SNI, and reload.

``ServerTLS`` is what listeners and STARTTLS/STLS are given (an
``IOpenSSLServerConnectionCreator``). Each new TLS connection starts on the default
context; when the ClientHello names a server (RFC 6066 section 3) that a [[tls.sni]]
table lists, the connection switches to that certificate's context. A name nobody lists
(or none at all) gets the default [tls] certificate.

``reload()`` rebuilds every context from the files (renewed certificates) or from a new
[tls] config; connections made afterwards use the new ones, established ones keep theirs.
A certificate that fails to load leaves the old set in place (ConfigError raised).

ALPN (RFC 7301): each listener gets ``for_protocol("imap")`` or ``for_protocol("pop3")``,
a creator over the same contexts whose connections know their listener's protocol. A
client that offers that protocol gets it selected; one that offers ALPN without it is
refused with the no_application_protocol alert (section 3.2), so that a browser sent to
the mail port by an HTTPS page (the ALPACA cross-protocol attack) never reaches IMAP or
POP3; a client that offers no ALPN is served as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from .certificates import not_after, read_pem_certificates
from .config import ConfigError, TlsConfig

log = Logger(namespace="imapproxy")

#: listener protocol -> its ALPN protocol ID (IANA "TLS Application-Layer Protocol
#: Negotiation (ALPN) Protocol IDs" registry: "imap", "pop3", "managesieve")
ALPN_IDS = {"imap": b"imap", "pop3": b"pop3", "managesieve": b"managesieve"}


class NoApplicationProtocol(SSL.Error):
    """The client offered ALPN protocols, none of them the listener's (RFC 7301 3.2).

    Raised from the ALPN select callback: pyOpenSSL then answers OpenSSL with
    SSL_TLSEXT_ERR_ALERT_FATAL, which sends the no_application_protocol alert, and
    re-raises this from do_handshake() (having cleared OpenSSL's error queue), where
    Twisted's TLS layer flushes the alert and ends the connection as for any handshake
    failure (it is an SSL.Error). Returning the library's NO_OVERLAPPING_PROTOCOLS
    sentinel would not do: that means "no ALPN", and the handshake would go on.
    """

    def __init__(self, offered: list[bytes], wanted: bytes) -> None:
        # The args of an SSL.Error are OpenSSL's error queue: (library, function, reason)
        # triples, which Twisted reads (tls._representsEOF).
        offers = ",".join(p.decode("ascii", "backslashreplace") for p in offered)
        super().__init__([("imapproxy", "ALPN", f"no application protocol: client offered "
                                                f"{offers!r}, not {wanted.decode()!r}")])


class _ServerConnection(SSL.Connection):
    """A server-side TLS connection that knows its listener's ALPN protocol ID."""

    #: None: nothing to negotiate (a caller that named no protocol)
    alpn: bytes | None = None


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """OpenSSL's ALPN callback, on every context (SNI switches keep it: RFC 7301 3.1)."""
    wanted = getattr(connection, "alpn", None)
    if wanted is None:
        return SSL.NO_OVERLAPPING_PROTOCOLS  # not negotiated, the handshake goes on
    if wanted in offered:
        return wanted
    raise NoApplicationProtocol(offered, wanted)


_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_options(config: TlsConfig, config_path: Path | str) -> ssl.CertificateOptions:
    """Options for client-facing TLS: the certificate with its chain, TLS 1.2 minimum."""
    assert config.certificate is not None and config.key is not None
    try:
        chain = read_pem_certificates(config.certificate)
        if not chain:
            raise ConfigError(config_path, "tls.certificate", "no PEM certificate in file")
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, config.key.read_bytes())
    except (OSError, crypto.Error, ValueError) as e:
        raise ConfigError(config_path, "tls.certificate", f"cannot load certificate/key: {e}") \
            from None
    extra: dict[str, object] = {}
    if config.ciphers:
        # Otherwise Twisted's default: forward-secret AEAD suites first, and none of
        # RC4, 3DES, MD5, DSS or anonymous key exchange.
        extra["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(
            config.ciphers)
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=_MIN_VERSIONS[config.min_version],
            **extra,  # type: ignore[arg-type]
        )
    except ValueError as e:  # no usable cipher in the string
        raise ConfigError(config_path, "tls.ciphers", str(e)) from None
    try:
        # A key that does not belong to the certificate fails here, at start-up.
        context = options.getContext()  # cached by CertificateOptions and shared
        context.check_privatekey()
        # Idle connections (most of an IDLE-heavy load) give their read/write buffers
        # back to OpenSSL's allocator: tens of KiB per connection.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    except SSL.Error as e:
        raise ConfigError(config_path, "tls.key", f"key does not match certificate: {e}") \
            from None
    return options


def _context(config: TlsConfig, config_path: Path | str, key_prefix: str) -> SSL.Context:
    try:
        context = server_options(config, config_path).getContext()
    except ConfigError as e:
        # server_options names tls.certificate/tls.key; say which table it really was.
        raise ConfigError(config_path, e.key.replace("tls", key_prefix, 1), e.message) from None
    # Replaces the callback that recent Twisted (26.x here; not Debian's 22.4, which sets
    # none) puts on every context: it looks for protocols on the wrapped factory, finds
    # none, and answers "selected: the empty string", which OpenSSL turns into an
    # internal_error alert for any client that offers ALPN (`openssl s_client -alpn imap`).
    context.set_alpn_select_callback(_select_alpn)
    return context


class _Contexts:
    """One immutable generation of contexts: the default one and those by SNI name."""

    __slots__ = ("default", "exact", "wildcard", "expiry")

    def __init__(self, config: TlsConfig, config_path: Path | str) -> None:
        assert config.certificate is not None
        self.default = _context(config, config_path, "tls")
        self.exact: dict[str, SSL.Context] = {}
        self.wildcard: dict[str, SSL.Context] = {}
        #: certificate (the default one as "default", the others by SNI domain) -> the
        #: Unix time its validity ends (for the metrics: renewals that did not happen)
        self.expiry: dict[str, float] = {"default": not_after(config.certificate)}
        for i, entry in enumerate(config.sni):
            per_name = TlsConfig(certificate=entry.certificate, key=entry.key,
                                 min_version=config.min_version, ciphers=config.ciphers)
            context = _context(per_name, config_path, f"tls.sni[{i}]")
            if entry.domain.startswith("*."):
                self.wildcard[entry.domain[2:]] = context
            else:
                self.exact[entry.domain] = context
            self.expiry[entry.domain] = not_after(entry.certificate)

    def lookup(self, name: str) -> SSL.Context | None:
        """An exact name first, then "*.parent" for one label (RFC 6125 section 6.4.3)."""
        context = self.exact.get(name)
        if context is None:
            _label, dot, parent = name.partition(".")
            if dot:
                context = self.wildcard.get(parent)
        return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server TLS connections for the listeners and for STARTTLS; reloadable."""

    def __init__(self, config: TlsConfig, config_path: Path | str) -> None:
        self.config = config
        self.config_path = config_path
        self._contexts = self._build(config)

    @property
    def expiry(self) -> dict[str, float]:
        """Certificate -> when it expires (Unix time), as loaded now."""
        return self._contexts.expiry

    def _build(self, config: TlsConfig) -> _Contexts:
        contexts = _Contexts(config, self.config_path)
        # Every connection starts on the default context; its callback picks by SNI.
        contexts.default.set_tlsext_servername_callback(
            lambda connection: self._servername(contexts, connection))
        return contexts

    def reload(self, config: TlsConfig | None = None) -> None:
        """Load the certificates again (from ``config`` if given) for new connections.

        Raises ConfigError and keeps serving the old certificates when one fails to load.
        Call it on SIGHUP: ``service.server_tls.reload(new_config.tls)``.
        """
        config = self.config if config is None else config
        if config.certificate is None:
            raise ConfigError(self.config_path, "tls.certificate",
                              "TLS listeners need a certificate; keeping the old one")
        self._contexts = self._build(config)
        self.config = config
        log.info("TLS certificates loaded: default {certificate}, {count} by SNI",
                 certificate=str(config.certificate), count=len(config.sni))

    def for_protocol(self, protocol: str) -> ListenerTLS:
        """The creator for a listener of ``protocol`` (and its STARTTLS/STLS)."""
        try:
            alpn = ALPN_IDS[protocol]
        except KeyError:
            raise ValueError(f"no ALPN protocol ID for {protocol!r}") from None
        return ListenerTLS(self, alpn)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        """A connection that negotiates no ALPN: listeners use ``for_protocol()``."""
        return self.connection(tlsProtocol, None)

    def connection(self, tls_protocol: Any, alpn: bytes | None) -> SSL.Connection:
        """A new server connection on the current default context."""
        connection = _ServerConnection(self._contexts.default, None)
        connection.alpn = alpn
        connection.set_app_data(tls_protocol)
        return connection

    def getContext(self) -> SSL.Context:  # noqa: N802
        """The default context, for callers that want an old-style context factory."""
        return self._contexts.default

    @staticmethod
    def _servername(contexts: _Contexts, connection: SSL.Connection) -> None:
        # Called by OpenSSL inside the handshake: must not raise.
        raw = connection.get_servername()
        if not raw:
            return
        name = raw.decode("ascii", "replace").lower().rstrip(".")
        context = contexts.lookup(name)
        if context is not None:
            connection.set_context(context)


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLS:
    """TLS for one listener: ServerTLS's current certificates, this protocol's ALPN."""

    def __init__(self, server_tls: ServerTLS, alpn: bytes) -> None:
        self.server_tls = server_tls
        self.alpn = alpn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        return self.server_tls.connection(tlsProtocol, self.alpn)

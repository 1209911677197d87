# -*- test-case-name: tests.test_servertls -*-
"""Client-facing TLS: the default certificate, certificates chosen by SNI, and reload.

``ServerTLS`` is what listeners and STARTTLS/STLS are given (an
``IOpenSSLServerConnectionCreator``). Each new TLS connection starts on the default
context; when the ClientHello names a server (RFC 6066 section 3) that a [[tls.sni]]
table lists, the connection switches to that certificate's context. A name nobody lists
(or none at all) gets the default [tls] certificate.

``reload()`` rebuilds every context from the files (renewed certificates) or from a new
[tls] config; connections made afterwards use the new ones, established ones keep theirs.
A certificate that fails to load leaves the old set in place (ConfigError raised).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from .config import ConfigError, TlsConfig
from .tls import server_options

log = Logger(namespace="imapproxy")


def _context(config: TlsConfig, config_path: Path | str, key_prefix: str) -> SSL.Context:
    try:
        return server_options(config, config_path).getContext()
    except ConfigError as e:
        # server_options names tls.certificate/tls.key; say which table it really was.
        raise ConfigError(config_path, e.key.replace("tls", key_prefix, 1), e.message) from None


class _Contexts:
    """One immutable generation of contexts: the default one and those by SNI name."""

    __slots__ = ("default", "exact", "wildcard")

    def __init__(self, config: TlsConfig, config_path: Path | str) -> None:
        assert config.certificate is not None
        self.default = _context(config, config_path, "tls")
        self.exact: dict[str, SSL.Context] = {}
        self.wildcard: dict[str, SSL.Context] = {}
        for i, entry in enumerate(config.sni):
            per_name = TlsConfig(certificate=entry.certificate, key=entry.key,
                                 min_version=config.min_version, ciphers=config.ciphers)
            context = _context(per_name, config_path, f"tls.sni[{i}]")
            if entry.domain.startswith("*."):
                self.wildcard[entry.domain[2:]] = context
            else:
                self.exact[entry.domain] = context

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

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self._contexts.default, None)
        connection.set_app_data(tlsProtocol)
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

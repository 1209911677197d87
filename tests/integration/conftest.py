"""Fixtures that start the proxy in front of the rig's Dovecot stores."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig.ports import free_port
from rig.proxy import ProxyProcess

ProxyStarter = Callable[..., ProxyProcess]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[ProxyStarter]:
    """Start proxies with a config text; each is stopped after the test."""
    started: list[ProxyProcess] = []

    def start(config: str, ports: list[int], files: dict[str, str] | None = None,
              name: str = "proxy") -> ProxyProcess:
        proxy = ProxyProcess(tmp_path / f"{name}{len(started)}", config, ports, files)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def client_tls(test_ca) -> ssl.SSLContext:
    """A client TLS context that trusts the test CA."""
    context = ssl.create_default_context(cafile=str(test_ca.ca_path))
    return context


def new_port() -> int:
    return free_port()

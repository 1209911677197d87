# -*- test-case-name: tests.test_redislink -*-
"""The shared state's connection to Redis, as built from one ``[shared]`` config: the
redis-py client (the timeout on connect and on every reply, no retries, TLS with the
certificate checked, a UNIX socket), its scripts and its thread pools (``Link``), and
this process's name among the instances. redisstate.py runs the calls.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.python.threadpool import ThreadPool

from .config import SharedConfig
from .sharedstate import KeyNames


class Expired(Exception):
    """A call waited in the thread pool's queue past its deadline: it was not run."""


@dataclass
class Link:
    """Everything made from one [shared] config: the client, its scripts, its threads."""

    config: SharedConfig
    client: Any
    scripts: dict[str, Any]
    names: KeyNames
    penalty_pool: ThreadPool
    sessions_pool: ThreadPool

    @property
    def timeout(self) -> float:
        return self.config.timeout

    @property
    def label(self) -> str:
        """The URL, its password masked: for log lines."""
        return str(self.config.url)


def redis_client(config: SharedConfig) -> Any:
    """A redis-py client for [shared]: the timeout on connect and on every reply, and no
    retries (a retry would be a second timeout in one login)."""
    url = config.url
    assert url is not None
    options: dict[str, Any] = {
        "db": url.db, "username": url.username or None,
        "password": url.password.reveal().decode("utf-8") if url.password else None,
        "socket_timeout": config.timeout, "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 0),  # retry_on_timeout is off by default (and deprecated)
        "health_check_interval": 0, "client_name": "imapproxy",
    }
    if url.scheme == "unix":
        options["unix_socket_path"] = url.socket_path
    else:
        options.update(host=url.host, port=url.port)
        if url.tls:
            options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                           ssl_ca_certs=str(config.ca_file) if config.ca_file else None)
    return redis.Redis(**options)


def instance_id() -> str:
    """This process among the instances: host, pid, and a random part (pids recur)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

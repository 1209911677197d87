"""redislink: the redis-py client made from [shared] (the calls themselves are tested
against a real Redis in tests/test_redisstate.py)."""

from __future__ import annotations

from pathlib import Path

from imapproxy.config import SharedConfig
from imapproxy.redislink import instance_id, redis_client
from imapproxy.redisurl import parse_redis_url


def config(url: str, **extra: object) -> SharedConfig:
    return SharedConfig(redis=url, url=parse_redis_url(url), timeout=0.3,  # type: ignore[arg-type]
                        **extra)


def test_a_login_never_waits_longer_than_the_timeout_and_never_twice() -> None:
    kwargs = redis_client(config("redis://:s3cret@127.0.0.1:6390/2")).connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
    assert kwargs["retry"]._retries == 0 and not kwargs.get("retry_on_timeout")
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 2)
    assert kwargs["password"] == "s3cret"


def test_tls_checks_the_certificate_and_the_name(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    client = redis_client(config("rediss://redis.example.org:6380/0", ca_file=ca))
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"]
    assert kwargs["ssl_ca_certs"] == str(ca)


def test_a_unix_socket() -> None:
    client = redis_client(config("unix:///run/redis/redis.sock?db=3"))
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["path"] == "/run/redis/redis.sock" and kwargs["db"] == 3


def test_instances_are_told_apart_even_with_the_same_pid() -> None:
    first, second = instance_id(), instance_id()
    assert first != second and first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0]

"""Redis URLs ([shared] redis): what is accepted, what is refused and why, and that no
message ever holds the password."""

from __future__ import annotations

import pytest

from imapproxy.credentials import Secret
from imapproxy.redisurl import RedisUrl, parse_redis_url, redact


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://127.0.0.1", RedisUrl("redis", "127.0.0.1")),
    ("redis://127.0.0.1:6390", RedisUrl("redis", "127.0.0.1", 6390)),
    ("redis://127.0.0.1:6390/", RedisUrl("redis", "127.0.0.1", 6390)),
    ("redis://Redis.Example.org:6390/7", RedisUrl("redis", "redis.example.org", 6390, db=7)),
    ("REDIS://h", RedisUrl("redis", "h")),
    ("redis://[2001:db8::1]:6379/1", RedisUrl("redis", "2001:db8::1", db=1)),
    ("redis://[::1]", RedisUrl("redis", "::1")),
    ("rediss://redis.example.org", RedisUrl("rediss", "redis.example.org")),
    ("redis://:s%3Acret@h/2", RedisUrl("redis", "h", db=2, password=Secret(b"s:cret"))),
    ("redis://proxy:pw@h", RedisUrl("redis", "h", username="proxy", password=Secret(b"pw"))),
    ("unix:///run/redis/redis.sock", RedisUrl("unix", socket_path="/run/redis/redis.sock")),
    ("unix:///run/redis.sock?db=3", RedisUrl("unix", socket_path="/run/redis.sock", db=3)),
    ("unix://:pw@/run/redis.sock", RedisUrl("unix", socket_path="/run/redis.sock",
                                            password=Secret(b"pw"))),
])
def test_accepted(text: str, expected: RedisUrl) -> None:
    url = parse_redis_url(text)
    assert url == expected
    assert url.tls == (expected.scheme == "rediss")


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("127.0.0.1:6379", "expected redis://"),
    ("http://h", "expected redis://"),
    ("redis://", "has no host"),
    ("redis://:6379", "has no host"),
    ("redis://h:0", "from 1 to 65535"),
    ("redis://h:65536", "from 1 to 65535"),
    ("redis://h:x", "from 1 to 65535"),
    ("redis://h/x", "database must be a number"),
    ("redis://h/1/2", "database must be a number"),
    ("redis://h/-1", "database must be a number"),
    ("redis://h?db=1", "no ?parameters"),
    ("redis://h/1?ssl=true", "no ?parameters"),
    ("redis://h#x", "fragment"),
    ("redis://h x", "whitespace"),
    ("redis://hé", "non-ASCII"),
    ("redis://h%zz", "% not followed"),
    ("redis://::1", "in brackets"),
    ("redis://[::1", "IPv6 addresses are written"),
    ("redis://[zz]", "not an IPv6 address"),
    ("redis://bad_host!", "not a host name"),
    ("redis://s3cret@h", "without a colon"),
    ("redis://user:@h", "empty password"),
    ("unix://run/redis.sock", "must be absolute"),
    ("unix:///r.sock?timeout=1", "one parameter, ?db=DB"),
    ("unix:///r.sock?db=x", "database must be a number"),
    ("unix:///" + "x" * 200, "longer than"),
])
def test_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="") as raised:
        parse_redis_url(text)
    assert message in str(raised.value), str(raised.value)


@pytest.mark.parametrize("text", ["redis://s3cret@h", "redis://:s3cret@h:0",
                                  "redis://u:s3cret@h/x", "redis://:s3cret@", "unix://:s3cret@r"])
def test_no_reason_holds_the_password(text: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_redis_url(text)
    assert "s3cret" not in str(raised.value)
    assert "s3cret" not in redact(text)


def test_str_masks_the_password() -> None:
    assert str(parse_redis_url("redis://:pw@h:1/2")) == "redis://:***@h:1/2"
    assert str(parse_redis_url("redis://u:pw@[::1]")) == "redis://u:***@[::1]:6379/0"
    assert str(parse_redis_url("unix://:pw@/r.sock?db=1")) == "unix://:***@/r.sock?db=1"
    assert str(parse_redis_url("rediss://h")) == "rediss://h:6379/0"
    assert "pw" not in repr(parse_redis_url("redis://:pw@h"))


def test_redact() -> None:
    assert redact("redis://:pw@h:1/2") == "redis://***@h:1/2"
    assert redact("redis://h:1/2") == "redis://h:1/2"
    assert redact("redis://h/a@b") == "redis://h/a@b"
    assert redact("nonsense") == "nonsense"

"""Tests for imapproxy.routecache: TTLs, stale answers and the LRU bound, on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from imapproxy.config import CacheConfig
from imapproxy.directory import Server
from imapproxy.ldapentry import Entry
from imapproxy.routecache import RouteCache

DN = "uid=alice,ou=people,dc=example,dc=org"


# --- RouteCache ------------------------------------------------------------------------

E = Entry(DN, (Server("s"),))


def cache(**kwargs: Any) -> tuple[Clock, RouteCache]:
    clock = Clock()
    return clock, RouteCache(CacheConfig(**kwargs), clock)


def test_cache_positive_ttl() -> None:
    clock, c = cache(positive_ttl=10, stale_ttl=100)
    c.put("alice", E)
    clock.advance(9.9)
    assert c.fresh("alice") is not None
    clock.advance(0.1)
    assert c.fresh("alice") is None
    assert c.stale("alice") == (E, 10.0)  # still there for an outage


def test_cache_stale_expires() -> None:
    clock, c = cache(positive_ttl=10, stale_ttl=100)
    c.put("alice", E)
    clock.advance(100)
    assert c.stale("alice") is None
    assert len(c) == 0


def test_cache_negative_ttl_and_never_stale() -> None:
    clock, c = cache(negative_ttl=5, stale_ttl=100)
    c.put("nobody", None, "no entry")
    cached = c.fresh("nobody")
    assert cached is not None and cached.entry is None and cached.reason == "no entry"
    assert c.stale("nobody") is None
    clock.advance(5)
    assert c.fresh("nobody") is None
    assert len(c) == 0


def test_cache_lru_bound() -> None:
    _, c = cache(max_entries=2)
    c.put("a", E)
    c.put("b", E)
    assert c.fresh("a") is not None  # a is now the most recently used
    c.put("c", E)
    assert c.fresh("b") is None
    assert c.fresh("a") is not None and c.fresh("c") is not None
    assert len(c) == 2


def test_cache_size_zero_disables() -> None:
    _, c = cache(max_entries=0)
    c.put("a", E)
    assert c.fresh("a") is None


def test_cache_clear() -> None:
    _, c = cache()
    c.put("a", E)
    c.clear()
    assert c.fresh("a") is None and c.stale("a") is None

"""Tests for imapproxy.crossprotocol: recognising an HTTP request line."""

from __future__ import annotations

import pytest

from imapproxy.crossprotocol import is_http_request_line


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"POST /login?x=1 HTTP/1.0", b"HEAD / HTTP/2", b"OPTIONS * HTTP/1.1",
    b"CONNECT mail.example.org:993 HTTP/1.1", b"GET /<script>x</script> HTTP/1.1 trailing",
])
def test_http_request_lines(line: bytes) -> None:
    assert is_http_request_line(line)


@pytest.mark.parametrize("line", [
    b"", b"a LOGIN alice secret", b"USER alice", b"PASS / HTTP/1.1", b"get / HTTP/1.1",
    b"GET / HTTP", b"GET  HTTP/1.1", b" GET / HTTP/1.1", b"a GET / HTTP/1.1",
    b"GETX / HTTP/1.1", b"GET / http/1.1",
])
def test_other_lines(line: bytes) -> None:
    assert not is_http_request_line(line)

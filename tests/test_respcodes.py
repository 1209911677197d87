"""Tests for imapproxy.respcodes: the bracketed response codes of IMAP and POP3 status lines."""

from __future__ import annotations

import pytest

from imapproxy.respcodes import split_code


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (b"[CAPABILITY IMAP4rev1 IDLE] Logged in", (b"CAPABILITY IMAP4rev1 IDLE", b"Logged in")),
        (b"[UNAVAILABLE]   down", (b"UNAVAILABLE", b"down")),
        (b"[SYS/TEMP] try later", (b"SYS/TEMP", b"try later")),  # POP3, RFC 3206
        (b"[ALERT]", (b"ALERT", b"")),
        (b"no code", (None, b"no code")),
        (b"[unterminated", (None, b"[unterminated")),
        (b"", (None, b"")),
    ],
)
def test_split_code(text: bytes, parsed: tuple[bytes | None, bytes]) -> None:
    assert split_code(text) == parsed

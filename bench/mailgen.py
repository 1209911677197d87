"""Deterministic test messages: a mixed-size mailbox for bulk FETCH, small ones for POP3."""

from __future__ import annotations

import base64
import math
import random

KB = 1024


def message(rng: random.Random, size: int, n: int) -> bytes:
    """One RFC 5322 message of about ``size`` bytes: headers plus a base64 body.

    Base64 lines never contain a space, so the client's end-of-FETCH marker
    (``CRLF tag SP``) cannot occur inside a body.
    """
    head = (
        f"From: Sender {n} <sender{n}@example.org>\r\n"
        f"To: bench@example.org\r\n"
        f"Subject: bench message {n} ({size} bytes)\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <bench-{n}-{size}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    raw_len = max(0, (size - len(head)) * 57 // 78)
    b64 = base64.encodebytes(rng.randbytes(raw_len)).replace(b"\n", b"\r\n")
    return head + b64


def mixed_mailbox(total_bytes: int, low: int = 10 * KB, high: int = 5 * KB * KB,
                  seed: int = 1) -> list[bytes]:
    """Messages with log-uniform sizes in [low, high] adding up to ``total_bytes``."""
    rng = random.Random(seed)
    out: list[bytes] = []
    total = 0
    high = max(low, min(high, total_bytes))
    while total < total_bytes:
        size = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        size = min(size, max(low, total_bytes - total))
        msg = message(rng, size, len(out) + 1)
        out.append(msg)
        total += len(msg)
    return out


def small_messages(count: int, size: int = 20 * KB, seed: int = 2) -> list[bytes]:
    """``count`` messages of about ``size`` bytes (POP3 mailboxes)."""
    rng = random.Random(seed)
    return [message(rng, size, i + 1) for i in range(count)]

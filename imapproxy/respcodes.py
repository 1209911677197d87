"""Bracketed response codes: RFC 5530 (IMAP) and RFC 2449 section 8 (POP3): pure bytes.

Both protocols may open the text of a status line with a code in square brackets:
IMAP's resp-text-code (RFC 3501 section 7.1, "* OK [CAPABILITY ...] ready",
"a NO [UNAVAILABLE] ...") and POP3's resp-code ("-ERR [SYS/TEMP] ..."). Each backend
dialogue (imapbackend.py, pop3backend.py) splits it off here and decides what it means.
"""

from __future__ import annotations

import re

# Lenient on purpose: whatever is between the brackets is the code, arguments included
# ("CAPABILITY IMAP4rev1 IDLE"), and the text after it may be empty.
_CODE = re.compile(rb"^\[([^\]]*)\]\s*(.*)$", re.DOTALL)


def split_code(text: bytes) -> tuple[bytes | None, bytes]:
    """Split ``[CODE args] text`` into (b"CODE args", text); (None, text) without a code."""
    match = _CODE.match(text)
    if match is None:
        return None, text
    return match.group(1), match.group(2)

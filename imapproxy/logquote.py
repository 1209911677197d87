# -*- test-case-name: tests.test_logquote -*-
"""Client-supplied text in text log lines, quoted so that it cannot forge a field or a line.

fail2ban and its kin read our text lines with patterns such as ``user=<([^>]*)>``
and ``client=(\\S+)``. A username holding a space and ``client=203.0.113.9``, or a
U+2028 and a whole fake line, must not fool them. So every client-supplied value
goes into a text line as ``<...>`` (Dovecot's way, ``user=<alice>``), with every
character that could end the field or the line, or hide something, written as
``\\xHH`` / ``\\uHHHH``: the C0 and C1 controls (CR, LF, NUL, U+0085, ...), the Unicode
line and paragraph separators (U+2028, U+2029) and the other format characters
(bidi overrides), and ``<``, ``>`` and ``\\`` themselves. Other text stays as it is,
so non-ASCII names remain readable. Long values are cut (a 60 KB name makes a line
of a few hundred bytes, not 60 KB), and the cut is marked.

JSON logs carry the raw value in their own field: JSON's own escaping is enough there.
Pure: no I/O.
"""

from __future__ import annotations

import unicodedata

#: Characters of a client-supplied value kept in a text line; the rest is cut off.
MAX_QUOTED = 64


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "<>\\" or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        if code < 0x100:
            return f"\\x{code:02x}"
        if code < 0x10000:
            return f"\\u{code:04x}"
        return f"\\U{code:08x}"
    return ch


def quoted(value: str | bytes | None, limit: int = MAX_QUOTED) -> str:
    """``<value>`` for a text log line: escaped, and cut after ``limit`` characters."""
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    cut = len(value) > limit
    text = "".join(_escape(ch) for ch in value[:limit])
    if cut:
        text += f"...({len(value)} chars)"
    return f"<{text}>"

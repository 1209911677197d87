# -*- test-case-name: tests.test_crossprotocol -*-
"""Requests of other protocols sent to the mail ports (cross-protocol attacks): sans-IO.

ALPACA (Brinkmann et al., USENIX Security 2021): a web page makes the browser send an
HTTP(S) request to the IMAP or POP3 port, hoping that the mail server echoes parts of
it (IMAP echoes the tag of a bad command) and that the browser renders the echo as the
HTTP response. The pre-login sessions close the connection, without a word, on a line
that is an HTTP request line. ALPN (clienttls.py) stops the TLS variant earlier for
browsers, which always offer it.
"""

from __future__ import annotations

import re

#: An HTTP/1.x request line (RFC 9112 section 3: method SP request-target SP HTTP-version),
#: methods in the case HTTP sends them. A browser's first line is always one of these
#: (a script's other methods are preceded by an OPTIONS preflight), and none of them is
#: an IMAP tag followed by a command or a POP3 command with its argument.
_HTTP_REQUEST_LINE = re.compile(
    rb"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")


def is_http_request_line(line: bytes) -> bool:
    """Whether ``line`` (without its CRLF) starts like an HTTP request."""
    return _HTTP_REQUEST_LINE.match(line) is not None

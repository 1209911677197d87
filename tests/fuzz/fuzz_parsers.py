"""Coverage-guided fuzzing of every sans-IO parser (atheris). Run by hand, not by pytest:

    pip install atheris
    python tests/fuzz/fuzz_parsers.py tests/fuzz/corpus -max_total_time=300 -max_len=4096

New inputs that reach new code are added to tests/fuzz/corpus/; keep the interesting ones
(minimise with ``-merge=1``), and tests/fuzz/test_fuzz_parsers.py replays them all on every
test run. A crash is written to ./crash-<sha1>: add it to the corpus once it is fixed.

One input drives one target: byte 0 picks the target and its options (``pick``), byte 1
seeds how the rest is cut into chunks (framing must not depend on how TCP splits the
stream). ``check`` is the property: a target may only raise the errors it documents, and
its buffers stay within their named limits however the bytes come.

To fuzz one target only (a new one, say), name it: ``FUZZ_TARGET=fuzz_proxy_header python
tests/fuzz/fuzz_parsers.py DIR ...``; inputs for the others then do nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import sys
from collections.abc import Callable

from imapproxy import imapbackend, imapwire, pop3, pop3backend, proxyprotocol, tracker
from imapproxy.actions import BackendLoggedIn, BackendLoginFailed, Close, Login
from imapproxy.config import Limits
from imapproxy.credentials import Credentials, Secret, decode_sasl_plain
from imapproxy.errors import ClientProtocolError, ProxyError
from imapproxy.imap import ImapSession
from imapproxy.imap import State as ImapState
from imapproxy.pop3 import Pop3Session
from imapproxy.pop3 import State as Pop3State

#: small limits so the fuzzer reaches them with short inputs
LIMITS = Limits(max_line=512, max_preauth_literal=256, max_bad_commands=50,
                max_failed_logins=50)
#: FUZZ_TARGET: run one target only (see the module docstring)
ONLY = os.environ.get("FUZZ_TARGET")


def chunks(data: bytes, seed: int) -> list[bytes]:
    """Cut ``data`` at places chosen by ``seed`` (0: whole; 1: byte by byte)."""
    if seed == 0 or not data:
        return [data]
    if seed == 1:
        return [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def fuzz_imap_session(pieces: list[bytes], option: int) -> None:
    session = ImapSession(tls_active=bool(option & 1), starttls_available=bool(option & 2),
                          plaintext_auth=bool(option & 4), limits=LIMITS)
    session.start()
    for piece in pieces:
        actions = session.receive_data(piece)
        for action in actions:
            if isinstance(action, Login):
                # Half the logins fail, half succeed: both paths get the rest.
                if len(piece) % 2:
                    session.login_failed(ProxyError())
                else:
                    session.login_succeeded(b"IMAP4rev1 IDLE")
            assert not isinstance(action, Close) or session.state is ImapState.CLOSED
        # Held back at most one command (plus the chunk that just came).
        assert session._wire.buffered <= session._wire.max_command + len(piece)
    session.timed_out()


def fuzz_pop3_session(pieces: list[bytes], option: int) -> None:
    session = Pop3Session(tls_active=bool(option & 1), starttls_available=bool(option & 2),
                          plaintext_auth=bool(option & 4), limits=LIMITS)
    session.start()
    for piece in pieces:
        for action in session.receive_data(piece):
            if isinstance(action, Login):
                if len(piece) % 2:
                    session.login_failed(ProxyError())
                else:
                    session.login_succeeded()
            assert not isinstance(action, Close) or session.state is Pop3State.CLOSED
        bound = max(LIMITS.max_line + 1, pop3.MAX_PIPELINED_DURING_LOGIN)
        assert session._lines.buffered <= bound + len(piece)
    session.timed_out()


def fuzz_imapwire(pieces: list[bytes], option: int) -> None:
    assembler = imapwire.CommandAssembler(LIMITS.max_line, LIMITS.max_preauth_literal)
    readers: tuple[Callable[[imapwire.ArgumentReader], object], ...] = (
        lambda r: (r.tag(), r.space(), r.atom(), r.space(), r.astring(), r.space(),
                   r.astring(), r.expect_end()),
        lambda r: (r.tag(), r.space(), r.atom(), r.space(), r.id_parameters()),
        lambda r: (r.tag(), r.space(), r.atom(), r.space(), r.nstring()),
    )
    try:
        for piece in pieces:
            assembler.feed(piece)
            while (event := assembler.next_event()) is not None:
                if isinstance(event, imapwire.CommandReceived):
                    assert len(event.segments) % 2 == 1
                    with contextlib.suppress(ClientProtocolError):
                        readers[option % len(readers)](imapwire.ArgumentReader(event.segments))
            assert assembler.buffered <= max(LIMITS.max_line + 1, assembler.max_command)
    except ClientProtocolError as e:
        assert e.fatal


def fuzz_sasl(pieces: list[bytes], option: int) -> None:
    try:
        credentials = decode_sasl_plain(b"".join(pieces))
    except (ClientProtocolError, ProxyError):
        return
    assert credentials.username and credentials.password.reveal()


def fuzz_tracker(pieces: list[bytes], option: int) -> None:
    t = tracker.SessionTracker()
    for i, piece in enumerate(pieces):
        if (option >> (i % 8)) & 1:
            t.from_server(piece)
        else:
            t.from_client(piece)
        assert len(t._c_head) <= tracker.HEAD and len(t._c_tail) <= tracker.TAIL
        assert len(t._s_head) <= tracker.HEAD and len(t._s_tail) <= tracker.TAIL
        assert t.in_flight >= 0


def fuzz_backends(pieces: list[bytes], option: int) -> None:
    credentials = Credentials("alice", Secret(b"pass word\"\\"))
    dialogue: imapbackend.ImapBackendLogin | pop3backend.Pop3BackendLogin
    if option & 1:
        dialogue = imapbackend.ImapBackendLogin(credentials, "alice", starttls=bool(option & 2))
    else:
        dialogue = pop3backend.Pop3BackendLogin(credentials, "alice", starttls=bool(option & 2))
    done = False
    for piece in pieces:
        if done:
            break
        for action in dialogue.receive_data(piece):
            if isinstance(action, BackendLoggedIn | BackendLoginFailed):
                done = True
            elif type(action).__name__ == "StartBackendTLS":
                dialogue.tls_started()


def fuzz_proxy_header(pieces: list[bytes], option: int) -> None:
    max_v2 = proxyprotocol.V2_FIXED + 64 if option & 1 else proxyprotocol.MAX_V2_HEADER
    data = b"".join(pieces)
    outcome = _read_proxy_header(pieces, max_v2)
    # However TCP cuts the bytes, the same header and the same bytes after it, or the
    # same refusal.
    assert outcome == _read_proxy_header([data], max_v2)
    if not isinstance(outcome, tuple) or not isinstance(outcome[0], proxyprotocol.ProxyHeader):
        return
    header, remaining = outcome
    assert data.endswith(remaining)
    assert len(data) - len(remaining) <= (proxyprotocol.V1_MAX if header.version == 1
                                          else max_v2)
    addresses = header.addresses
    if addresses is not None:
        # What we would send on to a backend reads back as the same addresses.
        (source, source_port), (destination, destination_port) = addresses
        sent = proxyprotocol.encode_v2((str(source), source_port),
                                       (str(destination), destination_port))
        again = proxyprotocol.HeaderReader().feed(sent)
        assert again is not proxyprotocol.NEED_DATA and again[0].addresses == addresses


def _read_proxy_header(pieces: list[bytes], max_v2: int) -> object:
    reader = proxyprotocol.HeaderReader(max_v2)
    for i, piece in enumerate(pieces):
        try:
            result = reader.feed(piece)
        except proxyprotocol.InvalidHeader as e:
            assert e.reason.isascii()
            return type(e), e.reason
        if result is not proxyprotocol.NEED_DATA:
            header, remaining = result
            return header, remaining + b"".join(pieces[i + 1:])
        assert reader.buffered < max(proxyprotocol.V1_MAX, max_v2)
    return proxyprotocol.NEED_DATA


Target = Callable[[list[bytes], int], None]

#: The first targets: byte 0 below FIRST_RANGE picks ``FIRST_TARGETS[byte % 6]``, with
#: option ``byte // 6``, as it always has, so every corpus file keeps feeding the target it
#: was made for (none of those files starts at 240 or above).
FIRST_TARGETS: tuple[Target, ...] = (
    fuzz_imap_session, fuzz_pop3_session, fuzz_imapwire, fuzz_sasl, fuzz_tracker,
    fuzz_backends,
)
FIRST_RANGE = 240
#: Targets added since take a range of byte 0 of their own (option: the offset in it), so
#: a new one never moves the inputs of the others. 248 to 255 are free for the next.
LATER_TARGETS: dict[range, Target] = {
    range(240, 248): fuzz_proxy_header,
}
TARGETS: tuple[Target, ...] = FIRST_TARGETS + tuple(LATER_TARGETS.values())


def pick(selector: int) -> tuple[Target, int] | None:
    """The target byte 0 picks, and its option; None for a byte no target has yet."""
    if selector < FIRST_RANGE:
        return FIRST_TARGETS[selector % len(FIRST_TARGETS)], selector // len(FIRST_TARGETS)
    for selectors, target in LATER_TARGETS.items():
        if selector in selectors:
            return target, selector - selectors.start
    return None


def check(data: bytes) -> None:
    """The property, for one input: see the module docstring."""
    if len(data) < 2:
        return
    selector, seed, body = data[0], data[1], data[2:]
    picked = pick(selector)
    if picked is None:
        return
    target, option = picked
    if ONLY is not None and target.__name__ != ONLY:
        return
    target(chunks(body, seed), option)


def main() -> None:
    import atheris  # only the fuzz run needs it

    atheris.instrument_all()
    # libFuzzer runs argv[0] through the shell for -merge=1 and -fork: this file is no
    # executable, so it is run by this interpreter.
    command = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"
    atheris.Setup([command, *sys.argv[1:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

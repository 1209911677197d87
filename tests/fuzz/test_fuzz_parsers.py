"""Replays the fuzz corpus through every sans-IO parser, and runs the same property on
hypothesis-made inputs (tests/fuzz/fuzz_parsers.py, issue 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_parsers import FIRST_RANGE, FIRST_TARGETS, TARGETS, check, chunks, pick
from hypothesis import given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted(CORPUS.iterdir())


def test_the_corpus_is_there_and_covers_every_target() -> None:
    assert len(FILES) >= 100
    picked = {pick(f.read_bytes()[0]) for f in FILES if f.stat().st_size}
    assert {p[0] for p in picked if p is not None} == set(TARGETS)


def test_a_new_target_moves_no_corpus_file_to_another() -> None:
    """Byte 0 below 240 picks what it picked when there were six targets."""
    for selector in range(FIRST_RANGE):
        assert pick(selector) == (FIRST_TARGETS[selector % 6], selector // 6)
    assert len(FIRST_TARGETS) == 6


@pytest.mark.parametrize("batch", range(8))
def test_corpus_replays_cleanly(batch: int) -> None:
    for path in FILES[batch::8]:
        check(path.read_bytes())


def test_chunks_cover_the_input() -> None:
    data = bytes(range(200))
    for seed in range(40):
        assert b"".join(chunks(data, seed)) == data
    assert chunks(data, 1) == [bytes([b]) for b in data]
    assert chunks(b"", 9) == [b""]


_wire_bytes = st.lists(st.sampled_from([b"a1 ", b"LOGIN ", b"{5}\r\n", b"{3+}\r\n", b"\r\n",
                                        b'"', b"\\", b"\x00", b"\xff", b"USER ", b"PASS ",
                                        b"AUTH PLAIN ", b"* OK ", b"+ ", b"DONE\r\n",
                                        b"IDLE\r\n", b"-ERR ", b"+OK ", b"PROXY ", b"TCP4 ",
                                        b"UNKNOWN", b"192.0.2.1 ", b"\r\n\r\n\x00\r\nQUIT\n",
                                        b"\x21\x11\x00\x0c", b"\x21\x31\x00\xd8"])
                       | st.binary(max_size=16), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(target=st.integers(0, 255), seed=st.integers(0, 255), body=_wire_bytes)
def test_any_bytes_only_documented_errors_and_bounded_buffers(target: int, seed: int,
                                                              body: bytes) -> None:
    check(bytes([target, seed]) + body)

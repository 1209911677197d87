"""Replays the fuzz corpus through every sans-IO parser, and runs the same property on
hypothesis-made inputs (tests/fuzz/fuzz_parsers.py, issue 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_parsers import TARGETS, check, chunks
from hypothesis import given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted(CORPUS.iterdir())


def test_the_corpus_is_there_and_covers_every_target() -> None:
    assert len(FILES) >= 100
    assert {f.read_bytes()[0] % len(TARGETS) for f in FILES if f.stat().st_size} == set(
        range(len(TARGETS)))


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
                                        b"IDLE\r\n", b"-ERR ", b"+OK "])
                       | st.binary(max_size=16), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(target=st.integers(0, 255), seed=st.integers(0, 255), body=_wire_bytes)
def test_any_bytes_only_documented_errors_and_bounded_buffers(target: int, seed: int,
                                                              body: bytes) -> None:
    check(bytes([target, seed]) + body)

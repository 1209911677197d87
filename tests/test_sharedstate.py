"""The shared state's pure part (sharedstate.py): key names, what each script is asked,
what its answers mean, the session tally and whether to ask Redis at all.

The scripts themselves run in a real Redis in tests/test_redisstate.py.
"""

from __future__ import annotations

import pytest

from imapproxy import sharedstate
from imapproxy.config import Limits
from imapproxy.penalty import MAX_WAITING, MAX_WAITING_USER, Refused
from imapproxy.sharedscripts import SCRIPTS
from imapproxy.sharedstate import (
    Availability,
    BadAnswer,
    Beat,
    Claimed,
    KeyNames,
    PenaltySettings,
    Verdict,
)

NAMES = KeyNames("mx:")
UKEY = bytes(range(16))
SETTINGS = PenaltySettings(2.0, 15.0, 900.0, 86400.0)


def test_key_names_hold_no_name_only_keyed_hashes() -> None:
    assert NAMES.address("192.0.2.7") == ("mx:a:192.0.2.7", "mx:a:192.0.2.7:t")
    assert NAMES.user(UKEY) == ("mx:u:" + UKEY.hex(), "mx:u:" + UKEY.hex() + ":t")
    assert NAMES.sessions(UKEY, "2001:db8::/64") == f"mx:s:{UKEY.hex()}:2001:db8::/64"
    assert NAMES.instances == "mx:instances"
    assert NAMES.instance_keys("h:1:ab") == "mx:ik:h:1:ab"
    assert NAMES.hashing_key == "mx:key"


def test_settings_come_from_limits() -> None:
    limits = Limits(login_delay=1, login_delay_max=4, login_failure_memory=60,
                    known_address_memory=3600)
    assert PenaltySettings.from_limits(limits) == PenaltySettings(1, 4, 60, 3600)


def test_enter_and_finish_calls() -> None:
    call = sharedstate.enter(NAMES, "192.0.2.7", UKEY, "tok", SETTINGS)
    assert call.script == "enter" and call.script in SCRIPTS
    assert call.keys == (*NAMES.address("192.0.2.7"), *NAMES.user(UKEY))
    assert call.args == ("192.0.2.7", "tok", "", 2.0, 15.0, 900.0, 86400.0, MAX_WAITING,
                         MAX_WAITING_USER, sharedstate.LEASE)
    timed = sharedstate.enter(NAMES, "192.0.2.7", UKEY, "tok", SETTINGS, now=1000.5)
    assert timed.args[2] == "1000.5"
    done = sharedstate.finish(NAMES, "192.0.2.7", UKEY, "tok", "failure", b"\xab\xcd",
                              SETTINGS, now=7.0)
    assert done.keys == call.keys
    assert done.args[:6] == ("192.0.2.7", "tok", "failure", UKEY.hex(), "abcd", "7.0")
    assert "abcd" not in repr(done), "fingerprints stay out of reprs"
    start = sharedstate.start(NAMES, "192.0.2.7", UKEY, "tok", now=3.0)
    assert start.keys == call.keys
    assert start.args == ("tok", "3.0", sharedstate.LEASE)
    assert sharedstate.leave(NAMES, "192.0.2.7", UKEY, "tok").keys == (
        NAMES.address("192.0.2.7")[1], NAMES.user(UKEY)[1])


def test_session_calls() -> None:
    claim = sharedstate.claim(NAMES, "i1", UKEY, "192.0.2.7", 20)
    assert claim.keys == (NAMES.sessions(UKEY, "192.0.2.7"), "mx:instances", "mx:ik:i1")
    assert claim.args == ("i1", 20, "", sharedstate.INSTANCE_TTL)
    release = sharedstate.release(NAMES, "i1", UKEY, "192.0.2.7")
    assert release.keys == (NAMES.sessions(UKEY, "192.0.2.7"), "mx:ik:i1")
    beat = sharedstate.heartbeat(NAMES, "i1", b"\x01\x02")
    assert beat.keys == ("mx:instances", "mx:key") and beat.args[-1] == "0102"
    assert sharedstate.heartbeat(NAMES, "i1", None).args[-1] == ""
    assert sharedstate.goodbye(NAMES, "i1").keys == ("mx:instances", "mx:ik:i1")


def test_resync_is_written_in_chunks_the_first_clearing() -> None:
    assert [c.args for c in sharedstate.resync(NAMES, "i1", [], now=5.0)] == [
        ("i1", "5.0", 1)]
    counts = [(UKEY, f"10.0.{i // 256}.{i % 256}", 1 + i % 3)
              for i in range(sharedstate.RESYNC_CHUNK + 1)]
    calls = sharedstate.resync(NAMES, "i1", counts)
    assert len(calls) == 2
    assert calls[0].args[:3] == ("i1", "", 1) and calls[1].args[:3] == ("i1", "", 0)
    assert len(calls[0].args) == 3 + 2 * sharedstate.RESYNC_CHUNK
    assert calls[1].args[3:] == (NAMES.sessions(UKEY, counts[-1][1]), counts[-1][2])


@pytest.mark.parametrize(("answer", "expected"), [
    ([b"ok", 0, 0, 0, b"0.000000", 0], Verdict(False, 0, 0, 0.0, 0)),
    ([b"ok", 1, 3, 2, b"3.500000", 2], Verdict(True, 3, 2, 3.5, 2)),
    ([b"ok", 0, 1, 0, b"-0.000001", 1], Verdict(False, 1, 0, 0.0, 1)),
    ([b"refused", b"address"], Refused("too many login attempts waiting for this address")),
    ([b"refused", b"user"], Refused("too many login attempts waiting for this user")),
])
def test_parse_enter(answer: list[object], expected: object) -> None:
    assert sharedstate.parse_enter(answer) == expected


@pytest.mark.parametrize("answer", [None, [], [b"ok"], [b"what", 1], [b"refused", b"x"],
                                    [b"ok", 0, 0, 0, b"soon", 0], [b"ok", 0, 0, 0, 1.5, 0],
                                    b"ok"])
def test_parse_enter_refuses_what_the_script_never_says(answer: object) -> None:
    with pytest.raises(BadAnswer):
        sharedstate.parse_enter(answer)


def test_parse_start() -> None:
    assert sharedstate.parse_start(b"0.000000") == 0.0
    assert sharedstate.parse_start(b"1.250000") == 1.25
    assert sharedstate.parse_start(b"-0.000001") == 0.0
    assert sharedstate.parse_start(b"busy") == sharedstate.BUSY
    for bad in (b"soon", None, [b"1"]):
        with pytest.raises(BadAnswer):
            sharedstate.parse_start(bad)


def test_parse_claim_and_heartbeat() -> None:
    assert sharedstate.parse_claim([1, 3, 1]) == Claimed(True, 3, True)
    assert sharedstate.parse_claim([0, 20, 0]) == Claimed(False, 20, False)
    assert sharedstate.parse_heartbeat([1, b""]) == Beat(True, None)
    assert sharedstate.parse_heartbeat([0, ("ab" * 32).encode()]) == Beat(False, b"\xab" * 32)
    for bad in ([1, 2], None, [b"x", 1, 1]):
        with pytest.raises(BadAnswer):
            sharedstate.parse_claim(bad)
    for bad in ([1, b"zz"], [1, b"abcd"], [1], None):
        with pytest.raises(BadAnswer):
            sharedstate.parse_heartbeat(bad)


def test_key_from_file_is_a_fixed_size_key() -> None:
    key = sharedstate.key_from_file(b"k" * 64)
    assert len(key) == 32 and key == sharedstate.key_from_file(b"k" * 64)
    assert key != sharedstate.key_from_file(b"k" * 65)


# -- the session tally --------------------------------------------------------------------


def test_availability_logs_each_transition_once_and_probes_one_at_a_time() -> None:
    a = Availability(retry_after=2.0)
    assert a.may_ask(100.0) and a.up
    assert a.failed(100.0, "Connection refused") is True
    assert a.failed(100.1, "timeout") is False, "said once"
    assert a.reason == "Connection refused"
    assert not a.may_ask(101.0), "counting locally, without asking"
    assert a.may_ask(102.1), "one tries again"
    assert not a.may_ask(102.2), "the others do not, meanwhile"
    assert a.failed(102.4, "still refused") is False
    assert not a.may_ask(103.0) and a.may_ask(104.5)
    assert a.answered() is True
    assert a.answered() is False
    assert a.may_ask(104.6) and a.may_ask(104.6)

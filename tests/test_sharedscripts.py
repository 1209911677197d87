"""sharedscripts: the Lua texts Redis runs (what they do is tested against a real Redis
in tests/test_redisstate.py and tests/integration/test_shared_state.py)."""

from __future__ import annotations

import re

from imapproxy import sharedscripts
from imapproxy.sharedscripts import SCRIPTS


def test_every_step_has_its_script_and_every_script_returns() -> None:
    assert set(SCRIPTS) == {"enter", "start", "finish", "leave", "claim", "release",
                            "heartbeat", "resync", "goodbye"}
    for name, text in SCRIPTS.items():
        assert re.search(r"^\s*return\b", text, re.M), name


def test_the_janitor_is_bounded_in_the_heartbeat() -> None:
    # A heartbeat clears at most this much of instances gone silent: a long script
    # blocks Redis for everyone.
    text = SCRIPTS["heartbeat"]
    assert f"'LIMIT', 0, {sharedscripts.JANITOR_INSTANCES}" in text
    assert f"'SPOP', set, {sharedscripts.JANITOR_KEYS}" in text


def test_scripts_read_only_the_keys_and_arguments_they_are_given() -> None:
    # Lua in Redis: no globals besides KEYS, ARGV and redis (a script that writes a
    # global is refused), so every helper is local.
    for name, text in SCRIPTS.items():
        for line in text.splitlines():
            assert not re.match(r"^function\b", line.strip()), (name, line)

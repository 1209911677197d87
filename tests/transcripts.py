"""Transcript machinery shared by the pre-login session tests (IMAP and POP3).

A transcript is a list of steps: client bytes, or what the adapter reports back
(login succeeded, login failed, timer fired). Each is run twice, whole and one
byte at a time, and both runs must give the same actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imapproxy.actions import SendToClient
from imapproxy.errors import ProxyError


@dataclass(frozen=True)
class LoginOk:
    """The adapter reports a successful backend login with these capabilities."""

    capabilities: bytes | None = b"IMAP4rev1 IDLE"


@dataclass(frozen=True)
class LoginFails:
    error: ProxyError


@dataclass(frozen=True)
class TimesOut:
    pass


Step = bytes | LoginOk | LoginFails | TimesOut


def merged(actions: list[Any]) -> list[Any]:
    """Join consecutive SendToClient actions: only the byte stream matters, not its chunks."""
    out: list[Any] = []
    for action in actions:
        if isinstance(action, SendToClient) and out and isinstance(out[-1], SendToClient):
            out[-1] = SendToClient(out[-1].data + action.data)
        else:
            out.append(action)
    return out


def run(session: Any, steps: list[Step], *, split: bool, greet: bool = False) -> list[Any]:
    """Feed the steps to a session (whole, or one byte at a time); its merged actions."""
    actions: list[Any] = list(session.start()) if greet else []
    for step in steps:
        if isinstance(step, bytes):
            chunks = [step[i : i + 1] for i in range(len(step))] if split else [step]
            for chunk in chunks:
                actions += session.receive_data(chunk)
        elif isinstance(step, LoginOk):
            actions += session.login_succeeded(step.capabilities)
        elif isinstance(step, LoginFails):
            actions += session.login_failed(step.error)
        else:
            actions += session.timed_out()
    return merged(actions)

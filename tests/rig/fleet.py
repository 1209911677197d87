"""A fleet of phones holding IMAP IDLE, that come back by themselves when a session ends.

Each client logs in, SELECTs INBOX, IDLEs and follows ``* n EXISTS`` as a phone does;
when the server says BYE or the connection ends (a drain, a kill), it reconnects after
a short random pause (phones do not all come back in the same millisecond; 0 to
``jitter`` seconds) and starts over, with a doubling pause while it fails. What the
fleet remembers per client is what a rolling restart is judged on: the highest message
count it has seen (in IDLE or at SELECT), whether it is in IDLE now, since when, and
how often it came back.

It runs in a thread with its own asyncio loop, so a test or the benchmark drives the
servers around it with plain blocking calls; its figures are read without locking
(each is one attribute written by the loop).
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Seconds one step of a session (connect, a command's answer) may take before the
#: client gives up on that connection and starts over.
STEP_TIMEOUT = 30.0
#: The longest pause between two failed attempts.
MAX_BACKOFF = 2.0

_EXISTS = re.compile(rb"^\* (\d+) EXISTS\r?\n$")


@dataclass
class Phone:
    """One client and what it has seen."""

    user: str
    password: str
    #: the local address it connects from (the load balancer passes it on)
    source: str = "127.0.0.1"
    #: the highest message count seen, as EXISTS in IDLE or in SELECT's answer
    seen: int = -1
    in_idle: bool = False
    #: time.monotonic() it last got into IDLE (0: never)
    idle_since: float = 0.0
    #: sessions it has opened to IDLE
    sessions: int = 0
    #: connections that ended (BYE or EOF) while it idled
    dropped: int = 0
    #: attempts that failed before reaching IDLE (refused, BYE at login, reset)
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class Fleet:
    """``Phone``s that connect to ``host:port`` and hold IDLE until ``stop()``."""

    def __init__(self, host: str, port: int, phones: Iterable[Phone], *,
                 jitter: float = 1.0, open_concurrency: int = 64,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        #: implicit TLS (RFC 8314) with this context; None: plaintext
        self.tls = tls
        self.phones = list(phones)
        self.jitter = jitter
        self.open_concurrency = open_concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- what the test or the bench reads ------------------------------------------------

    def idling(self) -> int:
        return sum(1 for p in self.phones if p.in_idle)

    def all_idle_since(self, since: float) -> bool:
        """Every phone is in IDLE, in a session it opened after ``since``."""
        return all(p.in_idle and p.idle_since > since for p in self.phones)

    def missed(self, expected: dict[str, int]) -> int:
        """Messages the phones have not seen: per phone, its user's count less what it saw."""
        return sum(max(0, expected[p.user] - max(p.seen, 0)) for p in self.phones)

    # -- running -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> float:
        """Open every session; returns the seconds until all were in IDLE."""
        started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()
        self._started.wait(10)
        self.wait(lambda: self.idling() == len(self.phones), "every phone in IDLE", timeout)
        return time.monotonic() - started

    def wait(self, check: Callable[[], object], what: str, timeout: float) -> float:
        """Wait until ``check()`` is true; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while not check():
            if time.monotonic() > deadline:
                errors = [e for p in self.phones for e in p.errors[-1:]][:5]
                raise AssertionError(f"timed out waiting for {what}: {self.idling()} of "
                                     f"{len(self.phones)} in IDLE; last errors {errors}")
            time.sleep(0.02)
        return time.monotonic() - started

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._started.set()
        opening = asyncio.Semaphore(self.open_concurrency)
        tasks = [asyncio.create_task(self._phone(p, opening)) for p in self.phones]
        await self._stopping.wait()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _phone(self, phone: Phone, opening: asyncio.Semaphore) -> None:
        backoff = 0.0
        first = True
        while True:
            try:
                if first:  # the first sessions open at a pace; later ones come back at once
                    async with opening:
                        reader, writer = await self._open(phone)
                else:
                    reader, writer = await self._open(phone)
            except (OSError, EOFError, ConnectionError, TimeoutError, _Refused) as exc:
                phone.failed += 1
                phone.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                del phone.errors[:-5]
                backoff = min(MAX_BACKOFF, max(0.1, backoff * 2))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                continue
            first = False
            backoff = 0.0
            try:
                await self._hold(phone, reader)
            finally:
                phone.in_idle = False
                self._writers.discard(writer)
                writer.transport.abort()
            phone.dropped += 1
            await asyncio.sleep(random.uniform(0, self.jitter))

    async def _open(self, phone: Phone) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, limit=1 << 16, local_addr=(phone.source, 0), ssl=self.tls,
            server_hostname=self.host if self.tls else None), STEP_TIMEOUT)
        self._writers.add(writer)
        try:
            greeting = await _line(reader)
            if not greeting.startswith(b"* OK"):
                raise _Refused(greeting)
            password = phone.password.encode()
            writer.write(b"a LOGIN " + phone.user.encode() + b" {%d+}\r\n" % len(password)
                         + password + b"\r\nb SELECT INBOX\r\n")
            await _tagged(reader, b"a", phone)
            await _tagged(reader, b"b", phone)
            writer.write(b"c IDLE\r\n")
            if not (await _line(reader)).startswith(b"+"):
                raise _Refused(b"IDLE refused")
        except BaseException:
            self._writers.discard(writer)
            writer.transport.abort()
            raise
        phone.in_idle = True
        phone.idle_since = time.monotonic()
        phone.sessions += 1
        return reader, writer

    async def _hold(self, phone: Phone, reader: asyncio.StreamReader) -> None:
        """Follow the IDLE session until it ends (BYE, EOF or a reset)."""
        try:
            while line := await reader.readline():
                if match := _EXISTS.match(line):
                    phone.seen = max(phone.seen, int(match.group(1)))
                elif line.startswith(b"* BYE"):
                    return
        except (OSError, ConnectionError):
            return


class _Refused(Exception):
    """The server answered, but not with what a session needs (BYE, NO)."""


async def _line(reader: asyncio.StreamReader) -> bytes:
    line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
    if not line:
        raise EOFError("connection closed")
    return line


async def _tagged(reader: asyncio.StreamReader, tag: bytes, phone: Phone) -> None:
    while True:
        line = await _line(reader)
        if match := _EXISTS.match(line):
            phone.seen = max(phone.seen, int(match.group(1)))
        elif line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise _Refused(line)
            return


class Mailman:
    """Delivers a message to a random user every ``interval`` seconds while running (in a
    thread; a context manager, or start() and stop()), and counts what each user got:
    what the phones must have seen (``Fleet.missed(mailman.expected())``)."""

    def __init__(self, store: Any, users: list[str], interval: float = 0.05) -> None:
        #: a rig Dovecot (tests/rig/dovecot.py): deliver(user, message)
        self.store, self.users, self.interval = store, users, interval
        self.delivered: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def deliver(self, user: str) -> None:
        """One message to ``user`` now (thread-safe)."""
        self.store.deliver(user, b"From: a@example.org\r\nSubject: while restarting\r\n\r\n"
                           + str(self.delivered[user]).encode() + b"\r\n")
        with self._lock:
            self.delivered[user] += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.deliver(random.choice(self.users))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def __enter__(self) -> Mailman:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def expected(self) -> dict[str, int]:
        """Each user's messages delivered so far."""
        return {user: self.delivered[user] for user in self.users}

"""Load-generating clients for the benchmark; runs as its own process.

Usage: ``python bench/client.py SPEC.json`` prints one JSON result line, except
``kind = "idle"``, which talks over stdin/stdout (see :func:`idle_main`).

Standard library only (uvloop is used when installed), so the client costs the
same for every path measured and never imports the proxy or the test rig. The
hot loops are kept small on purpose: on a 2-core machine every cycle the client
spends is taken from the server under test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

# Tags chosen so that they cannot occur at a line start inside our own
# generated message bodies (base64 lines carry no space).
BULK_TAG = b"zQ9f"
#: No single read of a healthy run waits this long; a hung peer fails the run.
IO_TIMEOUT = 60.0
EXISTS_RE = re.compile(rb"^\* (\d+) EXISTS\r?$")


def _tls_context(spec: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.check_hostname = False  # the test CA issues for 127.0.0.1; the chain is still verified
    return ctx


def _connect(host: str, port: int, tls: bool, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        assert ctx is not None
        sock = ctx.wrap_socket(sock, server_hostname=host)
    return sock


class BioTLS:
    """TLS over a blocking socket through ``ssl.SSLObject`` and memory BIOs.

    ``SSLSocket.recv_into`` returns at most one TLS record per call, through
    several Python-level frames; with peers that write 1 KiB records (Perdition)
    that made the client the bottleneck. Here a record costs one C call, and the
    socket is read 256 KiB at a time.
    """

    RAW = 1 << 18

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, host: str) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.raw.sendall(data)

    def _fill(self) -> None:
        data = self.raw.recv(self.RAW)
        if not data:
            raise ConnectionError("EOF in TLS")
        self.incoming.write(data)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def close(self) -> None:
        self.raw.close()


class LineSock:
    """A blocking socket with a small line reader, for the control dialogue."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 2], self.buf[i + 2 :]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"EOF after {self.buf[:200]!r}")
            self.buf += data

    def command(self, tag: bytes, line: bytes) -> list[bytes]:
        """Send ``tag line`` and read up to the tagged reply; raise unless it is OK."""
        self.sock.sendall(tag + b" " + line + b"\r\n")
        out = []
        while True:
            resp = self.readline()
            out.append(resp)
            if resp.startswith(tag + b" "):
                if resp[len(tag) + 1 : len(tag) + 3] != b"OK":
                    raise RuntimeError(f"{line.split()[0]!r} failed: {resp!r}")
                return out


def _login_line(user: str, password: str) -> bytes:
    return f'LOGIN "{user}" "{password}"'.encode()


# --- bulk FETCH ---------------------------------------------------------------


def bulk(spec: dict[str, Any]) -> dict[str, Any]:
    """LOGIN, SELECT, UID FETCH 1:* BODY.PEEK[]; time the FETCH alone."""
    t0 = time.perf_counter()
    raw = _connect(spec["host"], spec["port"], False, None)
    sock: Any = BioTLS(raw, _tls_context(spec), spec["host"]) if spec["tls"] else raw
    ls = LineSock(sock)
    ls.readline()
    ls.command(b"a1", _login_line(spec["user"], spec["password"]))
    sel = ls.command(b"a2", b"SELECT INBOX")
    t_ready = time.perf_counter()
    messages = 0
    for line in sel:
        m = EXISTS_RE.match(line.rstrip(b"\n"))
        if m:
            messages = int(m.group(1))
    assert not ls.buf, "unexpected data after SELECT"
    tag = BULK_TAG
    marker = b"\r\n" + tag + b" "
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    tail = b""
    calls = 0
    cpu0 = time.process_time()
    t1 = time.perf_counter()
    sock.sendall(tag + b" UID FETCH 1:* BODY.PEEK[]\r\n")
    if spec["tls"]:
        total, calls, last = _fetch_tls(sock, buf, marker)
    else:
        recv_into = sock.recv_into
        while True:
            n = recv_into(view)
            if not n:
                raise ConnectionError("EOF during FETCH")
            total += n
            calls += 1
            tail = (tail + bytes(buf[max(0, n - 256) : n]))[-512:]
            if tail.endswith(b"\r\n"):
                i = tail.rfind(marker)
                if i >= 0 and b"\r\n" not in tail[i + 2 : -2]:
                    last = tail[i + 2 :]
                    break
    t2 = time.perf_counter()
    client_cpu = time.process_time() - cpu0
    if not last.startswith(tag + b" OK"):
        raise RuntimeError(f"FETCH failed: {last!r}")
    cipher = f"{sock.version()} {sock.cipher()[0]}" if spec["tls"] else None  # type: ignore[attr-defined]
    with contextlib.suppress(ConnectionError, RuntimeError):
        ls.command(b"a4", b"LOGOUT")
    sock.close()
    secs = t2 - t1
    return {
        "bytes": total,
        "seconds": secs,
        "mb_per_s": total / 1e6 / secs,
        "messages": messages,
        "login_select_s": t_ready - t0,
        "cipher": cipher,
        "recv_calls": calls,
        # If this is close to "seconds", the client was the bottleneck.
        "client_cpu_s": client_cpu,
    }


def _fetch_tls(sock: BioTLS, buf: bytearray, marker: bytes) -> tuple[int, int, bytes]:
    """Read the FETCH reply record by record until the tagged line; (bytes, records, line).

    Records are decrypted into ``buf`` one after another, so the stream's last
    bytes are contiguous and the end is checked only when the input is drained.
    """
    view = memoryview(buf)
    read = sock.obj.read
    fill = sock._fill
    size = len(buf)
    keep = 512
    off = keep
    total = calls = 0
    while True:
        try:
            n = read(65536, view[off:])
        except ssl.SSLWantReadError:
            tail = bytes(buf[off - keep : off])
            if tail.endswith(b"\r\n"):
                i = tail.rfind(marker)
                if i >= 0 and b"\r\n" not in tail[i + 2 : -2]:
                    return total, calls, tail[i + 2 :]
            fill()
            continue
        if not n:
            raise ConnectionError("EOF during FETCH")
        total += n
        calls += 1
        off += n
        if off > size - 65536:
            buf[:keep] = buf[off - keep : off]
            off = keep


# --- NOOP round trips ---------------------------------------------------------


def noop(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` NOOPs in one session, one at a time; per-round-trip times."""
    ctx = _tls_context(spec) if spec["tls"] else None
    sock = _connect(spec["host"], spec["port"], spec["tls"], ctx)
    ls = LineSock(sock)
    ls.readline()
    ls.command(b"a1", _login_line(spec["user"], spec["password"]))
    ls.command(b"a2", b"SELECT INBOX")
    for _ in range(20):  # warm-up
        ls.command(b"w", b"NOOP")
    samples = []
    clock = time.perf_counter_ns
    send = sock.sendall
    recv = sock.recv
    cmd = b"n NOOP\r\n"
    for _ in range(spec["count"]):
        t = clock()
        send(cmd)
        data = recv(4096)
        while not data.endswith(b"\r\n") or b"n OK" not in data:
            more = recv(4096)
            if not more:
                raise ConnectionError("EOF during NOOP")
            data += more
        samples.append(clock() - t)
    ls.command(b"a3", b"LOGOUT")
    sock.close()
    samples.sort()
    ms = [s / 1e6 for s in samples]
    return {
        "count": len(ms),
        "median_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
    }


# --- logins -----------------------------------------------------------------


def _login_once_blocking(entry: list[Any]) -> None:
    host, port, user, password = entry
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        ls = LineSock(sock)
        if not ls.readline().startswith(b"* OK"):
            raise RuntimeError("bad greeting")
        ls.command(b"a", _login_line(user, password))
        ls.command(b"b", b"LOGOUT")
    finally:
        sock.close()


async def _read_tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("EOF")
        if line.startswith(tag):
            return line


async def _login_once_async(entry: list[Any]) -> None:
    host, port, user, password = entry
    reader, writer = await asyncio.open_connection(host, port)
    try:
        greet = await reader.readline()
        if not greet.startswith(b"* OK"):
            raise RuntimeError(f"bad greeting {greet!r}")
        writer.write(b"a " + _login_line(user, password) + b"\r\n")
        resp = await _read_tagged(reader, b"a ")
        if not resp.startswith(b"a OK"):
            raise RuntimeError(f"LOGIN failed: {resp!r}")
        writer.write(b"b LOGOUT\r\n")
        await _read_tagged(reader, b"b ")
    finally:
        writer.close()


def _run_entries(entries: list[list[Any]], concurrency: int, once_blocking: Any,
                 once_async: Any) -> dict[str, Any]:
    """Run each entry once, ``concurrency`` at a time; count, rate and errors."""
    errors: list[str] = []
    lat: list[float] = []
    if concurrency == 1:
        t0 = time.perf_counter()
        for e in entries:
            t = time.perf_counter()
            try:
                once_blocking(e)
                lat.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(repr(exc))
        secs = time.perf_counter() - t0
    else:
        async def main() -> float:
            it: Iterator[list[Any]] = iter(entries)

            async def worker() -> None:
                for e in it:
                    t = time.perf_counter()
                    try:
                        await asyncio.wait_for(once_async(e), IO_TIMEOUT)
                        lat.append(time.perf_counter() - t)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(repr(exc))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

        secs = _arun(main())
    ok = len(lat)
    lat.sort()
    return {
        "count": ok,
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": secs,
        "per_s": ok / secs if secs else 0.0,
        "latency_median_ms": statistics.median(lat) * 1e3 if lat else None,
        "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None,
        "concurrency": concurrency,
    }


def logins(spec: dict[str, Any]) -> dict[str, Any]:
    return _run_entries(spec["entries"], spec["concurrency"], _login_once_blocking,
                        _login_once_async)


# --- POP3 -------------------------------------------------------------------


async def _pop3_read_ok(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"POP3 error: {line!r}")
    return line


async def _pop3_session_async(entry: list[Any]) -> None:
    host, port, user, password = entry
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _pop3_read_ok(reader)
        writer.write(f"USER {user}\r\n".encode())
        await _pop3_read_ok(reader)
        writer.write(f"PASS {password}\r\n".encode())
        await _pop3_read_ok(reader)
        writer.write(b"STAT\r\n")
        count = int((await _pop3_read_ok(reader)).split()[1])
        for i in range(1, count + 1):
            writer.write(b"RETR %d\r\n" % i)
            await _pop3_read_ok(reader)
            # The body ends with CRLF.CRLF; read the multi-line reply in large chunks.
            await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"QUIT\r\n")
        await _pop3_read_ok(reader)
    finally:
        writer.close()


def _pop3_session_blocking(entry: list[Any]) -> None:
    _arun(_pop3_session_async(entry))


def pop3(spec: dict[str, Any]) -> dict[str, Any]:
    return _run_entries(spec["entries"], spec["concurrency"], _pop3_session_blocking,
                        _pop3_session_async)


# --- ManageSieve ----------------------------------------------------------------


async def _sieve_response(reader: asyncio.StreamReader) -> bytes:
    """Lines up to the OK/NO/BYE that ends a response (RFC 5804 section 1.3); a literal
    ({n}) is read as it comes (GETSCRIPT's script)."""
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("ManageSieve: connection closed")
        if line.rstrip().endswith(b"}") and b"{" in line:
            size = int(line.rstrip()[line.rindex(b"{") + 1:-1].rstrip(b"+"))
            await reader.readexactly(size)
            continue
        word = line.split(b" ", 1)[0].strip()
        if word in (b"OK", b"NO", b"BYE"):
            if word != b"OK":
                raise RuntimeError(f"ManageSieve error: {line!r}")
            return line


async def _sieve_session_async(entry: list[Any]) -> None:
    """Log in, LISTSCRIPTS, GETSCRIPT, LOGOUT: what a filter editor does on opening."""
    host, port, user, password, script = entry
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _sieve_response(reader)  # the greeting: capabilities, then OK
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        writer.write(b'AUTHENTICATE "PLAIN" "' + token + b'"\r\n')
        await _sieve_response(reader)
        writer.write(b"LISTSCRIPTS\r\n")
        await _sieve_response(reader)
        writer.write(b'GETSCRIPT "' + script.encode() + b'"\r\n')
        await _sieve_response(reader)
        writer.write(b"LOGOUT\r\n")
        await _sieve_response(reader)
    finally:
        writer.close()


def _sieve_session_blocking(entry: list[Any]) -> None:
    _arun(_sieve_session_async(entry))


def sieve(spec: dict[str, Any]) -> dict[str, Any]:
    return _run_entries(spec["entries"], spec["concurrency"], _sieve_session_blocking,
                        _sieve_session_async)


# --- IDLE at scale -------------------------------------------------------------


async def _idle_main(spec: dict[str, Any]) -> None:
    """Open every session (LOGIN, SELECT INBOX, IDLE), then report on request.

    Protocol on stdout: one JSON line ``{"event": "opened", ...}`` once all
    sessions are idling (or failed). Then, for each ``report`` line on stdin, a
    line ``{"event": "report", "seen": {user: monotonic time of first EXISTS}}``;
    ``quit`` closes every connection and exits.
    """
    ctx = _tls_context(spec) if spec["tls"] else None
    sem = asyncio.Semaphore(spec.get("open_concurrency", 32))
    seen: dict[str, float] = {}
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []
    readers: list[asyncio.Task[None]] = []

    async def watch(user: str, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.endswith(b" EXISTS\r\n") and user not in seen:
                seen[user] = time.monotonic()

    async def one(entry: list[Any]) -> None:
        async with sem:  # the timeout starts once the session's turn has come
            try:
                reader = await asyncio.wait_for(open_one(entry), IO_TIMEOUT)
            except TimeoutError:
                errors.append(f"timeout opening {entry[2]}")
                return
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc))
                return
        readers.append(asyncio.create_task(watch(entry[2], reader)))

    async def open_one(entry: list[Any]) -> asyncio.StreamReader:
        host, port, user, password = entry[:4]
        source = entry[4] if len(entry) > 4 else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=host if ctx else None,
            limit=1 << 16, local_addr=(source, 0) if source else None)
        writers.append(writer)
        await reader.readline()
        writer.write(b"a " + _login_line(user, password) + b"\r\n")
        resp = await _read_tagged(reader, b"a ")
        if not resp.startswith(b"a OK"):
            raise RuntimeError(f"LOGIN failed: {resp!r}")
        writer.write(b"b SELECT INBOX\r\nc IDLE\r\n")
        resp = await _read_tagged(reader, b"b ")
        if not resp.startswith(b"b OK"):
            raise RuntimeError(f"SELECT failed: {resp!r}")
        cont = await reader.readline()
        if not cont.startswith(b"+"):
            raise RuntimeError(f"IDLE refused: {cont!r}")
        return reader

    t0 = time.monotonic()
    await asyncio.gather(*(one(e) for e in spec["entries"]))
    t1 = time.monotonic()
    out = sys.stdout
    out.write(json.dumps({"event": "opened", "ok": len(readers), "failed": len(errors),
                          "first_errors": errors[:3], "start": t0, "end": t1}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    while True:
        cmd = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if cmd == "report":
            # Which sessions are still connected is part of the answer: a proxy
            # that drops idle sessions must show up in the figures.
            alive = sum(1 for t in readers if not t.done())
            out.write(json.dumps({"event": "report", "seen": seen, "alive": alive}) + "\n")
            out.flush()
        else:
            break
    for w in writers:
        w.transport.abort()
    for t in readers:
        t.cancel()


# --- main ---------------------------------------------------------------------


def _arun(coro: Any) -> Any:
    try:
        import uvloop  # type: ignore[import-not-found]

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


KINDS = {"bulk": bulk, "noop": noop, "logins": logins, "pop3": pop3, "sieve": sieve}


def main() -> None:
    global IO_TIMEOUT
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    IO_TIMEOUT = float(spec.get("io_timeout", IO_TIMEOUT))
    if spec["kind"] == "idle":
        _arun(_idle_main(spec))
        return
    result = KINDS[spec["kind"]](spec)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

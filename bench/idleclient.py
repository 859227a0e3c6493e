"""Idle connections and a connection burst against one Willi: what each idle client costs.

An MX holds many connections that do nothing (slow senders, tarpitted
clients). The client here is one selector loop over non-blocking sockets,
no thread per connection, so ten thousand connections cost the benchmark
little; every wait has a deadline and every socket is closed at the end.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import proctree

OPEN_PENDING = 100  # connections in their handshake at once while opening the idle set (below any backlog)
# A connection whose handshake overflowed the listen queue is retried by the kernel (SYN at 1, 3, 7, 15 s);
# one that the server answered with a SYN cookie and then dropped never gets a greeting at all.
BURST_TIMEOUT = 30.0
EHLO = b"EHLO idle.bench.test\r\n"


def first_reply(buf: bytes | bytearray) -> tuple[int, bytes, int] | None:
    """(code, first line, octets used) of the first complete SMTP reply in buf, or None if incomplete.

    A line that does not start with three digits ends the reply with code 0.
    """
    start, first = 0, b""
    while True:
        end = buf.find(b"\n", start)
        if end < 0:
            return None
        line = bytes(buf[start:end]).rstrip(b"\r")
        first = first or line
        if len(line) < 3 or not line[:3].isdigit():
            return 0, first, end + 1
        if line[3:4] != b"-":
            return int(line[:3]), first, end + 1
        start = end + 1


@dataclass
class Conn:
    """One client connection and how far its dialog got."""

    sock: socket.socket
    stage: str = "greeting"  # greeting -> ehlo -> idle
    buf: bytearray = field(default_factory=bytearray)


class Failed(Exception):
    """This connection is lost; the message says why (counted, not raised further)."""


def connect(port: int) -> socket.socket:
    """A non-blocking socket with its connect to 127.0.0.1:port started."""
    sock = socket.socket()
    sock.setblocking(False)
    err = sock.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return sock


def read_reply(conn: Conn) -> tuple[int, bytes] | None:
    """Read what is there; return the next complete reply, None if there is none yet, raise Failed on EOF."""
    try:
        data = conn.sock.recv(4096)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise Failed(exc.strerror or str(exc)) from exc
    if not data:
        raise Failed(f"closed by the server during {conn.stage}")
    conn.buf += data
    reply = first_reply(conn.buf)
    if reply is None:
        return None
    code, line, used = reply
    del conn.buf[:used]
    return code, line


def advance(conn: Conn) -> bool:
    """Move one connection along greeting -> EHLO -> idle; True once it is idle."""
    reply = read_reply(conn)
    if reply is None:
        return False
    code, line = reply
    wanted = 220 if conn.stage == "greeting" else 250
    if code != wanted:
        raise Failed(f"{conn.stage}: {line[:60].decode(errors='replace')}")
    if conn.stage == "greeting":
        if conn.sock.send(EHLO) != len(EHLO):  # an empty socket buffer takes 22 octets whole
            raise Failed("EHLO not sent whole")
        conn.stage = "ehlo"
        return False
    conn.stage = "idle"
    return True


def open_idle(port: int, count: int, timeout: float) -> tuple[list[socket.socket], Counter[str]]:
    """Open up to `count` connections that got 220 and an EHLO reply; return them (open) and the failures."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    ready: list[socket.socket] = []
    failures: Counter[str] = Counter()
    started = 0
    try:
        while started < count or sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                failures[f"not idle within {timeout:g} s"] += len(sel.get_map())
                if count > started:
                    failures[f"not started within {timeout:g} s"] += count - started
                break
            while started < count and len(sel.get_map()) < OPEN_PENDING:
                try:
                    sock = connect(port)
                except OSError as exc:  # EMFILE, EADDRNOTAVAIL: no point starting more
                    failures[f"connect: {exc.strerror}"] += count - started
                    count = started
                    break
                started += 1
                sel.register(sock, selectors.EVENT_READ, Conn(sock))
            for key, _ in sel.select(timeout=min(0.5, deadline - now)):
                conn: Conn = key.data
                try:
                    if advance(conn):
                        sel.unregister(conn.sock)
                        ready.append(conn.sock)
                except Failed as exc:
                    failures[str(exc)] += 1
                    sel.unregister(conn.sock)
                    conn.sock.close()
    except BaseException:
        close_all(ready)
        raise
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return ready, failures


@dataclass
class Burst:
    requested: int
    greeted: int
    seconds: float  # from the first connect until the last greeting (or the deadline)
    failures: dict[str, int]


def burst(port: int, count: int, timeout: float) -> Burst:
    """Start `count` connects at once; time until every one has read its 220 greeting."""
    sel = selectors.DefaultSelector()
    failures: Counter[str] = Counter()
    socks: list[socket.socket] = []
    greeted, last = 0, 0.0
    try:
        for _ in range(count):
            try:
                sock = socket.socket()
            except OSError as exc:
                failures[f"socket: {exc.strerror}"] += 1
                continue
            sock.setblocking(False)
            socks.append(sock)
        start = time.monotonic()
        deadline = start + timeout
        for sock in socks:
            err = sock.connect_ex(("127.0.0.1", port))
            if err in (0, errno.EINPROGRESS):
                sel.register(sock, selectors.EVENT_READ, Conn(sock))
            else:
                failures[f"connect: {errno.errorcode.get(err, err)}"] += 1
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                failures[f"no greeting within {timeout:g} s"] += len(sel.get_map())
                last = now
                break
            for key, _ in sel.select(timeout=min(0.5, deadline - now)):
                conn: Conn = key.data
                try:
                    reply = read_reply(conn)
                    if reply is None:
                        continue
                    if reply[0] != 220:
                        raise Failed(f"greeting: {reply[1][:60].decode(errors='replace')}")
                    greeted += 1
                    last = time.monotonic()
                except Failed as exc:
                    failures[str(exc)] += 1
                sel.unregister(conn.sock)
        return Burst(count, greeted, max(0.0, last - start), dict(failures))
    finally:
        sel.close()
        close_all(socks)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


@dataclass
class IdleResult:
    requested: int
    opened: int
    open_seconds: float
    rss_before_kib: int
    rss_after_kib: int
    idle_seconds: float
    idle_cpu_percent: float
    burst: Burst | None
    failures: dict[str, int]

    @property
    def kib_per_connection(self) -> float | None:
        return (self.rss_after_kib - self.rss_before_kib) / self.opened if self.opened else None

    @property
    def ok(self) -> bool:
        return self.opened == self.requested and (self.burst is None or self.burst.greeted == self.burst.requested)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kib_per_connection": self.kib_per_connection, "ok": self.ok}


def measure_idle(pid: int, port: int, count: int, burst_count: int, idle_seconds: float,
                 timeout: float = 300.0) -> IdleResult:
    """RSS per idle connection, CPU while they idle, then a burst on top of them; all closed at the end."""
    rss_before = proctree.tree_rss_kib(pid)
    started = time.monotonic()
    idle, failures = open_idle(port, count, timeout)
    try:
        open_seconds = time.monotonic() - started
        time.sleep(1.0)  # let the server finish setting up the last sessions before RSS is read
        rss_after = proctree.tree_rss_kib(pid)
        cpu_before, t0 = proctree.tree_cpu_seconds(pid), time.monotonic()
        time.sleep(idle_seconds)
        cpu_used, wall = proctree.tree_cpu_seconds(pid) - cpu_before, time.monotonic() - t0
        result_burst = burst(port, burst_count, BURST_TIMEOUT) if burst_count else None
    finally:
        close_all(idle)
    return IdleResult(count, len(idle), open_seconds, rss_before, rss_after, wall, 100.0 * cpu_used / wall,
                      result_burst, dict(failures))

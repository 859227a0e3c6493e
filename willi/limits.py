"""Connection limits that hold across every worker process.

`max_connections` and `max_connections_per_ip` are global settings, so
with several workers the counts live in shared memory (an anonymous shared
mmap made by the parent before it forks). Each worker owns one region and
writes only there: a total and an open-addressing hash table of per-address
counts. A check reads every region. When a worker dies, the parent zeroes
its region (its connections died with it), so a crash can never leak slots.

All reads and writes happen under one lock: a threading.Lock for the
threads of a process and a POSIX record lock (lockf) on a shared file for
the processes, which the kernel releases if its holder dies, so a worker
killed at the wrong moment cannot wedge the others.

Slots are released on every path: a `Ticket` is released exactly once,
whoever gets there first (the session's end, or the server's
shutdown_request when the thread for the connection could not start).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import socket
import struct
import tempfile
import threading
import time

_HEADER = struct.Struct("=II")  # total, used keys (live + stale) in this region
_ENTRY = struct.Struct("=16sI")  # address (IPv6 or IPv4-mapped), count
_EMPTY = bytes(16)
_MAPPED = b"\x00" * 10 + b"\xff\xff"
STRESS_FRACTION = 0.8
#: How stale the stress flag may be about the other workers' counts (this process's changes clear it at once).
STRESS_RECHECK = 0.1


def _capacity_for(max_connections: int) -> int:
    size = 64
    while size < 2 * max_connections:
        size *= 2
    return size


def address_key(ip: str) -> bytes:
    """16 octets per address: IPv6 as it is, IPv4 as IPv4-mapped IPv6."""
    try:
        if ":" not in ip:
            return _MAPPED + socket.inet_pton(socket.AF_INET, ip)
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except (OSError, ValueError):
        return hashlib.blake2b(ip.encode("utf-8", "replace"), digest_size=16).digest()


class Ticket:
    """One connection's slot: released once, by whoever gets there first."""

    __slots__ = ("_released", "key", "limits")

    def __init__(self, limits: SharedLimits, key: bytes) -> None:
        self.limits, self.key = limits, key
        self._released = False

    def rekey(self, ip: str) -> str | None:
        """Count this slot for `ip` from now on (the real client behind a PROXY header); a refusal text if over."""
        return self.limits.rekey(self, ip)

    def stressed(self) -> bool:
        return self.limits.stressed()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.limits.release(self.key)


class SharedLimits:
    """Per-worker regions of connection counts in memory shared by all workers."""

    def __init__(self, regions: int, max_connections: int) -> None:
        self.regions = regions
        self.capacity = _capacity_for(max_connections)
        self.region_size = _HEADER.size + self.capacity * _ENTRY.size
        self.memory = mmap.mmap(-1, regions * self.region_size)  # MAP_SHARED | MAP_ANONYMOUS: forks share it
        self.index = 0  # the region this process writes (set by a worker with `own`)
        self.max_connections = max_connections
        self.max_per_ip = max_connections
        self._secret = secrets.token_bytes(16)  # keyed hash: chosen addresses cannot make long probe runs
        self._thread_lock = threading.Lock()
        lock_file = tempfile.TemporaryFile(prefix="willi-limits-")
        self.lock_fd = os.dup(lock_file.fileno())
        lock_file.close()
        self._shared = regions > 1
        self._stress_until = 0.0  # the cached stress flag holds until then (monotonic time)
        self._stress = False

    def own(self, index: int) -> None:
        """In a worker: write region `index` from now on."""
        self.index = index

    def configure(self, max_connections: int, max_per_ip: int) -> None:
        """The limits in force (a reload may change them; the table size stays)."""
        self.max_connections, self.max_per_ip = max_connections, max_per_ip
        self._stress_until = 0.0

    # ------------------------------------------------------------ locking

    def _lock(self) -> None:
        self._thread_lock.acquire()
        if self._shared:
            try:
                fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def _unlock(self) -> None:
        self._stress_until = 0.0  # whatever changed under the lock, the stress flag is looked at again
        if self._shared:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    # ------------------------------------------------------------ the table

    def _slot(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") & (self.capacity - 1)

    def _find(self, region: int, key: bytes, slot: int | None = None) -> tuple[int, int]:
        """(offset of the entry for key or of the empty entry where it would go, its count).

        `slot`: `_slot(key)` when the caller has it already (one keyed hash per key, not per region).
        """
        base = region * self.region_size + _HEADER.size
        mem, mask = self.memory, self.capacity - 1
        if slot is None:
            slot = self._slot(key)
        for _ in range(self.capacity):
            offset = base + slot * _ENTRY.size
            stored, count = _ENTRY.unpack_from(mem, offset)
            if stored == key or stored == _EMPTY:
                return offset, (count if stored == key else -1)
            slot = (slot + 1) & mask
        return -1, -1

    def _header(self, region: int) -> tuple[int, int]:
        return _HEADER.unpack_from(self.memory, region * self.region_size)

    def _set_header(self, region: int, total: int, used: int) -> None:
        _HEADER.pack_into(self.memory, region * self.region_size, total, used)

    def _count(self, key: bytes) -> int:
        total = 0
        slot = self._slot(key)
        for region in range(self.regions):
            _, count = self._find(region, key, slot)
            total += max(count, 0)
        return total

    def _total(self) -> int:
        return sum(self._header(region)[0] for region in range(self.regions))

    def _add(self, key: bytes, delta: int) -> bool:
        """Change this process's count for key by delta; False when the table has no room."""
        region = self.index
        total, used = self._header(region)
        offset, count = self._find(region, key)
        if count < 0:
            if delta < 0:
                return True
            if used + 1 > self.capacity // 2:
                self._compact(region)
                total, used = self._header(region)
                offset, count = self._find(region, key)
                if used + 1 > self.capacity // 2 or offset < 0:
                    return False
            _ENTRY.pack_into(self.memory, offset, key, delta)
            self._set_header(region, total + delta, used + 1)
            return True
        _ENTRY.pack_into(self.memory, offset, key, max(0, count + delta))
        self._set_header(region, max(0, total + delta), used)
        return True

    def _compact(self, region: int) -> None:
        """Rebuild a region without its stale (zero-count) entries."""
        base = region * self.region_size + _HEADER.size
        live = []
        for slot in range(self.capacity):
            stored, count = _ENTRY.unpack_from(self.memory, base + slot * _ENTRY.size)
            if stored != _EMPTY and count > 0:
                live.append((stored, count))
        self.memory[base : base + self.capacity * _ENTRY.size] = bytes(self.capacity * _ENTRY.size)
        total = 0
        for stored, count in live:
            offset, _ = self._find(region, stored)
            _ENTRY.pack_into(self.memory, offset, stored, count)
            total += count
        self._set_header(region, total, len(live))

    # ------------------------------------------------------------ public

    def admit(self, ip: str, *, per_ip: bool = True) -> Ticket | str:
        """A slot for a new connection from `ip`, or the refusal text (421 follows).

        `per_ip` False for a trusted load balancer: only the global limit
        applies until its PROXY header names the real client (`rekey`).
        """
        key = address_key(ip)
        self._lock()
        try:
            if self._total() >= self.max_connections:
                return "4.3.2 Too many connections, try again later"
            if per_ip and self._count(key) >= self.max_per_ip:
                return "4.7.0 Too many connections from your address, try again later"
            if not self._add(key, 1):
                return "4.3.2 Too many connections, try again later"
        finally:
            self._unlock()
        return Ticket(self, key)

    def rekey(self, ticket: Ticket, ip: str) -> str | None:
        key = address_key(ip)
        self._lock()
        try:
            if self._count(key) >= self.max_per_ip:
                return "4.7.0 Too many connections from your address, try again later"
            if not self._add(key, 1):
                return "4.3.2 Too many connections, try again later"
            self._add(ticket.key, -1)
            ticket.key = key
        finally:
            self._unlock()
        return None

    def release(self, key: bytes) -> None:
        self._lock()
        try:
            self._add(key, -1)
        finally:
            self._unlock()

    def stressed(self) -> bool:
        """Near the global limit: deadlines shrink, as Postfix's stress mode (read without the lock).

        Asked before every command and every write, so the answer is kept
        for STRESS_RECHECK seconds; a slot taken or given back in this
        process makes the next question look again.
        """
        now = time.monotonic()
        if now >= self._stress_until:
            self._stress = self._total() >= STRESS_FRACTION * self.max_connections
            self._stress_until = now + STRESS_RECHECK
        return self._stress

    def total(self) -> int:
        return self._total()

    def count(self, ip: str) -> int:
        key = address_key(ip)
        self._lock()
        try:
            return self._count(key)
        finally:
            self._unlock()

    def reset_region(self, index: int) -> None:
        """In the parent, after worker `index` died: its connections are gone with it."""
        self._lock()
        try:
            start = index * self.region_size
            self.memory[start : start + self.region_size] = bytes(self.region_size)
        finally:
            self._unlock()

    def close(self) -> None:
        try:
            os.close(self.lock_fd)
        except OSError:
            pass

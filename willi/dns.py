"""Bounded DNS: every name lookup has a deadline, and a slow resolver costs no threads per client.

The C library's resolver calls block for as long as the resolver likes
(timeouts x attempts x servers), cannot be interrupted, and Python has no
asynchronous version of them in the standard library. So lookups run on a
small fixed pool of threads per process with a bounded queue: a caller waits
for its answer until its own deadline and then gives up (the lookup finishes
in the background and is cached); when the queue is full, the caller gets
"temporarily unavailable" at once. Concurrent lookups of the same name share
one job. A flood of clients whose reverse DNS never answers therefore costs
at most `THREADS` threads and never delays anyone past their deadline.

Reverse lookups are forward-confirmed (the name must resolve back to the
address), as Postfix's smtpd does for `reverse_client_name`.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

THREADS = 8
QUEUE_LIMIT = 512
CACHE_LIMIT = 10000
REVERSE_TTL = 300.0
FORWARD_TTL = 30.0
NEGATIVE_TTL = 60.0
UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

Address = tuple[int, tuple[Any, ...]]  # (family, sockaddr) as getaddrinfo gives them


class DnsError(Exception):
    """A name could not be resolved; `temporary` says whether trying later may help."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: DnsError | None = None


class DnsPool:
    """The lookup threads, their queue, the in-flight jobs and the answer cache."""

    def __init__(self, threads: int = THREADS, queue_limit: int = QUEUE_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threads, self.queue_limit, self.clock = threads, queue_limit, clock
        self._reset()

    def _reset(self) -> None:
        """Fresh state; also run in a forked child, whose copy has no threads."""
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[tuple[str, str], Callable[[], Any], _Job] | None] = queue.Queue(
            self.queue_limit)
        self._workers: list[threading.Thread] = []
        self._inflight: dict[tuple[str, str], _Job] = {}
        self._cache: OrderedDict[tuple[str, str], tuple[float, Any, DnsError | None]] = OrderedDict()

    # ------------------------------------------------------------ public

    def reverse(self, addr: str, timeout: float) -> str:
        """The client's verified name, UNAVAILABLE (none, or it does not resolve back) or TEMPUNAVAIL."""
        try:
            return self._lookup(("ptr", addr), lambda: _verified_name(addr), timeout)
        except DnsError as exc:
            return TEMPUNAVAIL if exc.temporary else UNAVAILABLE

    def prefetch_reverse(self, addr: str) -> None:
        """Start a reverse lookup without waiting, so a later `reverse` finds it done or under way."""
        try:
            self._lookup(("ptr", addr), lambda: _verified_name(addr), 0.0)
        except DnsError:
            pass

    def resolve(self, host: str, port: int, timeout: float) -> list[Address]:
        """The addresses of `host` in the resolver's order; DnsError when there are none."""
        literal = _numeric(host, port)
        if literal is not None:
            return literal
        result = self._lookup(("addr", host.lower()), lambda: _addresses(host), timeout)
        return [(family, (sockaddr[0], port, *sockaddr[2:])) for family, sockaddr in result]

    # ------------------------------------------------------------ machinery

    def _lookup(self, key: tuple[str, str], call: Callable[[], Any], timeout: float) -> Any:
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                expires, result, error = cached
                if expires > self.clock():
                    self._cache.move_to_end(key)
                    if error is not None:
                        raise error
                    return result
                del self._cache[key]
            job = self._inflight.get(key)
            if job is None:
                job = _Job()
                try:
                    self._queue.put_nowait((key, call, job))
                except queue.Full:
                    raise DnsError(f"resolver busy looking up {key[1]}", temporary=True) from None
                self._inflight[key] = job
                if not self._start_worker():
                    # No thread could start and none runs: nobody would ever answer this job. (Its queue
                    # entry is answered by the next worker that starts, for nobody.)
                    del self._inflight[key]
                    raise DnsError(f"no thread free to look up {key[1]}", temporary=True)
        if timeout <= 0 and not job.done.is_set():
            raise DnsError(f"no answer yet for {key[1]}", temporary=True)
        if not job.done.wait(timeout):
            raise DnsError(f"no answer for {key[1]} within {timeout:g}s", temporary=True)
        if job.error is not None:
            raise job.error
        return job.result

    def _start_worker(self) -> bool:
        """Add a thread while there are fewer than `threads` (called with the lock held).

        False when a thread was needed but could not start ("can't start new
        thread": a thread shortage) and no other is running to take the job.
        """
        self._workers = [t for t in self._workers if t.is_alive()]
        if len(self._workers) < self.threads and self._queue.qsize() > 0:
            thread = threading.Thread(target=self._work, name="willi-dns", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                return bool(self._workers)  # the running workers will get to the job
            self._workers.append(thread)
        return True

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=60.0)
            except queue.Empty:
                return  # idle: let the thread go; a new one starts with the next lookup
            if item is None:
                return
            key, call, job = item
            try:
                job.result = call()
            except DnsError as exc:
                job.error = exc
            except Exception as exc:  # never let a resolver surprise kill the pool
                job.error = DnsError(f"lookup of {key[1]} failed: {exc!r}", temporary=True)
            with self._lock:
                self._inflight.pop(key, None)
                if job.error is None:
                    ttl = REVERSE_TTL if key[0] == "ptr" else FORWARD_TTL
                elif not job.error.temporary:
                    ttl = NEGATIVE_TTL
                else:
                    ttl = 0.0  # temporary failures are not cached
                if ttl:
                    self._cache[key] = (self.clock() + ttl, job.result, job.error)
                    self._cache.move_to_end(key)
                    while len(self._cache) > CACHE_LIMIT:
                        self._cache.popitem(last=False)
            job.done.set()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _numeric(host: str, port: int) -> list[Address] | None:
    """An IP literal needs no resolver (and no thread)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _addresses(host: str) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        temporary = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", -11))
        raise DnsError(f"cannot resolve {host}: {exc.strerror}", temporary=temporary) from None
    except UnicodeError as exc:
        raise DnsError(f"cannot resolve {host}: {exc}", temporary=False) from None
    seen: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        item = (family, sockaddr)
        if item not in seen:
            seen.append(item)
    return seen


def _verified_name(addr: str) -> str:
    """Forward-confirmed reverse DNS: the PTR name, if it resolves back to `addr`."""
    try:
        name = socket.gethostbyaddr(addr)[0]
    except socket.herror as exc:
        temporary = exc.errno == 2  # TRY_AGAIN from h_errno
        raise DnsError(f"no reverse name for {addr}", temporary=temporary) from None
    except socket.gaierror as exc:
        raise DnsError(f"no reverse name for {addr}: {exc.strerror}",
                       temporary=exc.errno == socket.EAI_AGAIN) from None
    except OSError as exc:
        raise DnsError(f"reverse lookup of {addr} failed: {exc}", temporary=True) from None
    try:
        forward = {info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise DnsError(f"{name} does not resolve: {exc.strerror}", temporary=exc.errno == socket.EAI_AGAIN) from None
    except (OSError, UnicodeError) as exc:
        raise DnsError(f"{name} does not resolve: {exc}", temporary=True) from None
    if addr not in forward and not any(f.split("%", 1)[0] == addr for f in forward):
        raise DnsError(f"{name} does not resolve back to {addr}", temporary=False)
    return name


#: The process's pool. A forked worker starts with an empty one (its parent's threads are not copied).
DNS = DnsPool()
os.register_at_fork(after_in_child=DNS._reset)

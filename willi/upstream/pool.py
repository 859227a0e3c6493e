"""Idle upstream connections kept for reuse between client connections (per process).

Reuse is what makes many short client connections cheap: a new client's
transaction goes out on a connection that already has its greeting, EHLO
and TLS behind it. It is only allowed where Willi does not re-identify the
client with XCLIENT: Postfix checks XCLIENT authorization against the
impersonated client, so a second XCLIENT on one connection is refused
(XCLIENT_README); a connection that carried XCLIENT serves one client
connection and is closed after it (design.md, "The upstream side").

A connection comes back only when it is clean: alive, no error, timeout or
421 ever seen on it, no transaction open, fewer than `max_transactions`
done. An idle connection is closed after `idle_timeout`, well below the
servers' own idle limits (Postfix smtpd_timeout is 300 s). Before reuse it
is checked: an idle connection that has something to say (a 421 sent while
it sat idle, or EOF) is dropped, never read as the reply to the next
command; the caller then sends RSET first, so a connection that died in the
meantime is found before anything of the transaction reached the client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

from willi.upstream.client import UpstreamConnection

MAX_IDLE_PER_KEY = 32


class UpstreamPool:
    """Idle connections by destination key; a reaper thread closes expired ones."""

    def __init__(self, idle_timeout: float, max_transactions: int, *, max_idle_per_key: int = MAX_IDLE_PER_KEY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout, self.max_transactions = idle_timeout, max_transactions
        self.max_idle_per_key = max_idle_per_key
        self.clock = clock
        self._idle: dict[Hashable, list[UpstreamConnection]] = {}
        self._cond = threading.Condition()
        self._reaper: threading.Thread | None = None
        self._closed = False
        self.reused = self.returned = 0

    def poolable(self, conn: UpstreamConnection) -> bool:
        return (conn.alive and not conn.faulted and not conn.xclient and not conn.in_transaction
                and conn.transactions < self.max_transactions)

    def take(self, key: Hashable) -> UpstreamConnection | None:
        """The most recently used idle connection for `key` that still looks alive, or None."""
        stale: list[UpstreamConnection] = []
        found = None
        with self._cond:
            conns = self._idle.get(key)
            now = self.clock()
            while conns:
                conn = conns.pop()
                if now - conn.idle_since >= self.idle_timeout or conn.channel is None or conn.channel.pending():
                    stale.append(conn)
                    continue
                found = conn
                break
            if conns is not None and not conns:
                del self._idle[key]
            if found is not None:
                self.reused += 1
        for conn in stale:
            conn.close(polite=False)
        return found

    def put(self, key: Hashable, conn: UpstreamConnection) -> bool:
        """Keep `conn` for reuse if it is clean; otherwise say goodbye. True when kept."""
        if self._closed or not self.poolable(conn):
            conn.quit()
            return False
        conn.idle_since = self.clock()
        evicted = None
        with self._cond:
            conns = self._idle.setdefault(key, [])
            conns.append(conn)
            if len(conns) > self.max_idle_per_key:
                evicted = conns.pop(0)
            self.returned += 1
            # No notify for a running reaper: a connection put now expires after all those it waits for.
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="willi-upstream-pool", daemon=True)
                self._reaper.start()
        if evicted is not None:
            evicted.quit()
        return True

    def _reap(self) -> None:
        """Close connections idle past the timeout; sleep until the next one expires, exit when empty."""
        while True:
            expired: list[UpstreamConnection] = []
            with self._cond:
                if self._closed or not self._idle:
                    self._reaper = None
                    return
                now = self.clock()
                soonest = None
                for key in list(self._idle):
                    keep = []
                    for conn in self._idle[key]:
                        if now - conn.idle_since >= self.idle_timeout:
                            expired.append(conn)
                        else:
                            keep.append(conn)
                            due = conn.idle_since + self.idle_timeout
                            soonest = due if soonest is None else min(soonest, due)
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                if not expired:
                    self._cond.wait(None if soonest is None else max(0.05, soonest - now))
            for conn in expired:
                conn.quit()

    def __len__(self) -> int:
        with self._cond:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Say goodbye to every idle connection (reload, stop)."""
        with self._cond:
            self._closed = True
            conns = [c for v in self._idle.values() for c in v]
            self._idle.clear()
            self._cond.notify_all()
        for conn in conns:
            conn.quit()

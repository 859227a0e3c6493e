"""A process's state of life: serving, draining (graceful stop), stopping (forced).

Sessions look at these flags when a wait ends, and TLS sessions wait on the
two pipes (a plain session is woken by shutting its socket's read side, see
netio.Channel.interrupt). The pipes are never drained: once written they
stay readable, so every later wait ends at once, which is what a stop wants.
"""

from __future__ import annotations

import os


class Lifecycle:
    """Draining and stopping flags, each with a pipe whose read end wakes poll()."""

    def __init__(self) -> None:
        self.draining = False
        self.stopping = False
        self._drain_r, self._drain_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        #: Wake descriptors for an idle wait (drain or stop ends it) and for any other wait (stop only).
        self.idle_wake = (self._drain_r, self._stop_r)
        self.busy_wake = (self._stop_r,)

    @property
    def fds(self) -> tuple[int, ...]:
        return (self._drain_r, self._drain_w, self._stop_r, self._stop_w)

    def drain(self) -> None:
        if not self.draining:
            self.draining = True
            os.write(self._drain_w, b"d")

    def stop(self) -> None:
        self.drain()
        if not self.stopping:
            self.stopping = True
            os.write(self._stop_w, b"s")

    def close(self) -> None:
        for fd in (self._drain_r, self._drain_w, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

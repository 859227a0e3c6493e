"""Signal handlers that only set flags and wake the main thread through a pipe.

SIGTERM/SIGINT ask for a stop (a second one during the drain makes it
immediate), SIGHUP for a reload, SIGUSR1 for reopening log files, SIGCHLD
(in the supervisor) tells that a worker ended. The main thread acts on them
in its loop; nothing else runs in a handler.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Sequence


class Signals:
    """Handlers that only set flags and wake the main thread through a pipe."""

    def __init__(self, *, children: bool = False) -> None:
        self.stops = 0  # how many stop signals arrived
        self.stop = 0  # the signal number of the first
        self.reload = False
        self.reopen = False
        self.child = False
        self.children = children
        self._pipe: tuple[int, int] | None = None

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = self.stop or signum
        self.stops += 1

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload = True

    def _on_reopen(self, signum: int, frame: object) -> None:
        self.reopen = True

    def _on_child(self, signum: int, frame: object) -> None:
        self.child = True

    def handlers(self) -> dict[int, object]:
        table: dict[int, object] = {signal.SIGTERM: self._on_stop, signal.SIGINT: self._on_stop,
                                    signal.SIGHUP: self._on_reload, signal.SIGUSR1: self._on_reopen}
        if self.children:
            table[signal.SIGCHLD] = self._on_child
        return table

    def signal_map(self) -> dict[int, object]:
        """For DaemonContext: ours, and job-control signals ignored (None)."""
        return {**self.handlers(), signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None}

    def install(self) -> None:
        for signum, handler in self.handlers().items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.arm()

    def arm(self) -> None:
        """A wakeup fd makes `wait` return as soon as a signal arrives."""
        if self._pipe is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w)
        signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)

    @property
    def fds(self) -> tuple[int, ...]:
        return self._pipe if self._pipe is not None else ()

    def pending(self) -> bool:
        return bool(self.stop or self.reload or self.reopen or self.child)

    def wait(self, timeout: float | None, fds: Sequence[int] = ()) -> list[int]:
        """Sleep until a signal arrives, one of `fds` is readable, or `timeout` passes; the readable `fds`."""
        self.arm()
        assert self._pipe is not None
        if self.pending():
            timeout = 0
        try:
            readable, _, _ = select.select([self._pipe[0], *fds], [], [], timeout)
        except InterruptedError:
            return []
        if self._pipe[0] in readable:
            try:
                while os.read(self._pipe[0], 512):
                    pass
            except BlockingIOError:
                pass
        return [fd for fd in readable if fd != self._pipe[0]]

"""Helpers shared by the test_security_*.py modules (issue 7)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from proxy_helpers import make_config
from support import RawClient, RunningWilli

from willi.log import TRANSACTION_LOGGER
from willi.server import WilliService


class ListHandler(logging.Handler):
    """Collects formatted messages of one logger, whatever `propagate` says."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.lines.append(record.getMessage())


@contextmanager
def captured(logger: str, level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages `logger` (and its children) emit inside the block."""
    handler = ListHandler()
    log = logging.getLogger(logger)
    old_level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > level:
        log.setLevel(level)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def transaction_lines() -> AbstractContextManager[list[str]]:
    """The one-line-per-transaction records written inside the block."""
    return captured(TRANSACTION_LOGGER)


def start(tmp_path: Path, mappings: list[dict], **settings: object) -> RunningWilli:
    """Willi in-process with `settings` over proxy_helpers.BASE_SETTINGS."""
    config = make_config(tmp_path, mappings, **settings)
    return RunningWilli(WilliService(config).start(), config)


def open_transaction(w: RunningWilli, *, utf8: bool = False, sender: str = "a@sender.example") -> RawClient:
    """A client after EHLO and an accepted MAIL."""
    client = w.raw()
    client.ehlo()
    code, lines = client.cmd(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
    assert code == 250, lines
    return client


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds it took)."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks -> seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_count(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name and t.is_alive())


def dns_threads() -> int:
    """Live lookup threads of the process's DNS pool (other pools' threads, e.g. of other tests, not counted)."""
    import willi.dns

    return sum(t.is_alive() for t in willi.dns.DNS._workers)

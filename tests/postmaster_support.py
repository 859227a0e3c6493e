"""Helpers for the operator-facing tests (test_postmaster_*, test_probe, test_promises).

What a postmaster sees is the command line's output and the log, so these
helpers run `willi.py` as a real process (the foreground mode for start-up
and signals), capture the one-line-per-transaction log of an in-process
Willi, parse logfmt, and make a throw-away system user for `--check`.
Every process started here is stopped by its PID, every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from willi.log import TRANSACTION_LOGGER

ROOT = Path(__file__).resolve().parent.parent
WILLI = [sys.executable, str(ROOT / "willi.py")]
RUN_TIMEOUT = 60.0


def plain_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: output buffered as it is for an operator's pipe."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run_willi(*args: str, timeout: float = RUN_TIMEOUT) -> tuple[int, list[str]]:
    """Run `willi.py ARGS` to its end; (exit status, stdout and stderr merged as one stream would show them)."""
    result = subprocess.run([*WILLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, env=plain_env(), cwd="/")
    return result.returncode, result.stdout.splitlines()


class Foreground:
    """`willi.py -c CONFIG -f` as a child process, its stderr (the log) collected line by line."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([*WILLI, "-c", str(config), "-f", *extra], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=plain_env(), cwd="/")
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def mark(self) -> int:
        return len(self.log())

    def wait_line(self, text: str, *, start: int = 0, timeout: float = 20.0) -> str:
        """The first log line after index `start` containing `text`; fails (with the log) after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[start:]:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                self._reader.join(2.0)
                for line in self.log()[start:]:
                    if text in line:
                        return line
                raise AssertionError(f"willi exited ({self.proc.returncode}) before logging {text!r}:\n"
                                     + "\n".join(self.log()))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log within {timeout}s:\n" + "\n".join(self.log()))
            time.sleep(0.02)

    def started(self, timeout: float = 30.0) -> Foreground:
        self.wait_line("started in the foreground", timeout=timeout)
        return self

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(2.0)
        return status

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not end; always reaps the child."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(2.0)


@contextmanager
def foreground(config: Path, *extra: str) -> Iterator[Foreground]:
    process = Foreground(config, *extra)
    try:
        yield process
    finally:
        process.stop()


# ---------------------------------------------------------------- the transaction log


class TxLog(logging.Handler):
    """Collects the messages of the `willi.transaction` logger (one per transaction)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._lock_list = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_list:
            self.messages.append(record.getMessage())

    def records(self) -> list[dict[str, str]]:
        with self._lock_list:
            return [parse_logfmt(m) for m in self.messages]

    def wait(self, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
        """At least `count` lines (fails after `timeout`); then a short grace for any extra line."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} log lines: {self.messages}"
            time.sleep(0.01)
        return self.records()


@contextmanager
def transaction_log() -> Iterator[TxLog]:
    """Attach a TxLog to `willi.transaction` (at info, as in production) while the block runs."""
    logger = logging.getLogger(TRANSACTION_LOGGER)
    handler = TxLog()
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextmanager
def all_logs() -> Iterator[TxLog]:
    """Every message of every `willi.*` logger at debug, with tracebacks, for secret-leak checks."""
    logger = logging.getLogger("willi")

    class Everything(TxLog):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            with self._lock_list:
                self.messages.append(text)

    handler = Everything()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def parse_logfmt(line: str) -> dict[str, str]:
    """`a=1 b="x \\"y\\"" c=` -> {"a": "1", "b": 'x "y"', "c": ""}: inside quotes \\" and \\\\ are undone."""
    fields: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i >= n:
            break
        eq = line.index("=", i)
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            value = []
            while line[i] != '"':
                if line[i] == "\\" and line[i + 1] in '"\\':  # Willi escapes only these two; \x1b stays as is
                    i += 1
                value.append(line[i])
                i += 1
            i += 1
            fields[key] = "".join(value)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            fields[key] = line[i:end]
            i = end
    return fields


# ---------------------------------------------------------------- a throw-away service user


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a system user is created, files are made unreadable for it)")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")


@contextmanager
def system_user() -> Iterator[str]:
    """A system user (useradd -r, no home, no login) that exists only inside the block."""
    require_root()
    name = f"willi-t{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        if subprocess.run(["getent", "group", name], capture_output=True, timeout=30).returncode == 0:
            subprocess.run(["groupdel", name], capture_output=True, timeout=30)
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:
            raise AssertionError(f"system user {name} could not be removed")


@contextmanager
def shared_directory() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is under a 0700 directory)."""
    directory = Path(tempfile.mkdtemp(prefix="willi-pm-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)

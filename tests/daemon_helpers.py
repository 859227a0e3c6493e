"""Starting Willi as a real daemon process in tests, watching it, stopping it.

A daemonized Willi is a grandchild of the `willi` command the test runs: the
command exits once the daemon is ready. `Reaper` makes this test process a
child subreaper (prctl PR_SET_CHILD_SUBREAPER) while a test runs, so the
daemon is re-parented to the test, which can then collect its exit status;
without that (no prctl) the helpers fall back to watching /proc. Only
processes a test started are signalled, by PID, and every wait is bounded.
"""

from __future__ import annotations

import ctypes
import os
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def set_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_state(pid: int) -> str | None:
    """The /proc state letter (R, S, Z, ...) or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_exit(pid: int, timeout: float = STOP_TIMEOUT) -> int | None:
    """Wait for `pid` to end; its exit status when it is our child, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not alive(pid):
                return None
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running after {timeout}s")
        time.sleep(0.05)


class Reaper:
    """Tracks daemon PIDs a test started; `cleanup` stops the survivors."""

    def __init__(self) -> None:
        self.subreaper = set_subreaper(True)
        self.pids: list[int] = []

    def track(self, pid: int) -> None:
        if pid not in self.pids:
            self.pids.append(pid)

    def cleanup(self) -> None:
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
                try:
                    wait_exit(pid, 10.0)
                except AssertionError:
                    os.kill(pid, signal.SIGKILL)
            try:
                wait_exit(pid, 5.0)
            except AssertionError:
                pass
        if self.subreaper:
            set_subreaper(False)


class WilliDaemon:
    """One configuration in a directory, and the daemon started from it."""

    def __init__(self, command: Sequence[str], config: Path, pidfile: Path, logfile: Path,
                 port: int, reaper: Reaper) -> None:
        self.command = list(command)
        self.config = config
        self.pidfile = pidfile
        self.logfile = logfile
        self.port = port
        self.reaper = reaper
        self.pid: int | None = None

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the start command; it returns once the daemon is ready (or failed)."""
        result = subprocess.run([*self.command, "-c", str(self.config), *args], capture_output=True,
                                text=True, timeout=START_TIMEOUT, env=env, cwd="/")
        pid = self.read_pid()
        if pid is not None and alive(pid):
            self.reaper.track(pid)
        return result

    def start(self) -> int:
        """Start and insist on success; returns the daemon's PID from the pidfile."""
        result = self.run()
        assert result.returncode == 0, f"start failed ({result.returncode}): {result.stderr}"
        pid = self.read_pid()
        assert pid is not None, f"no pid in {self.pidfile}; stderr: {result.stderr}"
        assert alive(pid), f"pid {pid} from {self.pidfile} is not running"
        self.pid = pid
        return pid

    def read_pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def signal(self, signum: int) -> None:
        assert self.pid is not None and alive(self.pid)
        os.kill(self.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait for the exit; the exit status when known."""
        self.signal(signal.SIGTERM)
        return wait_exit(self.pid, timeout)  # type: ignore[arg-type]

    def log(self, path: Path | None = None) -> str:
        try:
            return (path or self.logfile).read_text()
        except OSError:
            return ""

    def wait_log(self, text: str, *, start: int = 0, timeout: float = 10.0, path: Path | None = None) -> str:
        """Wait until `text` appears in the log after character `start`; return that line."""
        found: list[str] = []

        def seen() -> bool:
            for line in self.log(path)[start:].splitlines():
                if text in line:
                    found.append(line)
                    return True
            return False

        try:
            wait_until(seen, timeout, f"{text!r} in {path or self.logfile}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log so far:\n{self.log(path)}") from None
        return found[0]

    def send(self, to: str = "b@example.com", body: str = "hello") -> tuple[int, bytes]:
        """One message through the daemon; returns the reply to the final dot."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as client:
            client.ehlo("client.example")
            client.mail("a@sender.example")
            code, text = client.rcpt(to)
            assert code == 250, f"RCPT {to}: {code} {text!r}"
            return client.data(f"Subject: test\r\n\r\n{body}\r\n")

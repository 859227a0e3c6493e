"""Starting Willi as a real process in tests (daemon or `-f`), watching it and its workers, stopping it.

A daemonized Willi is a grandchild of the `willi` command the test runs: the
command exits once the daemon is ready. `Reaper` makes this test process a
child subreaper (prctl PR_SET_CHILD_SUBREAPER) while a test runs, so the
daemon is re-parented to the test, which can then collect its exit status;
without that (no prctl) the helpers fall back to watching /proc. Only
processes a test started are signalled, by PID, and every wait is bounded.

With `workers` > 1 the process named by the pidfile is the supervising
parent and the workers are its children. The helpers find them in /proc,
tell which worker holds a client's connection (the socket inode of the
connection in /proc/net/tcp, then the worker whose /proc/PID/fd links to
`socket:[inode]`), and can make a new connection land on a chosen worker by
stopping the others (SIGSTOP) until it was accepted: the workers share one
listening socket, so only a running worker can accept.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from support import RawClient

PR_SET_CHILD_SUBREAPER = 36
#: `python3 willi.py` from this checkout: how the daemon tests start Willi.
CHECKOUT_COMMAND = [sys.executable, str(Path(__file__).resolve().parents[1] / "willi.py")]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def write_routes(path: Path, routes: dict[str, int]) -> None:
    """The routing CSV: pattern -> a loopback port, unverified (the fakes have no certificate)."""
    lines = ["pattern;server;tls_verify"] + [f"{k};127.0.0.1:{port};false" for k, port in routes.items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def config_text(directory: Path, port: int, extra: str = "", logfile: str | None = None, workers: int | str = 1,
                *, read_timeout: str = "10s", shutdown_timeout: str = "10s") -> str:
    """A daemon test's willi.toml: pidfile and log file in `directory`, routes from its routes.csv."""
    logfile = logfile or f"{directory}/willi.log"
    shown_workers = f'"{workers}"' if isinstance(workers, str) else str(workers)
    return (
        f'listen = "127.0.0.1:{port}"\n'
        'domain = "mx.willi.test"\nclient_name_lookup = false\nloglevel = "info"\n'
        'upstream_command_timeout = "5s"\nupstream_connect_timeout = "3s"\n'
        f'read_timeout = "{read_timeout}"\nstress_read_timeout = "{read_timeout}"\n'
        f'shutdown_timeout = "{shutdown_timeout}"\n'
        f"workers = {shown_workers}\n"
        f'pidfile = "{directory}/run/willi.pid"\nlogfile = "{logfile}"\n'
        f"{extra}\n"
        f'[[mappings]]\ntype = "csv"\nfile = "{directory}/routes.csv"\nreload_interval = "1h"\n'
    )


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


def stopped(pid: int) -> bool:
    """Every thread of `pid` is in the stopped state (after SIGSTOP; the leader alone says little)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t"):
            return False
    return True


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (every thread's children, from /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found += [int(child) for child in text.split()]
    return sorted(child for child in set(found) if alive(child))


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _ports(field: str) -> int:
    return int(field.rsplit(":", 1)[1], 16)


def connection_inode(server_port: int, client_port: int) -> int | None:
    """The socket inode of the server's end of the TCP connection from `client_port` (None: not accepted)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if _ports(fields[1]) == server_port and _ports(fields[2]) == client_port and fields[9] != "0":
                return int(fields[9])
    return None


def listening_inode(port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if _ports(fields[1]) == port and fields[3] == "0A":  # LISTEN
                return int(fields[9])
    return None


def holders(inode: int, pids: Sequence[int]) -> list[int]:
    """Which of `pids` have a descriptor on socket `inode`."""
    link = f"socket:[{inode}]"
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def others_stopped(others: Sequence[int]) -> Iterator[None]:
    """`others` SIGSTOPped (every thread) for the block, SIGCONT after: a new connection goes to the worker left."""
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(stopped(pid) for pid in others), 5.0, "workers to stop")
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


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


class Sent(NamedTuple):
    """What `send_on` saw: the reply to the final dot, and the client's port (the log's `client=`)."""

    code: int
    lines: list[str]
    port: int


SERVING = (re.compile(r"worker processes serving: ([0-9, ]+)"), re.compile(r"\(pid ([0-9]+)\) serving"))


class WilliDaemon:
    """One configuration in a directory, and the daemon started from it."""

    def __init__(self, command: Sequence[str], config: Path, pidfile: Path, logfile: Path,
                 port: int, reaper: Reaper, workers: int = 1) -> None:
        self.command = list(command)
        self.config = config
        self.pidfile = pidfile
        self.logfile = logfile
        self.port = port
        self.reaper = reaper
        self.workers = workers
        self.pid: int | None = None
        self._serving: set[int] = set()

    @property
    def processes(self) -> int:
        """How many processes act on a signal: the one, or the parent and each worker."""
        return 1 if self.workers == 1 else self.workers + 1

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

    def count_log(self, text: str, *, start: int = 0, path: Path | None = None) -> int:
        return sum(1 for line in self.log(path)[start:].splitlines() if text in line)

    def wait_log_count(self, text: str, count: int, *, start: int = 0, timeout: float = 10.0,
                       path: Path | None = None) -> None:
        """Wait until `text` is in `count` lines after `start` (e.g. once per process after a signal)."""
        try:
            wait_until(lambda: self.count_log(text, start=start, path=path) >= count, timeout,
                       f"{count} x {text!r} in {path or self.logfile}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log so far:\n{self.log(path)}") from None

    def wait_everywhere(self, text: str, *, start: int = 0, timeout: float = 10.0, path: Path | None = None) -> None:
        """`text` logged by every process (after a signal the parent relays to the workers)."""
        self.wait_log_count(text, self.processes, start=start, timeout=timeout, path=path)

    # ---------------------------------------------------------- workers

    def serving_pids(self) -> set[int]:
        """Every PID the log says became a serving worker (remembered: a test may move the log file)."""
        for line in self.log().splitlines():
            for pattern in SERVING:
                match = pattern.search(line)
                if match:
                    self._serving.update(int(p) for p in match.group(1).replace(",", " ").split())
        return set(self._serving)

    def worker_pids(self) -> list[int]:
        """The serving workers now: children of the parent that the log reported serving."""
        assert self.pid is not None
        serving = self.serving_pids()
        return [pid for pid in children(self.pid) if pid in serving]

    def wait_workers(self, count: int | None = None, *, without: Sequence[int] = (), timeout: float = 20.0,
                     ) -> list[int]:
        """Wait until exactly `count` (default: `workers`) workers serve, none of them in `without`."""
        count = self.workers if count is None else count
        found: list[int] = []

        def ready() -> bool:
            found[:] = self.worker_pids()
            return len(found) == count and len(children(self.pid)) == count \
                and not set(found) & set(without)  # type: ignore[arg-type]

        try:
            wait_until(ready, timeout, f"{count} serving workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {found}; log so far:\n{self.log()}") from None
        for pid in found:
            self.reaper.track(pid)
        return list(found)

    def holder(self, client: RawClient) -> int:
        """The process holding the server side of `client`'s connection (after its greeting)."""
        assert self.pid is not None
        inode = connection_inode(self.port, client.sock.getsockname()[1])
        assert inode is not None, "the connection was not accepted"
        found = holders(inode, [self.pid, *children(self.pid)])
        assert len(found) == 1, f"socket:[{inode}] held by {found}"
        return found[0]

    def connect_on(self, worker: int, *, source: str | None = None) -> tuple[RawClient, tuple[int, list[str]]]:
        """A new connection accepted by `worker` (the others are stopped meanwhile); it and its first reply.

        For a 220 the connection is checked to be `worker`'s; a refusal
        (421) is closed by then, so it cannot be.
        """
        serving = self.worker_pids() if self.workers > 1 else [self.pid]
        assert worker in serving, f"{worker} is not among the serving processes {serving}"
        with others_stopped([pid for pid in serving if pid != worker]):
            client = RawClient("127.0.0.1", self.port, source=source)
            try:
                first = client.reply()
            except BaseException:
                client.close()
                raise
        if first[0] == 220:
            held = self.holder(client)
            assert held == worker, f"the connection landed on {held}, not {worker}"
        return client, first

    def send_on(self, worker: int, to: str = "b@example.com", body: str = "hello") -> Sent:
        """One message over a connection accepted by `worker`: the reply to the final dot, the client's port."""
        client, greeting = self.connect_on(worker)
        port = client.sock.getsockname()[1]
        try:
            assert greeting[0] == 220, greeting
            client.send("EHLO client.example\r\n")
            client.expect(250)
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            code, lines = client.cmd(f"RCPT TO:<{to}>")
            assert code == 250, f"RCPT {to}: {code} {lines}"
            assert client.cmd("DATA")[0] == 354
            client.send(f"Subject: test\r\n\r\n{body}\r\n.\r\n")
            code, lines = client.reply()
            client.cmd("QUIT")
            return Sent(code, lines, port)
        finally:
            client.close()

    def send(self, to: str = "b@example.com", body: str = "hello") -> tuple[int, bytes]:
        """One message through the daemon; returns the reply to the final dot."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as client:
            client.ehlo("client.example")
            client.mail("a@sender.example")
            code, text = client.rcpt(to)
            assert code == 250, f"RCPT {to}: {code} {text!r}"
            return client.data(f"Subject: test\r\n\r\n{body}\r\n")


class ForegroundWilli(WilliDaemon):
    """`willi -f`: the process the test starts is Willi itself; its log (stderr) goes to `logfile`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> int:  # type: ignore[override]
        """Start and wait until it says it serves; its PID."""
        with open(self.logfile, "ab") as stderr:
            self.proc = subprocess.Popen([*self.command, "-f", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr, cwd="/", preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.reaper.track(self.pid)
        try:
            wait_until(lambda: "started in the foreground" in self.log() or self.proc.poll() is not None,
                       START_TIMEOUT, "the foreground willi to start")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log so far:\n{self.log()}") from None
        assert self.proc.poll() is None, f"willi -f exited with {self.proc.returncode}:\n{self.log()}"
        return self.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the exit; its status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"willi -f still running after {timeout}s; log:\n{self.log()}") from None

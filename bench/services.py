"""The processes a benchmark run starts: smtp-sink upstreams and Willi checkouts.

Each is started in its own session (a Ctrl-C at the terminal reaches only
the benchmark, which then stops them in order) and stopped by its PID:
SIGTERM, a bounded wait, then SIGKILL, for the process and for any
descendant (a Willi worker) that outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import proctree

try:
    import tomllib as toml_parser
except ImportError:  # Python < 3.11: the project's own dependency
    import toml as toml_parser  # type: ignore[no-redef]

SINK_BACKLOG = 4096  # smtp-sink's listen(2) backlog: never the bottleneck of "direct"
SINK_MAX_CONNECTIONS = 1024  # smtp-sink -m (default 256)
KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


class StartError(RuntimeError):
    """A service did not come up; the message names its log file."""


def free_port() -> int:
    """A loopback port nobody uses right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A process the benchmark started, with its output in files."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, stdout_path: Path | None = None) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self._files: list[IO[bytes]] = [log_path.open("wb")]
        stdout: IO[bytes] | int = subprocess.DEVNULL
        if stdout_path is not None:
            stdout = stdout_path.open("wb")
            self._files.append(stdout)
        try:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                          stderr=self._files[0], start_new_session=True)
        except BaseException:
            for f in self._files:
                f.close()
            raise
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 35.0) -> None:
        """SIGTERM by PID, wait up to `grace` s, then SIGKILL; the same for leftover descendants."""
        family = [s for s in proctree.tree(self.pid) if s.pid != self.pid]
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:  # a second Ctrl-C: no more waiting
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"ignored SIGTERM for {grace:.0f} s"
                print(f"bench: {self.name} (pid {self.pid}) {why}; SIGKILL", file=sys.stderr)
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(proctree.still_running(s) for s in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        for stat in family:
            if proctree.still_running(stat):
                os.kill(stat.pid, signal.SIGKILL)
        for f in self._files:
            f.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_listening(port: int, child: Child, timeout: float, greeting: bool) -> None:
    """Wait until the port accepts (and, with `greeting`, says 220); bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartError(f"{child.name} exited with status {child.popen.returncode}; log: {child.log_path}\n"
                             f"{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if not greeting:
                    return
                line = s.makefile("rb").readline(1000)
                if line.startswith(b"220"):
                    return
                problem = f"greeting {line!r}"
        except OSError as exc:
            problem = str(exc)
        time.sleep(0.05)
    raise StartError(f"{child.name} did not answer on 127.0.0.1:{port} within {timeout:.0f} s ({problem}); "
                     f"log: {child.log_path}")


def last_count(counters: bytes) -> int:
    """The last complete "mesg=N" in smtp-sink -c output ("sess=1 quit=1 mesg=1\\r" per update)."""
    found = re.findall(rb"mesg=(\d+)\r", counters)
    return int(found[-1]) if found else 0


class Sink:
    """One smtp-sink, counting the messages it receives (-c writes "mesg=N" to stdout)."""

    def __init__(self, workdir: Path, xclient: bool) -> None:
        self.port = free_port()
        self.xclient = xclient
        name = "sink-xclient" if xclient else "sink-noxclient"
        self.counter_path = workdir / f"{name}.counters"
        user = ["-u", "postfix"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root without -u
        argv = ["smtp-sink", *user, "-c", "-m", str(SINK_MAX_CONNECTIONS), *([] if xclient else ["-C"]),
                f"127.0.0.1:{self.port}", str(SINK_BACKLOG)]
        self.child = Child(name, argv, workdir / f"{name}.log", stdout_path=self.counter_path)
        try:
            wait_listening(self.port, self.child, timeout=10, greeting=True)
        except BaseException:
            self.child.stop(grace=5)
            raise

    def messages(self) -> int:
        """Messages received so far (the last "mesg=" counter smtp-sink printed)."""
        with self.counter_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            return last_count(f.read())

    def wait_messages(self, at_least: int, timeout: float = 3.0) -> int:
        """The counter once it reaches `at_least`, or whatever it is after `timeout` s."""
        deadline = time.monotonic() + timeout
        count = self.messages()
        while count < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
            count = self.messages()
        return count

    def stop(self) -> None:
        self.child.stop(grace=5)


@dataclass(frozen=True)
class WilliSpec:
    """One checkout to compare: --willi LABEL=DIR[,key=value,...]."""

    label: str
    directory: Path
    extra: dict[str, str] = field(default_factory=dict)  # key -> TOML value text

    def describe(self) -> str:
        extra = "".join(f", {k} = {v}" for k, v in self.extra.items())
        return f"{self.directory} ({git_revision(self.directory)}){extra}"


def toml_value(text: str) -> str:
    """`2`, `false`, `"x"`, `[1, 2]` stay as written; anything else (`30s`) becomes a TOML string."""
    try:
        toml_parser.loads(f"v = {text}")
        return text
    except ValueError:
        return json.dumps(text)


def parse_willi(arg: str) -> WilliSpec:
    """Parse LABEL=DIR[,key=value,...]; raise ValueError with a readable reason."""
    label, sep, rest = arg.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"{arg!r}: expected LABEL=DIR[,key=value,...]")
    if label == "direct" or not KEY_RE.fullmatch(label):
        raise ValueError(f"{arg!r}: the label must be letters, digits, '-' or '_', and not 'direct'")
    directory, *pairs = rest.split(",")
    path = Path(directory).expanduser().resolve()
    if not (path / "willi.py").is_file() or not (path / "willi").is_dir():
        raise ValueError(f"{arg!r}: {path} holds no willi.py and willi/ package")
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not KEY_RE.fullmatch(key):
            raise ValueError(f"{arg!r}: {pair!r} is not key=value")
        extra[key] = toml_value(value.strip())
    return WilliSpec(label, path, extra)


def git_revision(directory: Path) -> str:
    """Short commit of the checkout, "+dirty" with uncommitted changes; "?" outside git."""
    if shutil.which("git") is None:
        return "?"
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def willi_config(port: int, sink_port: int, extra: dict[str, str]) -> str:
    """The generated configuration: our settings, then the user's extra keys (which win)."""
    settings = {
        "listen": json.dumps(f"127.0.0.1:{port}"),
        "domain": json.dumps("bench.willi.test"),
        "loglevel": json.dumps("info"),  # the one line per transaction is part of the real cost
        "max_connections": "30000",
        "max_connections_per_ip": "30000",  # every benchmark client is 127.0.0.1
        **extra,
    }
    lines = [f"{key} = {value}" for key, value in settings.items()]
    lines += ["", "[[mappings]]", 'type = "static"', f'server = "127.0.0.1:{sink_port}"', "tls_verify = false", ""]
    return "\n".join(lines)


class Willi:
    """One running Willi checkout, relaying to one sink."""

    def __init__(self, spec: WilliSpec, sink: Sink, workdir: Path, tag: str) -> None:
        self.spec = spec
        self.port = free_port()
        config = workdir / f"willi-{spec.label}-{tag}.toml"
        config.write_text(willi_config(self.port, sink.port, spec.extra))
        env = {**os.environ, "PYTHONPATH": str(spec.directory)}
        argv = [sys.executable, str(spec.directory / "willi.py"), "-c", str(config), "-f"]
        self.child = Child(f"willi {spec.label}", argv, workdir / f"willi-{spec.label}-{tag}.log",
                           cwd=spec.directory, env=env)
        try:
            wait_listening(self.port, self.child, timeout=30, greeting=True)
        except BaseException:
            self.child.stop()
            raise

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self) -> None:
        self.child.stop()

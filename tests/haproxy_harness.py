"""A private HAProxy in front of test Willis, run from packaging/haproxy.cfg.example.

The configuration users get is the one the tests run: `render_config` takes
the example's defaults, frontend and backend sections as they are and
changes only what must differ on a test machine: the global section (no
user switch, no daemon, no syslog; a stats socket in the test's directory),
the frontend's bind lines (one loopback address on a free port) and the
server lines (the test's Willis). HAProxy runs in the foreground (`-db`) as
a child of the test, is asked for its servers' states over the stats
socket, and is stopped by its PID; the system's HAProxy (if any) is never
touched.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
EXAMPLE = Path(__file__).resolve().parents[1] / "packaging" / "haproxy.cfg.example"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class HAProxyError(RuntimeError):
    """HAProxy did not start, answer or stop; the message carries its log."""


def haproxy_unavailable() -> str | None:
    if not Path(HAPROXY).is_file():
        return "HAProxy is not installed (apt-get install haproxy)"
    return None


def require_haproxy() -> None:
    """Skip without HAProxy (tests/conftest.py turns that into a failure in CI)."""
    reason = haproxy_unavailable()
    if reason is not None:
        pytest.skip(reason)


def sections(text: str) -> list[tuple[str, list[str]]]:
    """The configuration as (section header line, its lines), comments and blank lines dropped."""
    result: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            result.append((line, []))
        elif result:
            result[-1][1].append(line)
    return result


def render_config(example: str, directory: Path, bind: tuple[str, int], servers: Sequence[tuple[str, int]]) -> str:
    """The example with a test global section, `bind` for the frontend and `servers` for the backend."""
    out = [
        "global",
        "    log stdout format short local0 info",
        "    maxconn 2000",
        f"    stats socket {directory / 'haproxy.sock'} mode 600 level admin",
        "",
    ]
    seen = {"frontend": False, "backend": False}
    for header, lines in sections(example):
        kind = header.split()[0]
        if kind == "global":
            continue
        out.append(header)
        if kind == "frontend":
            lines = [line for line in lines if line.split()[0] != "bind"]
            lines.insert(0, f"    bind {bind[0]}:{bind[1]}")
            seen["frontend"] = True
        elif kind == "backend":
            template = next((line for line in lines if line.split()[0] == "server"), None)
            if template is None:
                raise ValueError("the example's backend has no server line")
            options = template.split()[3:]
            lines = [line for line in lines if line.split()[0] != "server"]
            lines += [" ".join(["    server", f"willi{i + 1}", f"{host}:{port}", *options])
                      for i, (host, port) in enumerate(servers)]
            seen["backend"] = True
        out += lines
        out.append("")
    if not all(seen.values()):
        raise ValueError(f"the example lacks a section: {seen}")
    return "\n".join(out) + "\n"


class HAProxy:
    """One HAProxy started by a test, in its own directory."""

    def __init__(self, directory: Path, bind: tuple[str, int], servers: Sequence[tuple[str, int]],
                 example: Path = EXAMPLE) -> None:
        self.directory = Path(directory)
        self.bind = bind
        self.servers = list(servers)
        self.config = self.directory / "haproxy.cfg"
        self.log = self.directory / "haproxy.log"
        self.socket_path = self.directory / "haproxy.sock"
        self.example = example
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> HAProxy:
        """Write the configuration, check it with `haproxy -c`, start it, wait for the frontend."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(render_config(self.example.read_text(), self.directory, self.bind, self.servers))
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise HAProxyError(f"haproxy -c rejects the configuration:\n{check.stdout}{check.stderr}")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HAProxyError(f"haproxy exited with {self.process.returncode}\n{self.log_text()}")
            if self._answers():  # the stats socket is made after the listeners are bound
                return self
            time.sleep(0.05)
        self.stop()
        raise HAProxyError(f"haproxy did not listen on {self.bind} within {START_TIMEOUT:g}s\n{self.log_text()}")

    def _answers(self) -> bool:
        """The stats socket answers (not by connecting to the frontend: that would open a session to a Willi)."""
        if not self.socket_path.exists():
            return False
        try:
            return "Pid:" in self.command("show info")
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One command on the stats socket (`show stat`, ...), its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def server_states(self) -> dict[str, str]:
        """Backend server name -> status (UP, DOWN, "UP 1/2", MAINT, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row["status"] for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_states(self, wanted: dict[str, str], timeout: float) -> float:
        """Wait until each named server has its status; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.server_states()
            if all(states.get(name) == status for name, status in wanted.items()):
                return time.monotonic() - started
            time.sleep(0.1)
        raise HAProxyError(f"servers not {wanted} within {timeout:g}s: {states}\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM by PID (HAProxy's immediate stop), SIGKILL if it lingers; bounded."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)


def example_servers(example: Path = EXAMPLE) -> list[str]:
    """The server lines of the example as written (for checks of the shipped file)."""
    return [line.strip() for header, lines in sections(example.read_text()) if header.startswith("backend")
            for line in lines if re.match(r"\s*server\s", line)]

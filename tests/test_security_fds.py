"""Issue 7, point 5: out of file descriptors, Willi backs off, logs once and recovers.

Willi runs as a real process (`willi.py -c CONF -f`) with RLIMIT_NOFILE
lowered, and idle clients take every descriptor it has. While it is starved
its accept loop must sleep (not spin: CPU time read from /proc), say so once
in the log, tell a waiting client `421 4.3.2` with the descriptor it holds in
reserve (or leave it waiting in the backlog), and serve again as soon as
descriptors come back.
"""

from __future__ import annotations

import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import free_port, wait_until
from fakeupstream import FakeUpstream
from security_helpers import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
NOFILE = 64
CLIENTS = 120

pytestmark = pytest.mark.slow


def limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class StarvedWilli:
    """A Willi process with few descriptors, its log (stderr) and the clients holding them."""

    def __init__(self, directory: Path, upstream_port: int) -> None:
        self.port = free_port()
        self.config = directory / "willi.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\ndomain = "mx.willi.test"\nclient_name_lookup = false\nworkers = 1\n'
            'read_timeout = "60s"\nmax_connections = 1000\nmax_connections_per_ip = 1000\n'
            f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{upstream_port}"\ntls_verify = false\n')
        self.logfile = directory / "stderr.log"
        self.log_handle = self.logfile.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "willi.py"), "-c", str(self.config), "-f"],
                                     stdout=subprocess.DEVNULL, stderr=self.log_handle, cwd=ROOT,
                                     preexec_fn=limit_descriptors)
        self.clients: list[socket.socket] = []
        self.received: dict[socket.socket, bytes] = {}

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def listening(self) -> bool:
        return f"listening on 127.0.0.1:{self.port}" in self.log()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.clients.append(sock)
        self.received[sock] = b""
        return sock

    def collect(self, wait: float = 0.2) -> None:
        """Read whatever the clients have been sent so far (greetings, 421s, EOF)."""
        deadline = time.monotonic() + wait
        while True:
            open_ = [s for s in self.clients if s.fileno() >= 0]
            ready, _, _ = select.select(open_, [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            for sock in ready:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                self.received[sock] += data if data else b"<EOF>"
                if not data:
                    sock.close()

    def greeted(self) -> list[socket.socket]:
        return [s for s, data in self.received.items() if data.startswith(b"220 ")]

    def refused(self) -> list[socket.socket]:
        return [s for s, data in self.received.items() if data.startswith(b"421 4.3.2")]

    def stop(self) -> None:
        for sock in self.clients:
            sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_handle.close()


@pytest.fixture
def starved(tmp_path: Path) -> Iterator[StarvedWilli]:
    upstream = FakeUpstream().start()
    willi = StarvedWilli(tmp_path, upstream.port)
    try:
        wait_until(willi.listening, 20, "Willi to listen")
        yield willi
    finally:
        willi.stop()
        upstream.stop()


def test_out_of_descriptors_backs_off_logs_once_and_recovers(starved: StarvedWilli) -> None:
    for _ in range(CLIENTS):  # the kernel completes the handshakes (backlog) whether Willi accepts or not
        starved.connect()
    wait_until(lambda: "cannot accept connections" in starved.log(), 15, "the starvation to be logged")
    starved.collect(1.0)
    held = len(starved.greeted())
    assert 0 < held < NOFILE, held  # some were served until the descriptors ran out, not all

    # Starved: the accept loop sleeps between attempts instead of spinning.
    before = cpu_seconds(starved.proc.pid)
    time.sleep(3.0)
    used = cpu_seconds(starved.proc.pid) - before
    assert used < 0.6, f"{used:.2f} s of CPU in 3 s while out of descriptors"
    starved.collect(0.5)
    assert starved.log().count("cannot accept connections") == 1, starved.log()
    # Waiting clients: told 421 4.3.2 with the reserve descriptor, or still waiting in the backlog.
    for data in starved.received.values():
        assert data == b"" or data.startswith((b"220 ", b"421 4.3.2")), data
    assert starved.refused(), "the reserve descriptor was never used to tell a client 421 4.3.2"

    # Descriptors come back: every client leaves (the served ones politely), then new ones are served.
    for sock in starved.greeted():
        sock.sendall(b"QUIT\r\n")
    for sock in starved.clients:
        sock.close()
    fresh = socket.create_connection(("127.0.0.1", starved.port), timeout=15)
    try:
        wait_until(lambda: "accepting connections again" in starved.log(), 15, "the recovery to be logged")
        fresh.settimeout(15)
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = fresh.recv(512)
            assert chunk, "connection closed without a greeting"
            greeting += chunk
        assert greeting.startswith(b"220 "), greeting
    finally:
        fresh.close()
    assert starved.proc.poll() is None, "Willi died"

"""Prometheus metrics from a running Willi: `metrics_listen`, GET /metrics, with one process and with workers.

/metrics is served by the main loop (the single process's, or the
supervisor's), which does not run when Willi is started in-process, so these
tests start `python3 willi.py -c CONF -f` as a subprocess, send mail through
it to fake upstreams, and read /metrics over HTTP, parsing it with
prometheus_client's own text parser. With `workers = 2`, which worker serves
which connection is found from /proc (the socket inode of the accepted
connection in each worker's descriptors), so that a test can make sure both
workers served, and kill the one that holds connections.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_helpers import alive, free_port, others_stopped, wait_until
from fakeupstream import FakeUpstream
from prometheus_client.parser import text_string_to_metric_families
from support import RawClient

from willi.resolver import metric_labels

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: The labels Willi may use; anything else could carry an address or grow without bound.
ALLOWED_LABELS = {"result", "mapping", "le"}
REQUIRED = ("willi_connections_total", "willi_connections_active", "willi_transactions_total",
            "willi_recipients_total", "willi_upstream_connects_total", "willi_upstream_connect_seconds_bucket",
            "willi_lookup_seconds_bucket", "willi_lookup_cache_total", "willi_message_bytes_bucket")

pytestmark = pytest.mark.slow

Samples = list[tuple[str, dict[str, str], float]]


# ---------------------------------------------------------------- a Willi process


@dataclass
class WilliProcess:
    """One foreground Willi (`-f`) started by a test, and where to reach it."""

    process: subprocess.Popen[bytes]
    config: Path
    port: int
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def workers(self) -> list[int]:
        """PIDs of the live worker processes (children of this process)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.pid and fields[0] not in ("Z", "X"):
                found.append(int(stat.parent.name))
        return sorted(found)

    def scrape(self) -> tuple[str, str]:
        """(content type, body) of GET /metrics."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read().decode("utf-8")
            assert response.status == 200, (response.status, body)
            return response.getheader("Content-Type") or "", body
        finally:
            conn.close()

    def samples(self) -> Samples:
        _, body = self.scrape()
        return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(body)
                for s in family.samples]

    def client(self) -> RawClient:
        return RawClient("127.0.0.1", self.port)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def config_text(directory: Path, port: int, metrics_port: int, workers: int, routes: dict[str, int],
                fallback: int) -> str:
    table = directory / "routes.csv"
    table.write_text("pattern;server;tls_verify\n" + "".join(f"{p};127.0.0.1:{u};false\n" for p, u in routes.items()))
    return (
        f'listen = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\nworkers = {workers}\n'
        'domain = "mx.willi.test"\nclient_name_lookup = false\nloglevel = "info"\nupstream_reuse = false\n'
        'upstream_connect_timeout = "3s"\nupstream_command_timeout = "5s"\nread_timeout = "30s"\n'
        'shutdown_timeout = "5s"\n'
        f'[[mappings]]\ntype = "csv"\nfile = "{table}"\n'
        f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{fallback}"\ntls_verify = false\n'
    )


@pytest.fixture
def upstreams(fake_upstream: Callable[..., FakeUpstream]) -> tuple[FakeUpstream, FakeUpstream]:
    """example.com's upstream (refuses one recipient, defers another), example.net's (also the fallback)."""
    first = fake_upstream(rcpt_replies={"reject@example.com": "550 5.1.1 No such user",
                                        "defer@example.com": "450 4.2.1 Mailbox busy"})
    return first, fake_upstream()


@pytest.fixture
def start_willi(tmp_path: Path, upstreams) -> Iterator[Callable[[int], WilliProcess]]:
    started: list[WilliProcess] = []

    def start(workers: int) -> WilliProcess:
        first, second = upstreams
        port, metrics_port = free_port(), free_port()
        config = tmp_path / f"willi-{len(started)}.toml"
        config.write_text(config_text(tmp_path, port, metrics_port, workers,
                                      {"example.com": first.port, "example.net": second.port}, second.port))
        log = tmp_path / f"willi-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, str(ROOT / "willi.py"), "-c", str(config), "-f"],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/")
        running = WilliProcess(process, config, port, metrics_port, log)
        started.append(running)
        try:
            # Not by connecting to the SMTP port: that would count as a connection. Once /metrics answers,
            # the SMTP listener is bound too (it is bound first), and a client waits in its backlog.
            wait_until(lambda: accepting(metrics_port) and len(running.workers()) >= (workers if workers > 1 else 0),
                       START_TIMEOUT, "willi to listen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{running.log_text()}") from None
        return running

    yield start
    for running in started:
        running.stop()


# ---------------------------------------------------------------- reading the samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample called `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for n, sample_labels, v in samples if n == name and labels.items() <= sample_labels.items())


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {sample_labels[label] for n, sample_labels, _ in samples if n == name and label in sample_labels}


def looks_like_an_address(text: str) -> bool:
    """Any IPv4/IPv6 address, host:port or bracketed address inside a label value."""
    if re.search(r"\d{1,3}(\.\d{1,3}){3}", text) or re.search(r"\[[0-9A-Fa-f]*[:.][0-9A-Fa-f:.]*\]", text):
        return True
    if re.search(r"[\w.-]+:\d{1,5}\b", text):
        return True
    for token in re.split(r"[\s/@,;=]+", text):
        try:
            ipaddress.ip_address(token.strip("[]"))
            return True
        except ValueError:
            continue
    return False


@pytest.mark.parametrize("text", ["127.0.0.1", "static:127.0.0.1:2525", "sql:u@[::1]:3306/db", "::1",
                                  "mx.example.net:25", "2001:db8::5"])
def test_address_detector_finds_addresses(text) -> None:
    assert looks_like_an_address(text)


@pytest.mark.parametrize("text", ["accept", "tempfail", "0.005", "+Inf", "300.0", "csv", "static", "sql[2]", "hit"])
def test_address_detector_passes_plain_labels(text) -> None:
    assert not looks_like_an_address(text)


@pytest.mark.parametrize(("names", "labels"), [
    (["csv:/etc/willi/routes.csv", "static:10.0.0.7:25"], ["csv", "static"]),
    (["sql:willi@db1.example:3306/mail", "sql:willi@[2001:db8::3]:3306/mail", "static:mx.example:25"],
     ["sql[0]", "sql[1]", "static"]),
    (["static:[::1]:25"], ["static"]),
])
def test_mapping_labels_are_kinds_not_places(names, labels) -> None:
    assert metric_labels(names) == labels
    assert not any(looks_like_an_address(label) for label in labels)


# ---------------------------------------------------------------- traffic


def one_message(client: RawClient, recipients: list[str], *, greeted: bool = False) -> int:
    """MAIL, RCPT each, DATA with a short body: the final reply's code (or DATA's, when refused)."""
    if not greeted:
        client.expect(220)
    client.send("EHLO client.example\r\n")
    client.expect(250)
    client.cmd("MAIL FROM:<alice@sender.example>")
    for recipient in recipients:
        client.cmd(f"RCPT TO:<{recipient}>")
    code, _ = client.cmd("DATA")
    if code != 354:
        return code
    client.send(b"Subject: metrics\r\n\r\nHello.\r\n.\r\n")
    return client.reply()[0]


def quit_and_close(client: RawClient) -> None:
    try:
        client.cmd("QUIT")
    finally:
        client.close()


def send_mix(w: WilliProcess) -> None:
    """Five plain messages, one with a recipient of every kind, one to the static fallback: 7 accepted."""
    for _ in range(5):
        client = w.client()
        assert one_message(client, ["bob@example.com"]) == 250
        quit_and_close(client)
    client = w.client()
    assert one_message(client, ["ok@example.com", "other@example.net", "reject@example.com",
                                "defer@example.com"]) == 250
    quit_and_close(client)
    client = w.client()
    assert one_message(client, ["someone@fallback.test"]) == 250
    quit_and_close(client)


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_text_format_and_values(start_willi, upstreams, workers) -> None:
    w = start_willi(workers)
    send_mix(w)
    wait_until(lambda: value(w.samples(), "willi_connections_active") == 0, 10, "the connections to close")
    content_type, body = w.scrape()
    assert content_type.startswith("text/plain; version="), content_type  # the Prometheus text format
    samples = [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(body) for s in f.samples]
    names = {name for name, _, _ in samples}
    missing = [name for name in REQUIRED if name not in names]
    assert missing == [], sorted(names)
    assert value(samples, "willi_connections_total") == 7
    assert value(samples, "willi_transactions_total", result="accepted") == 7
    assert value(samples, "willi_transactions_total") == 7
    assert value(samples, "willi_recipients_total", result="accept") == 5 + 1 + 1
    assert value(samples, "willi_recipients_total", result="split") == 1
    assert value(samples, "willi_recipients_total", result="reject") == 1
    assert value(samples, "willi_recipients_total", result="tempfail") == 1
    assert value(samples, "willi_upstream_connects_total", result="ok") == 7
    assert value(samples, "willi_upstream_connect_seconds_count") == 7
    assert value(samples, "willi_message_bytes_count") == 7
    assert value(samples, "willi_message_bytes_sum") > 0
    lookups = 5 + 4 + 1
    assert value(samples, "willi_lookup_seconds_count") == lookups
    assert value(samples, "willi_lookup_cache_total") == lookups
    assert value(samples, "willi_lookup_cache_total", result="miss") >= 3  # three distinct keys at least
    assert value(samples, "willi_lookup_cache_total", result="hit") >= 1
    assert len(label_values(samples, "willi_lookup_seconds_count", "mapping")) == 2  # the CSV and the static
    # buckets for SMTP: up to several minutes, and message sizes up to tens of MiB
    buckets = {float(labels["le"]) for name, labels, _ in samples if name == "willi_upstream_connect_seconds_bucket"
               and labels["le"] != "+Inf"}
    assert max(buckets) >= 300 and min(buckets) <= 0.01, sorted(buckets)
    first, second = upstreams
    assert len(first.completed_transactions) + len(second.completed_transactions) == 7


@pytest.mark.parametrize("workers", [1, 2])
def test_labels_never_carry_addresses(start_willi, workers) -> None:
    w = start_willi(workers)
    send_mix(w)
    samples = w.samples()
    for name, labels, _ in samples:
        if not name.startswith("willi_"):
            continue  # prometheus_client's own process and Python metrics (one process only)
        assert set(labels) <= ALLOWED_LABELS, (name, labels)
        for label, text in labels.items():
            assert not looks_like_an_address(text), f"{name}{{{label}={text!r}}} carries an address"


# ---------------------------------------------------------------- several workers


def socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of Willi's end of the connection from `client_port` (from /proc/net/tcp)."""
    local, remote = f":{server_port:04X}", f":{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[2].endswith(remote):
            return fields[9]
    return None


def owner(w: WilliProcess, client: RawClient, workers: list[int]) -> int | None:
    """Which worker holds Willi's end of `client`'s connection."""
    inode = socket_inode(w.port, client.sock.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in workers:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def connect_on(w: WilliProcess, worker: int, workers: list[int]) -> RawClient:
    """A greeted connection accepted by `worker`: the other workers are stopped while it connects.

    Left to the kernel, one worker can win every accept in a row, and the
    per-address limit ends the test before the other worker gets any.
    """
    with others_stopped([pid for pid in workers if pid != worker]):
        client = w.client()
        client.expect(220)
    held = owner(w, client, workers)
    assert held == worker, f"the connection landed on {held}, not {worker}"
    return client


def connections_on_both(w: WilliProcess, workers: list[int], each: int = 2) -> dict[int, list[RawClient]]:
    """`each` greeted connections on every worker."""
    return {pid: [connect_on(w, pid, workers) for _ in range(each)] for pid in workers}


def test_counts_add_up_across_workers(start_willi) -> None:
    w = start_willi(2)
    workers = w.workers()
    assert len(workers) == 2
    held = connections_on_both(w, workers)
    total = sum(len(clients) for clients in held.values())
    assert value(w.samples(), "willi_connections_active") == total
    for clients in held.values():
        for client in clients:
            assert one_message(client, ["bob@example.com"], greeted=True) == 250
            quit_and_close(client)
    wait_until(lambda: value(w.samples(), "willi_connections_active") == 0, 10, "the connections to close")
    samples = w.samples()
    assert value(samples, "willi_connections_total") == total
    assert value(samples, "willi_transactions_total", result="accepted") == total
    assert value(samples, "willi_message_bytes_count") == total


def test_killed_worker_gauge_disappears_counters_stay(start_willi) -> None:
    w = start_willi(2)
    workers = w.workers()
    held = connections_on_both(w, workers)
    victim, survivor = workers
    for client in held[survivor]:  # the survivor's clients also complete a message
        assert one_message(client, ["bob@example.com"], greeted=True) == 250
    total = sum(len(clients) for clients in held.values())
    before = w.samples()
    counted = value(before, "willi_connections_total")
    assert value(before, "willi_connections_active") == total
    assert value(before, "willi_transactions_total") == len(held[survivor])
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 10, "the killed worker to go")
    expected = len(held[survivor])
    try:
        wait_until(lambda: value(w.samples(), "willi_connections_active") == expected, 15,
                   f"willi_connections_active to drop to {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {value(w.samples(), 'willi_connections_active')}; log:\n{w.log_text()}") \
            from None
    for client in held[victim]:
        assert client.closed(), "a connection of the killed worker is still open"
    after = w.samples()
    assert value(after, "willi_connections_total") == counted  # what the dead worker counted is kept
    assert value(after, "willi_transactions_total") == len(held[survivor])
    wait_until(lambda: len(w.workers()) == 2 and victim not in w.workers(), 15, "a replacement worker")
    for client in held[survivor]:
        quit_and_close(client)
    for client in held[victim]:
        client.close()
    wait_until(lambda: value(w.samples(), "willi_connections_active") == 0, 10, "the connections to close")


# ---------------------------------------------------------------- how to scrape it


def test_check_says_how_to_scrape_and_the_advice_works(start_willi) -> None:
    w = start_willi(1)
    result = subprocess.run([sys.executable, str(ROOT / "willi.py"), "-c", str(w.config), "--check"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("metrics:")]
    assert f"http://127.0.0.1:{w.metrics_port}/metrics" in line
    command = re.search(r"quick look: (curl .*)\)$", line)
    assert command is not None, line
    client = w.client()
    assert one_message(client, ["bob@example.com"]) == 250
    quit_and_close(client)
    shown = subprocess.run(["bash", "-c", command.group(1)], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown
    assert 'willi_transactions_total{result="accepted"} 1.0' in shown.stdout, shown.stdout


def test_other_paths_are_not_found(start_willi) -> None:
    w = start_willi(1)
    conn = http.client.HTTPConnection("127.0.0.1", w.metrics_port, timeout=10)
    try:
        conn.request("GET", "/secret")
        assert conn.getresponse().status == 404
    finally:
        conn.close()

"""Issue 7, point 6: everything kept per connection is bounded.

A flood of recipients past `max_recipients` is answered 452 4.5.3 and
counted, not stored: the log line names the first few refused recipients
and `+N more`, memory does not grow with the count, and past
RECIPIENT_OVERSHOOT (1000) excess recipients every further one counts as an
error, so the connection ends with 421 4.7.0 (Postfix's
smtpd_recipient_overshoot_limit). Pipelined junk, huge command lines and
huge or endless upstream replies are bounded too: the upstream's reply
limits (lines, octets per line) make it a protocol error, 451 4.5.0, and the
upstream connection is dropped.

Memory is measured with tracemalloc in this process (Willi runs in a
thread): either the growth between two points of one flood, attributed to
willi/ code, or the peak over the whole exchange while the test itself
allocates nothing big.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from proxy_helpers import static_mapping
from security_helpers import open_transaction, start, transaction_lines
from support import RawClient

import willi
import willi.session
from willi.relay import REFUSED_SHOWN

KIB, MIB = 1024, 1024 * 1024


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start(1)
    yield
    tracemalloc.stop()


#: The package's own directory: "*/willi/*" would also match a checkout that happens to be called willi.
PACKAGE_FILES = os.path.join(os.path.dirname(os.path.abspath(willi.__file__)), "*")


def willi_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes currently allocated by code of the willi package."""
    traces = snapshot.filter_traces([tracemalloc.Filter(True, PACKAGE_FILES)])
    return sum(s.size for s in traces.statistics("filename"))


def flood_rcpts(client: RawClient, count: int, *, batch: int = 500, domain: str = "example.com",
                start_at: int = 0) -> list[int]:
    """`count` pipelined RCPTs in batches; the reply codes (stops early when the connection ends)."""
    codes: list[int] = []
    for first in range(start_at, start_at + count, batch):
        n = min(batch, start_at + count - first)
        client.send("".join(f"RCPT TO:<r{first + i}@{domain}>\r\n" for i in range(n)).encode())
        for _ in range(n):
            try:
                code, _ = client.reply()
            except (ConnectionError, OSError):
                return codes
            codes.append(code)
            if code == 421:
                return codes
    return codes


# ---------------------------------------------------------------- recipients past max_recipients


def test_twenty_thousand_excess_recipients_keep_memory_and_the_log_line_small(
        tmp_path: Path, fake_upstream: Callable[..., FakeUpstream], traced: None) -> None:
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)], max_recipients=10, max_errors=1_000_000)
    try:
        with transaction_lines() as lines:
            client = open_transaction(w)
            try:
                codes = flood_rcpts(client, 1010)
                assert codes[:10] == [250] * 10 and set(codes[10:]) == {452}, set(codes)
                before = willi_bytes(tracemalloc.take_snapshot())
                codes = flood_rcpts(client, 19_000, start_at=1010)
                assert set(codes) == {452} and len(codes) == 19_000
                after = willi_bytes(tracemalloc.take_snapshot())
                assert client.cmd("QUIT")[0] == 221
            finally:
                client.close()
            assert w.service.wait_idle(10)
    finally:
        w.stop()
    # 19,000 more refused recipients cost (almost) nothing: they are counted, not kept.
    assert after - before < 256 * KIB, f"willi/ grew by {(after - before) // KIB} KiB"
    (line,) = lines
    assert len(line) < 2000, len(line)
    refused = re.search(r'refused="([^"]*)"', line)
    assert refused is not None, line
    shown = refused.group(1).split(",")
    assert len(shown) == REFUSED_SHOWN + 1 and shown[-1] == f"+{20_000 - REFUSED_SHOWN} more", refused
    assert shown[0] == "<r10@example.com>:452"
    assert line.count("<r") == 10 + REFUSED_SHOWN  # the ten accepted (to=) and the ten shown (refused=)


def test_overshoot_past_1000_excess_recipients_ends_with_421_470(tmp_path: Path,
                                                                fake_upstream: Callable[..., FakeUpstream]) -> None:
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)], max_recipients=10, max_errors=10)
    try:
        with transaction_lines() as lines:
            client = open_transaction(w)
            try:
                codes = flood_rcpts(client, 20_000)
                assert client.closed(5)
            finally:
                client.close()
            assert w.service.wait_idle(10)
    finally:
        w.stop()
    assert codes[:10] == [250] * 10
    excess = codes[10:-1]
    assert set(excess) == {452}
    overshoot = willi.session.RECIPIENT_OVERSHOOT
    assert overshoot < len(excess) <= overshoot + 10, len(excess)
    assert codes[-1] == 421
    # The transaction cut short is still logged, once.
    assert len(lines) == 1 and "result=aborted" in lines[0] and "error_src=client" in lines[0], lines
    assert upstream.completed_transactions == []


def test_relay_denied_floods_end_at_max_errors(tmp_path: Path) -> None:
    """Unroutable recipients are errors from the first: max_errors of them end the connection."""
    csv = tmp_path / "routes.csv"
    csv.write_text("pattern;server;tls_verify\nexample.org;127.0.0.1:9;false\n")
    w = start(tmp_path, [{"type": "csv", "file": str(csv)}], max_errors=10)
    try:
        with transaction_lines() as lines:
            client = open_transaction(w)
            try:
                codes = flood_rcpts(client, 5000, domain="unrouted.example")
                assert client.closed(5)
            finally:
                client.close()
            assert w.service.wait_idle(10)
    finally:
        w.stop()
    assert codes == [554] * 10 + [421], codes
    assert len(lines) == 1 and "result=rejected" in lines[0], lines


# ---------------------------------------------------------------- pipelined junk and long lines


def test_megabytes_of_pipelined_noops_end_at_the_junk_limit(tmp_path: Path,
                                                           fake_upstream: Callable[..., FakeUpstream]) -> None:
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)])  # max_junk_commands = 100 by default
    client = w.raw()
    try:
        client.ehlo()
        payload = b"NOOP\r\n" * (2 * MIB // 6)

        def pour() -> None:
            try:
                client.sock.sendall(payload)
            except OSError:
                pass  # Willi hung up: expected

        sender = threading.Thread(target=pour, daemon=True)
        sender.start()
        codes = []
        while True:
            code, lines = client.reply()
            codes.append(code)
            if code != 250:
                break
        assert codes == [250] * w.config.max_junk_commands + [421] and lines[0].startswith("4.7.0"), codes[-3:]
        assert client.closed(5)
        sender.join(10)
        assert not sender.is_alive(), "Willi kept reading the flood after it said 421"
    finally:
        client.close()
        w.stop()


def test_pipelined_noops_under_a_high_junk_limit_keep_memory_flat(tmp_path: Path,
                                                                  fake_upstream: Callable[..., FakeUpstream],
                                                                  traced: None) -> None:
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)], max_junk_commands=1_000_000)
    client = w.raw()
    count = 40_000
    payload = b"NOOP\r\n" * count
    try:
        client.ehlo()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        sender = threading.Thread(target=client.sock.sendall, args=(payload,), daemon=True)
        sender.start()
        received = 0
        while received < count:  # count replies without keeping them
            chunk = client.sock.recv(65536)
            assert chunk
            received += chunk.count(b"\n")
        peak = tracemalloc.get_traced_memory()[1] - base
        sender.join(10)
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
        w.stop()
    # All replies buffered would be > 2 MiB of bytes objects; Willi flushes at 16 KiB.
    assert peak < 2 * MIB, f"peak {peak // KIB} KiB"


@pytest.mark.parametrize("size", [100 * KIB, 4 * MIB])
def test_a_huge_command_line_is_500_552_and_the_session_goes_on(tmp_path: Path,
                                                               fake_upstream: Callable[..., FakeUpstream],
                                                               traced: None, size: int) -> None:
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)])
    client = w.raw()
    line = b"MAIL FROM:<" + b"a" * size + b"@example.com>\r\n"
    try:
        client.ehlo()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        client.send(line)
        code, lines = client.reply()
        peak = tracemalloc.get_traced_memory()[1] - base
        assert code == 500 and lines[0].startswith("5.5.2"), (code, lines)
        assert client.cmd("NOOP")[0] == 250
        assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
    finally:
        client.close()
        w.stop()
    assert peak < 2 * MIB, f"peak {peak // KIB} KiB for a {size // KIB} KiB line"


# ---------------------------------------------------------------- hostile upstream replies


def long_reply(lines: int) -> str:
    return "\n".join(f"250-line {i}" for i in range(lines - 1)) + "\n250 end"


@pytest.mark.parametrize("step", ["greeting", "ehlo", "mail", "rcpt", "data"])
def test_an_upstream_reply_of_1000_lines_is_451_450(tmp_path: Path, fake_upstream: Callable[..., FakeUpstream],
                                                     step: str) -> None:
    text = long_reply(1000).replace("250", {"greeting": "220", "data": "354"}.get(step, "250"))
    upstream = fake_upstream(replies={step: text})
    w = start(tmp_path, [static_mapping(upstream.port)])
    client = open_transaction(w)
    try:
        code, lines = client.cmd("RCPT TO:<b@example.com>")
        if step == "data":
            assert code == 250
            code, lines = client.cmd("DATA")
        assert code == 451 and lines[0].startswith("4.5.0"), (code, lines)
    finally:
        client.close()
        w.stop()
    assert upstream.wait_for(lambda: upstream.sessions and upstream.sessions[0].closed)
    assert upstream.completed_transactions == []


class EndlessLineUpstream:
    """Greets, takes EHLO, MAIL and RCPT, then answers RCPT with a 10 MiB line (sent in 64 KiB pieces)."""

    CHUNK = b"x" * 65536

    def __init__(self, size: int = 10 * MIB) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.closed_by_peer = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        with conn:
            f = conn.makefile("rb")
            conn.sendall(b"220 endless ESMTP\r\n")
            for reply in (b"250-endless\r\n250 PIPELINING\r\n", b"250 2.1.0 Ok\r\n"):
                f.readline()
                conn.sendall(reply)
            f.readline()  # RCPT (pipelined after MAIL, or alone)
            try:
                conn.sendall(b"250 ")
                while self.sent < self.size:
                    conn.sendall(self.CHUNK)
                    self.sent += len(self.CHUNK)
                conn.sendall(b"\r\n")
                if conn.recv(1) == b"":
                    self.closed_by_peer.set()
            except OSError:
                self.closed_by_peer.set()

    def stop(self) -> None:
        self.listener.close()


def test_a_10_mib_upstream_reply_line_is_451_450_with_bounded_memory(tmp_path: Path, traced: None) -> None:
    upstream = EndlessLineUpstream()
    w = start(tmp_path, [static_mapping(upstream.port)], upstream_command_timeout="20s")
    client = open_transaction(w)
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        client.sock.settimeout(30)
        code, lines = client.cmd("RCPT TO:<b@example.com>")
        peak = tracemalloc.get_traced_memory()[1] - base
        assert code == 451 and lines[0].startswith("4.5.0"), (code, lines)
        assert upstream.closed_by_peer.wait(10), "Willi kept the connection after a protocol error"
    finally:
        client.close()
        w.stop()
        upstream.stop()
    assert peak < 4 * MIB, f"peak {peak // KIB} KiB for a 10 MiB line"


def test_upstream_timeouts_are_shorter_than_the_clients_by_default() -> None:
    """RFC 5321 4.5.3.2: the client must hear a 4xx from Willi before it gives up itself."""
    from willi.config import Config

    defaults = Config.__dataclass_fields__
    read = defaults["read_timeout"].default
    assert defaults["upstream_command_timeout"].default < read
    assert defaults["upstream_connect_timeout"].default + defaults["upstream_command_timeout"].default < read
    assert defaults["upstream_data_timeout"].default <= read  # a client waits 10 min for the dot's reply (4.5.3.2.6)


class DiscardingSink:
    """An SMTP upstream that counts the message data and keeps none of it (unlike the recording fake)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.done = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        with conn:
            f = conn.makefile("rb")
            conn.sendall(b"220 sink ESMTP\r\n")
            for reply in (b"250 sink\r\n", b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n"):
                f.readline()
                conn.sendall(reply)
            tail = b""
            while not tail.endswith(b"\r\n.\r\n"):
                chunk = f.read1(65536)
                if not chunk:
                    return
                self.received += len(chunk)
                tail = (tail + chunk)[-5:]
            conn.sendall(b"250 2.0.0 Ok: queued as SINK\r\n")
            self.done.set()
            f.readline()

    def stop(self) -> None:
        self.listener.close()


def test_a_20_mib_message_line_streams_with_bounded_memory(tmp_path: Path, traced: None) -> None:
    """design.md DATA invariant 5: memory per connection stays bounded whatever the line length."""
    sink = DiscardingSink()
    w = start(tmp_path, [static_mapping(sink.port)], max_message_bytes="64MiB")
    chunk = b"z" * (256 * KIB)
    client = open_transaction(w)
    try:
        assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        client.send(b"Subject: one long line\r\n\r\n")
        for _ in range(80):  # 20 MiB without a line end
            client.send(chunk)
        client.send(b"\r\n.\r\n")
        code, reply = client.reply()
        peak = tracemalloc.get_traced_memory()[1] - base
        assert code == 250 and "SINK" in reply[0], reply
    finally:
        client.close()
        w.stop()
        sink.stop()
    assert sink.received >= 80 * 256 * KIB
    assert peak < 4 * MIB, f"peak {peak // KIB} KiB for a 20 MiB line"

"""The fleet with the real parts: HAProxy in front of two Willi daemons that share one MariaDB table.

HAProxy runs packaging/haproxy.cfg.example (tests/haproxy_harness.py):
`send-proxy-v2` towards the Willis, `option smtpchk` with `check-send-proxy`
as the health check. Each Willi is a real daemon (`python3 willi.py -c
CONF`) with its own port, pidfile and log, trusting HAProxy's address
(127.0.0.1) in proxy_protocol_hosts, and routing through one `sql` mapping
on the test's own MariaDB database. The upstream is a FakeUpstream offering
XCLIENT, so it shows whom Willi believes the client to be.

Clients bind to 127.0.0.2 and 127.0.0.3 and send through HAProxy. Then one
Willi is killed with SIGKILL under load: whatever got a 2xx for its final
dot must have been delivered exactly once, everything else must have seen a
4xx or a broken connection, and retrying those through HAProxy (which has
marked the dead Willi down by its health check) must deliver all of them.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_helpers import Reaper, WilliDaemon, alive, children, free_port, wait_until
from fakeupstream import FakeUpstream, RecordedSession
from haproxy_harness import EXAMPLE, HAPROXY, HAProxy, example_servers, render_config, require_haproxy, sections
from mariadb_harness import TestDatabase
from support import RawClient

from willi.protocol import xtext_decode

ROOT = Path(__file__).resolve().parents[1]
WILLI = [sys.executable, str(ROOT / "willi.py")]
SOURCES = ("127.0.0.2", "127.0.0.3")
BALANCER = "127.0.0.1"
TABLE = "fleet_routes"
MESSAGES = 200
THREADS = 8
KILL_AFTER = 50  # messages finished before one Willi is killed
RETRY_ATTEMPTS = 20
CLIENT_TIMEOUT = 30.0
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


# ---------------------------------------------------------------- the example file itself


def test_example_is_valid_haproxy_configuration() -> None:
    require_haproxy()
    result = subprocess.run([HAPROXY, "-c", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_sends_proxy_v2_and_checks_with_smtp() -> None:
    backend = next(lines for header, lines in sections(EXAMPLE.read_text()) if header.startswith("backend"))
    options = " ".join(backend)
    assert "option smtpchk" in options
    for word in ("send-proxy-v2", "check-send-proxy", "check"):
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", options), word
    assert len(example_servers()) >= 2


def test_rendered_configuration_keeps_the_example_sections(tmp_path: Path) -> None:
    text = render_config(EXAMPLE.read_text(), tmp_path, ("127.0.0.1", 2500), [("127.0.0.1", 2601), ("::1", 2602)])
    rendered = dict(sections(text))
    original = dict(sections(EXAMPLE.read_text()))
    assert rendered["defaults"] == original["defaults"]
    backend = next(header for header in original if header.startswith("backend"))
    kept = [line for line in original[backend] if not line.split()[0] == "server"]
    assert [line for line in rendered[backend] if line.split()[0] != "server"] == kept
    servers = [line.split() for line in rendered[backend] if line.split()[0] == "server"]
    assert [s[2] for s in servers] == ["127.0.0.1:2601", "::1:2602"]
    frontend = next(header for header in original if header.startswith("frontend"))
    assert [line.split() for line in rendered[frontend] if line.split()[0] == "bind"] == [["bind", "127.0.0.1:2500"]]


# ---------------------------------------------------------------- the parts


@dataclass
class Fleet:
    haproxy: HAProxy
    willis: list[WilliDaemon]
    upstream: FakeUpstream

    @property
    def front(self) -> tuple[str, int]:
        return self.haproxy.bind


def willi_config(directory: Path, port: int, db: TestDatabase) -> str:
    return (
        f'listen = "127.0.0.1:{port}"\n'
        'domain = "mx.willi.test"\nclient_name_lookup = false\nloglevel = "info"\n'
        f'proxy_protocol_hosts = ["{BALANCER}"]\n'
        'upstream_connect_timeout = "3s"\nupstream_command_timeout = "10s"\nread_timeout = "30s"\n'
        'shutdown_timeout = "5s"\n'
        f'pidfile = "{directory}/run/willi.pid"\nlogfile = "{directory}/willi.log"\n'
        f'[[mappings]]\ntype = "sql"\nhost = "{db.host}"\nport = {db.port}\nuser = "{db.user}"\n'
        f'password = "{db.password}"\ndatabase = "{db.name}"\n'
        f'query = "SELECT server, tls_verify FROM {TABLE} WHERE pattern = ?"\n'
        'connect_timeout = "2s"\nread_timeout = "2s"\n'
    )


@pytest.fixture
def fleet(tmp_path: Path, system_mariadb: TestDatabase, fake_upstream: Callable[..., FakeUpstream],
          reaper: Reaper) -> Iterator[Fleet]:
    require_haproxy()
    # A short pause before the 354 keeps sessions in flight, so that the kill finds some.
    upstream = fake_upstream(xclient="ADDR PORT NAME PROTO HELO", delays={"data": 0.2})
    system_mariadb.execute(
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (pattern VARCHAR(255) PRIMARY KEY, server VARCHAR(255) NOT NULL,"
        " tls_verify VARCHAR(10) NULL)",
        f"INSERT INTO {TABLE} VALUES ('example.com', '127.0.0.1:{upstream.port}', 'false')",
    )
    haproxy: HAProxy | None = None
    try:
        willis = []
        for index in (1, 2):
            directory = tmp_path / f"willi{index}"
            (directory / "run").mkdir(parents=True)
            port = free_port()
            config = directory / "willi.toml"
            config.write_text(willi_config(directory, port, system_mariadb))
            daemon = WilliDaemon(WILLI, config, directory / "run" / "willi.pid", directory / "willi.log", port,
                                 reaper)
            daemon.start()
            willis.append(daemon)
        haproxy = HAProxy(tmp_path / "haproxy", (BALANCER, free_port()), [("127.0.0.1", w.port) for w in willis])
        haproxy.start()
        haproxy.wait_states({"willi1": "UP", "willi2": "UP"}, 20)  # smtpchk with a LOCAL header passes
        yield Fleet(haproxy, willis, upstream)
    finally:
        if haproxy is not None:
            haproxy.stop()
        system_mariadb.execute(f"DROP TABLE IF EXISTS {TABLE}")


# ---------------------------------------------------------------- a client


@dataclass
class Outcome:
    kind: str  # "2xx", "4xx", "5xx", "broken"
    detail: str
    source: str = ""


def message(index: int, source: str) -> bytes:
    return (f"From: <sender@client.example>\r\nTo: <user{index}@example.com>\r\nSubject: fleet {index}\r\n"
            f"Message-ID: <{message_id(index)}>\r\nX-Source: {source}\r\n\r\nMessage {index}.\r\n").encode()


def message_id(index: int) -> str:
    return f"fleet-{index}@client.example"


def send_through(front: tuple[str, int], source: str, index: int) -> Outcome:
    """One message from `source` via HAProxy; how it ended for the client."""
    try:
        client = RawClient(*front, source=source, timeout=CLIENT_TIMEOUT)
    except OSError as exc:
        return Outcome("broken", f"connect: {exc}")
    step = "greeting"
    try:
        steps = [("greeting", None), ("EHLO", "EHLO client.example"),
                 ("MAIL", "MAIL FROM:<sender@client.example>"), ("RCPT", f"RCPT TO:<user{index}@example.com>"),
                 ("DATA", "DATA")]
        for step, line in steps:
            code, lines = client.reply() if line is None else client.cmd(line)
            expected = {"greeting": 220, "DATA": 354}.get(step, 250)
            if code != expected:
                return Outcome(f"{code // 100}xx", f"{step}: {code} {lines[0] if lines else ''}")
        step = "dot"
        client.send(message(index, source) + b".\r\n")
        code, lines = client.reply()
        result = Outcome(f"{code // 100}xx", f"dot: {code} {lines[0] if lines else ''}")
        if code // 100 == 2:
            try:
                client.cmd("QUIT")
            except OSError:
                pass  # the verdict was 2xx; what happens to QUIT does not change it
        return result
    except OSError as exc:  # EOF (ConnectionError), reset, timeout
        return Outcome("broken", f"{step}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


# ---------------------------------------------------------------- what the upstream saw


def xclient_addr(session: RecordedSession) -> str | None:
    addr = None
    for command in session.commands:
        if command.upper().startswith("XCLIENT "):
            for item in command.split()[1:]:
                name, _, value = item.partition("=")
                if name.upper() == "ADDR":
                    addr = xtext_decode(value)
    return addr


def deliveries(upstream: FakeUpstream) -> collections.Counter[str]:
    """Completed transactions by Message-ID (what the upstream took responsibility for)."""
    counts: collections.Counter[str] = collections.Counter()
    for tx in upstream.completed_transactions:
        found = _MESSAGE_ID.search(tx.data)
        assert found is not None, tx.data[:200]
        counts[found.group(1).decode()] += 1
    return counts


def sources_by_message(upstream: FakeUpstream) -> dict[str, set[str | None]]:
    """Message-ID -> the XCLIENT ADDR of every session that delivered it."""
    seen: dict[str, set[str | None]] = collections.defaultdict(set)
    for session in list(upstream.sessions):
        for tx in session.transactions:
            found = _MESSAGE_ID.search(tx.data) if tx.completed else None
            if found is not None:
                seen[found.group(1).decode()].add(xclient_addr(session))
    return seen


def accepted_lines(daemon: WilliDaemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if "result=accepted" in line]


# ---------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.mysql
def test_the_upstream_sees_the_real_clients_never_haproxy(fleet: Fleet) -> None:
    for index in range(8):
        source = SOURCES[index % 2]
        outcome = send_through(fleet.front, source, 10_000 + index)
        assert outcome.kind == "2xx", outcome
    wait_until(lambda: len(fleet.upstream.completed_transactions) == 8, 10, "8 deliveries")
    seen = sources_by_message(fleet.upstream)
    for index in range(8):
        assert seen[message_id(10_000 + index)] == {SOURCES[index % 2]}
    addresses = {xclient_addr(s) for s in fleet.upstream.sessions}
    assert BALANCER not in addresses and addresses <= set(SOURCES), addresses
    for daemon in fleet.willis:  # leastconn shares sequential sessions out in turn: both served
        lines = accepted_lines(daemon)
        assert lines, f"{daemon.logfile} has no accepted transaction:\n{daemon.log()}"
        for line in lines:
            assert re.search(r"\bclient=127\.0\.0\.[23]:\d+ ", line), line
            assert re.search(rf"\bproxy={re.escape(BALANCER)}:\d+ ", line), line


@pytest.mark.slow
@pytest.mark.mysql
def test_killing_one_willi_under_load_loses_nothing(fleet: Fleet) -> None:
    outcomes: dict[int, Outcome] = {}
    lock = threading.Lock()
    todo = collections.deque(range(MESSAGES))

    def client_thread(number: int) -> None:
        source = SOURCES[number % 2]
        while True:
            with lock:
                if not todo:
                    return
                index = todo.popleft()
            outcome = send_through(fleet.front, source, index)
            outcome.source = source
            with lock:
                outcomes[index] = outcome

    threads = [threading.Thread(target=client_thread, args=(n,), daemon=True) for n in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    wait_until(lambda: len(outcomes) >= KILL_AFTER, 120, f"{KILL_AFTER} messages before the kill")
    victim = fleet.willis[0]
    assert victim.pid is not None and alive(victim.pid)
    # The whole instance dies at once: its workers (workers = "auto") first, so the parent cannot replace them.
    for pid in [*children(victim.pid), victim.pid]:
        os.kill(pid, signal.SIGKILL)
    down_after = fleet.haproxy.wait_states({"willi1": "DOWN", "willi2": "UP"}, 30)
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "the load did not finish within 300 s"
    load_seconds = time.monotonic() - started
    assert len(outcomes) == MESSAGES

    kinds = collections.Counter(o.kind for o in outcomes.values())
    unexpected = {i: o for i, o in outcomes.items() if o.kind not in ("2xx", "4xx", "broken")}
    assert unexpected == {}, f"a client got a reply other than 2xx, 4xx or a broken connection: {unexpected}"
    ok_first = {i for i, o in outcomes.items() if o.kind == "2xx"}
    failed = sorted(set(outcomes) - ok_first)
    wait_until(lambda: all(message_id(i) in deliveries(fleet.upstream) for i in ok_first), 10,
               "every 2xx message at the upstream")
    before_retry = deliveries(fleet.upstream)
    lost_after_2xx = [i for i in ok_first if before_retry[message_id(i)] != 1]
    assert lost_after_2xx == [], {i: before_retry[message_id(i)] for i in lost_after_2xx}
    delivered_anyway = [i for i in failed if before_retry[message_id(i)] > 0]

    attempts = 0
    for index in failed:
        for _ in range(RETRY_ATTEMPTS):
            attempts += 1
            outcome = send_through(fleet.front, outcomes[index].source, index)
            if outcome.kind == "2xx":
                break
            assert outcome.kind in ("4xx", "broken"), outcome
            time.sleep(0.5)
        else:
            raise AssertionError(f"message {index} not accepted after {RETRY_ATTEMPTS} retries: {outcome}")

    wait_until(lambda: all(message_id(i) in deliveries(fleet.upstream) for i in range(MESSAGES)), 10,
               "every message at the upstream")
    final = deliveries(fleet.upstream)
    assert all(final[message_id(i)] == 1 for i in ok_first), "a message acknowledged with 2xx arrived twice"
    missing = [i for i in range(MESSAGES) if final[message_id(i)] == 0]
    assert missing == [], missing
    duplicates = sorted(i for i in failed if final[message_id(i)] > 1)
    seen = sources_by_message(fleet.upstream)
    wrong_source = {i: seen[message_id(i)] for i in range(MESSAGES) if seen[message_id(i)] != {outcomes[i].source}}
    assert wrong_source == {}, wrong_source

    figures = (f"sent={MESSAGES} 2xx={len(ok_first)} 4xx={kinds['4xx']} broken={kinds['broken']} "
               f"delivered_before_retry={sum(1 for i in range(MESSAGES) if before_retry[message_id(i)])} "
               f"retried={len(failed)} retry_attempts={attempts} delivered_after_retry="
               f"{sum(1 for i in range(MESSAGES) if final[message_id(i)])} "
               f"duplicates={len(duplicates)} (of which the upstream had the data before the kill cut the reply: "
               f"{len(delivered_anyway)}) haproxy_marked_down_after={down_after:.1f}s "
               f"load_seconds={load_seconds:.1f}")
    print(f"\nFLEET kill-one-Willi: {figures}")
    details = collections.Counter(o.detail.split(":")[0] for o in outcomes.values() if o.kind != "2xx")
    print(f"FLEET failures by the step the client was at: {dict(details)}")
    assert failed, ("the kill hit no session in flight, so nothing was tested; "
                    f"figures: {figures}")


@pytest.mark.slow
@pytest.mark.parametrize("proxy_header", [True, False], ids=["as-shipped", "without-proxy-protocol"])
def test_smtp_health_check_against_willi(willi, fake_upstream, tmp_path: Path, proxy_header: bool) -> None:
    """The example's check passes against a Willi that expects PROXY headers, and stays passing; the
    same check without the PROXY protocol fails (so UP means the SMTP check really ran)."""
    require_haproxy()
    from proxy_helpers import make_config, static_mapping

    w = willi(config=make_config(tmp_path, [static_mapping(fake_upstream().port)], proxy_protocol_hosts=[BALANCER]))
    example = EXAMPLE
    if not proxy_header:
        example = tmp_path / "without-proxy-protocol.cfg"
        example.write_text(EXAMPLE.read_text().replace(" send-proxy-v2", "").replace(" check-send-proxy", ""))
    haproxy = HAProxy(tmp_path / "haproxy", (BALANCER, free_port()), [(w.host, w.port)], example=example)
    haproxy.start()
    try:
        haproxy.wait_states({"willi1": "UP" if proxy_header else "DOWN"}, 20)
        if proxy_header:
            time.sleep(5)  # two more check intervals: it stays up
            assert haproxy.server_states()["willi1"] == "UP"
    finally:
        haproxy.stop()

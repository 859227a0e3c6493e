"""Worker processes (`workers = N`): the process tree, supervision, signals and global limits.

Willi runs as a real subprocess from the checkout, in the foreground
(`willi.py -f -c FILE`, the test's own child, so its exit status is known
directly) or as a daemon (the pidfile names the parent). A connection is
steered to a chosen worker by stopping the other (daemon_helpers
`connect_on`) and then proven to be that worker's by the socket inode in
/proc; so each claim that "every worker" does something is checked on
each worker separately.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import time
from datetime import datetime
from pathlib import Path

import pytest
from daemon_helpers import (
    CHECKOUT_COMMAND,
    ForegroundWilli,
    Reaper,
    WilliDaemon,
    alive,
    children,
    config_text,
    free_port,
    holders,
    listening_inode,
    parent_of,
    wait_until,
    write_routes,
)
from support import RawClient

from willi.config import parse_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture
def start_willi(tmp_path: Path, reaper: Reaper):
    """`start_willi(routes, workers=2, daemon=False, extra="", ...)`: Willi started, its workers serving."""

    def factory(routes: dict[str, int], *, workers: int | str = 2, expect: int | None = None, daemon: bool = False,
                extra: str = "", shutdown_timeout: str = "60s", preexec_fn=None) -> WilliDaemon:
        count = expect if expect is not None else workers
        assert isinstance(count, int)
        port = free_port()
        write_routes(tmp_path / "routes.csv", routes)
        config = tmp_path / "willi.toml"
        config.write_text(config_text(tmp_path, port, extra, None, workers, read_timeout="60s",
                                      shutdown_timeout=shutdown_timeout))
        kind = WilliDaemon if daemon else ForegroundWilli
        w = kind(CHECKOUT_COMMAND, config, tmp_path / "run" / "willi.pid", tmp_path / "willi.log", port, reaper,
                 count)
        if daemon:
            w.start()
        else:
            w.start(preexec_fn=preexec_fn)  # type: ignore[call-arg]
        if count > 1:
            w.wait_workers()
        return w

    return factory


def open_session(w: WilliDaemon, worker: int, *, source: str | None = None) -> RawClient:
    """A client that has said EHLO, on `worker`."""
    client, greeting = w.connect_on(worker, source=source)
    assert greeting[0] == 220, greeting
    client.send("EHLO client.example\r\n")
    client.expect(250)
    return client


def start_data(w: WilliDaemon, worker: int, to: str) -> RawClient:
    """A client in the middle of its message (DATA accepted, half the message sent), on `worker`."""
    client = open_session(w, worker)
    client.send(f"MAIL FROM:<a@sender.example>\r\nRCPT TO:<{to}>\r\nDATA\r\n")
    client.expect(250)
    client.expect(250)
    client.expect(354)
    client.send(f"Subject: slow\r\n\r\nfirst half for {to}\r\n")
    return client


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def log_time(line: str) -> float:
    stamp = re.search(r"time=(\S+)", line)
    assert stamp is not None, line
    return datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()


# ---------------------------------------------------------------- the process tree


def test_daemon_is_a_parent_with_two_workers_on_one_listening_socket(start_willi, fake_upstream, reaper) -> None:
    upstream = fake_upstream()
    d = start_willi({"example.com": upstream.port}, daemon=True)
    parent = d.read_pid()
    assert parent == d.pid and alive(parent)
    workers = d.wait_workers()
    assert children(parent) == sorted(workers) and len(workers) == 2
    for pid in workers:
        assert parent_of(pid) == parent
        assert b"willi.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    # the workers serve the socket the parent bound (inherited, not SO_REUSEPORT: one listening socket)
    listener = listening_inode(d.port)
    assert listener is not None
    assert sorted(holders(listener, [parent, *workers])) == sorted([parent, *workers])
    d.wait_log("2 worker processes serving")
    for pid in workers:
        assert d.send_on(pid).code == 250
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 2)
    status = d.stop()
    assert status == 0 or (status is None and not reaper.subreaper)
    assert not any(alive(pid) for pid in workers)
    assert not d.pidfile.exists()


def test_workers_1_is_one_process(start_willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port}, workers=1)
    assert children(w.pid) == []
    client = open_session(w, w.pid)  # connect_on with no other worker to stop
    client.close()
    assert w.send_on(w.pid).code == 250
    w.wait_log("started in the foreground")
    assert " 1 worker" in w.log() and "worker processes serving" not in w.log()
    assert w.stop() == 0


def test_workers_auto_is_two_per_usable_cpu(start_willi, fake_upstream, tmp_path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    cfg = parse_config('workers = "auto"\n[[mappings]]\ntype = "static"\nserver = "127.0.0.1:25"\n', "t.toml",
                       base=tmp_path)
    assert cfg.workers == 2 * len(cpus)
    upstream = fake_upstream()
    pinned = start_willi({"example.com": upstream.port}, workers="auto", expect=2,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    assert len(pinned.wait_workers()) == 2, "one usable CPU: two workers"
    assert pinned.send_on(pinned.wait_workers()[0]).code == 250
    assert pinned.stop() == 0
    if len(cpus) > 1:
        free = start_willi({"example.com": upstream.port}, workers="auto", expect=2 * len(cpus))
        assert len(free.wait_workers()) == 2 * len(cpus)
        assert free.stop() == 0


def acceptor_wakeups(pid: int) -> int:
    """Voluntary context switches of `pid`'s acceptor thread: one per wake-up from its epoll_wait."""
    for task in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{task}/comm").read_text().strip() == "willi-accept":
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            return int(re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no willi-accept thread in {pid}")


def test_a_new_connection_wakes_one_worker_and_the_workers_take_turns(start_willi, fake_upstream) -> None:
    """EPOLLEXCLUSIVE, re-armed after each accept: no thundering herd, and no worker left out.

    With a plain epoll every worker's acceptor wakes for every connection
    (four workers: three find nothing); with EPOLLEXCLUSIVE alone the
    kernel would hand nearly all of them to the first worker registered.
    """
    w = start_willi({"example.com": fake_upstream().port}, workers=4)
    workers = w.wait_workers()
    before = {pid: acceptor_wakeups(pid) for pid in workers}
    served = dict.fromkeys(workers, 0)
    connections = 40
    for _ in range(connections):
        client = RawClient("127.0.0.1", w.port)
        try:
            client.expect(220)
            served[w.holder(client)] += 1
            client.send("QUIT\r\n")
            client.expect(221)
        finally:
            client.close()
        time.sleep(0.02)  # the acceptor is back in epoll_wait before the next one
    wakeups = sum(acceptor_wakeups(pid) - before[pid] for pid in workers)
    assert wakeups <= connections * 1.5, f"{wakeups} acceptor wake-ups for {connections} connections"
    assert all(count >= connections // 8 for count in served.values()), f"connections per worker: {served}"


# ---------------------------------------------------------------- supervision


def test_a_killed_worker_is_logged_and_replaced(start_willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    victim, survivor = w.wait_workers()
    mark = len(w.log())
    os.kill(victim, signal.SIGKILL)
    line = w.wait_log(f"(pid {victim}) ended with signal SIGKILL", start=mark)
    assert "replacing it" in line
    workers = w.wait_workers(without=[victim])
    assert survivor in workers
    for pid in workers:  # mail flows through the survivor and the replacement
        assert w.send_on(pid).code == 250
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 2)


def test_a_worker_that_keeps_dying_is_respawned_with_back_off(start_willi, fake_upstream, tmp_path) -> None:
    """A replacement that cannot load the (since broken) CSV dies at once, again and again: not in a tight loop."""
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    victim, survivor = w.wait_workers()
    routes = tmp_path / "routes.csv"
    good = routes.read_text()
    routes.write_text("no header here\n")
    mark = len(w.log())
    os.kill(victim, signal.SIGKILL)
    w.wait_log("replacing it in 4s", start=mark, timeout=30)
    # while the replacements fail, the survivor serves (it loaded the CSV before it broke)
    sent = w.send_on(survivor)
    assert sent.code == 250
    routes.write_text(good)
    workers = w.wait_workers(without=[victim], timeout=30)
    assert survivor in workers
    log = w.log()[mark:].splitlines()
    failures = [line for line in log if "could not start" in line]
    assert 2 <= len(failures) <= 4, failures
    assert all("routes.csv" in line for line in failures)
    ended = [line for line in log if "ended with status 1" in line]
    for line, following in itertools.pairwise(ended):
        delay = re.search(r"replacing it in ([0-9]+)s", line)
        if delay:  # the next attempt came no earlier than the announced back-off
            assert log_time(following) - log_time(line) >= int(delay.group(1)) - 0.1, (line, following)
    for pid in workers:
        assert w.send_on(pid).code == 250


def test_workers_drain_and_exit_when_the_parent_dies(start_willi, fake_upstream) -> None:
    """No orphans serving without a supervisor: a worker whose control channel ends drains and exits."""
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    workers = w.wait_workers()
    idle = [open_session(w, pid) for pid in workers]
    busy = start_data(w, workers[0], "b@example.com")
    try:
        os.kill(w.pid, signal.SIGKILL)
        for client in idle:
            code, lines = client.reply()
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
        busy.send("second half\r\n.\r\n")
        code, lines = busy.reply()
        assert code == 250 and "queued as" in lines[0], (code, lines)
    finally:
        for client in [*idle, busy]:
            client.close()
    wait_until(lambda: not any(alive(pid) for pid in workers), 15, "the orphaned workers to exit")
    assert refused(w.port)


# ---------------------------------------------------------------- signals


def test_sigterm_drains_every_worker(start_willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    workers = w.wait_workers()
    assert children(w.pid) == sorted(workers) and all(parent_of(pid) == w.pid for pid in workers)  # -f: same model
    idle = [open_session(w, pid) for pid in workers]
    busy = [start_data(w, pid, f"b{n}@example.com") for n, pid in enumerate(workers)]
    assert upstream.wait_for(lambda: sum(b"first half" in s.raw for s in upstream.sessions) == 2)
    try:
        w.signal(signal.SIGTERM)
        for client in idle:
            code, lines = client.reply()
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
            assert client.closed()
        w.wait_log("SIGTERM: stopping 2 workers")
        wait_until(lambda: refused(w.port), 10, "the listener to close")
        time.sleep(0.3)
        assert alive(w.pid) and all(alive(pid) for pid in workers), "transactions in flight are waited for"
        for client in busy:
            client.send("second half\r\n.\r\n")
            code, lines = client.reply()
            assert code == 250 and "queued as" in lines[0], (code, lines)
            code, lines = client.reply()
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
    finally:
        for client in idle + busy:
            client.close()
    assert w.wait() == 0
    assert not any(alive(pid) for pid in workers)
    assert len(upstream.completed_transactions) == 2
    assert all(t.data.endswith(b"\r\nsecond half\r\n") for t in upstream.completed_transactions)


def test_sigterm_to_every_process_is_still_one_stop(start_willi, fake_upstream) -> None:
    """systemd's default KillMode (or `kill` of every PID) signals the workers too, after the parent told them.

    Each process got one SIGTERM: that is a graceful stop, not the second
    signal that cuts transactions in flight.
    """
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    workers = w.wait_workers()
    idle = [open_session(w, pid) for pid in workers]
    busy = [start_data(w, pid, f"b{n}@example.com") for n, pid in enumerate(workers)]
    assert upstream.wait_for(lambda: sum(b"first half" in s.raw for s in upstream.sessions) == 2)
    try:
        w.signal(signal.SIGTERM)
        for client in idle:  # each worker is draining on the parent's word
            assert client.reply()[0] == 421
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        for client in busy:
            client.send("second half\r\n.\r\n")
            code, lines = client.reply()
            assert code == 250 and "queued as" in lines[0], (code, lines)
    finally:
        for client in idle + busy:
            client.close()
    assert w.wait() == 0
    assert len(upstream.completed_transactions) == 2


def test_second_sigterm_ends_the_drain_at_once(start_willi, fake_upstream) -> None:
    """shutdown_timeout is 60 s: only the second signal can end the transactions within the 10 s a reply may take."""
    upstream = fake_upstream()
    w = start_willi({"example.com": upstream.port})
    workers = w.wait_workers()
    busy = [start_data(w, pid, f"b{n}@example.com") for n, pid in enumerate(workers)]
    assert upstream.wait_for(lambda: sum(b"first half" in s.raw for s in upstream.sessions) == 2)
    try:
        w.signal(signal.SIGTERM)
        w.wait_log("SIGTERM: stopping")
        time.sleep(0.3)
        assert all(alive(pid) for pid in [w.pid, *workers])
        w.signal(signal.SIGTERM)
        for client in busy:
            code, lines = client.reply()
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
            assert client.closed()
    finally:
        for client in busy:
            client.close()
    assert w.wait(15) == 0
    assert not any(alive(pid) for pid in workers)
    w.wait_log_count("second stop request", 2)  # each worker cut its transaction
    assert upstream.completed_transactions == [], "the upstream never got the final dot"
    assert all(b"first half" in s.raw and b"second half" not in s.raw for s in upstream.sessions)


@pytest.mark.parametrize("broken", ["csv", "toml"])
def test_sighup_reaches_every_worker(start_willi, fake_upstream, tmp_path, broken) -> None:
    first, second = fake_upstream(), fake_upstream()
    w = start_willi({"example.com": first.port})
    workers = w.wait_workers()
    for pid in workers:
        assert w.send_on(pid).code == 250
    assert len(first.completed_transactions) == 2

    write_routes(tmp_path / "routes.csv", {"example.com": second.port})  # reload_interval is 1h: only HUP counts
    mark = len(w.log())
    w.signal(signal.SIGHUP)
    w.wait_everywhere("configuration reloaded", start=mark)
    for pid in workers:  # a connection landing on each worker routes to the new upstream
        assert w.send_on(pid).code == 250
    assert second.wait_for(lambda: len(second.completed_transactions) == 2)
    assert len(first.completed_transactions) == 2

    if broken == "csv":
        (tmp_path / "routes.csv").write_text("no header here\n")
    else:
        w.config.write_text(w.config.read_text().replace("shutdown_timeout", "shutdown_timeuot"))
    mark = len(w.log())
    w.signal(signal.SIGHUP)
    line = w.wait_log("reload failed", start=mark)
    assert ("routes.csv" if broken == "csv" else "shutdown_timeuot") in line
    for pid in workers:  # each worker keeps the configuration it had
        assert w.send_on(pid).code == 250
    assert second.wait_for(lambda: len(second.completed_transactions) == 4)
    assert len(first.completed_transactions) == 2
    assert w.count_log("reload failed", start=mark) == 1, "checked once, by the parent"
    assert w.count_log("configuration reloaded", start=mark) == 0
    assert w.worker_pids() == workers


def test_sigusr1_every_process_reopens_its_log(start_willi, fake_upstream) -> None:
    upstream = fake_upstream()
    d = start_willi({"example.com": upstream.port}, daemon=True)
    workers = d.wait_workers()
    rotated = d.logfile.with_name("willi.log.1")
    d.logfile.rename(rotated)
    before = [d.send_on(pid) for pid in workers]  # still written to the moved file
    assert all(sent.code == 250 for sent in before)
    d.wait_log_count("result=accepted", 2, path=rotated)
    assert not d.logfile.exists()
    d.signal(signal.SIGUSR1)
    d.wait_everywhere(f"log file {d.logfile} reopened")  # the parent and each worker, in the new file
    after = [d.send_on(pid) for pid in workers]
    for sent in after:
        assert sent.code == 250
        d.wait_log(f"client=127.0.0.1:{sent.port} ")
    old = rotated.read_text()
    assert all(f"client=127.0.0.1:{sent.port} " in old for sent in before)
    assert not any(f"client=127.0.0.1:{sent.port} " in old for sent in after)
    assert old.count("result=accepted") == 2


# ---------------------------------------------------------------- global limits

LIMITS = "max_connections_per_ip = 3\nmax_connections = 5\n"


def refusal(w: WilliDaemon, worker: int, source: str) -> tuple[int, list[str]]:
    client, first = w.connect_on(worker, source=source)
    try:
        assert client.closed(), "a refused connection is closed after the 421"
    finally:
        client.close()
    return first


def fill(w: WilliDaemon, a: int, b: int, between=None) -> list[RawClient]:
    """Five connections across both workers: 127.0.0.1 on a, b, a; 127.0.0.2 on b, a.

    `between` runs after the first three (the per-address limit is reached,
    the global one not yet).
    """
    held = [open_session(w, pid, source="127.0.0.1") for pid in (a, b, a)]
    assert {w.holder(c) for c in held} == {a, b}
    if between is not None:
        between()
    held += [open_session(w, pid, source="127.0.0.2") for pid in (b, a)]
    assert [w.holder(c) for c in held] == [a, b, a, b, a]
    return held


def test_connection_limits_hold_across_workers(start_willi, fake_upstream) -> None:
    w = start_willi({"example.com": fake_upstream().port}, extra=LIMITS)
    a, b = w.wait_workers()

    def fourth_from_one_address() -> None:
        for pid in (a, b):  # on either worker
            code, lines = refusal(w, pid, "127.0.0.1")
            assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)

    held = fill(w, a, b, fourth_from_one_address)
    try:
        for pid in (a, b):  # the 6th overall
            code, lines = refusal(w, pid, "127.0.0.3")
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
        held.pop().close()  # one slot free again (of 127.0.0.2, on a)
        time.sleep(0.2)
        client = open_session(w, b, source="127.0.0.3")
        held.append(client)
        code, _ = refusal(w, a, "127.0.0.4")
        assert code == 421
    finally:
        for client in held:
            client.close()


def test_a_killed_workers_slots_are_freed(start_willi, fake_upstream) -> None:
    w = start_willi({"example.com": fake_upstream().port}, extra=LIMITS)
    a, b = w.wait_workers()
    held = fill(w, a, b)
    try:
        os.kill(a, signal.SIGKILL)  # it held three: two of 127.0.0.1, one of 127.0.0.2
        for client, pid in zip(held, [a, b, a, b, a], strict=True):
            if pid == a:
                assert client.closed()
        replacement = next(pid for pid in w.wait_workers(without=[a]) if pid != b)
        # its region was cleared: 127.0.0.1 has one connection left (on b), the total is two
        held += [open_session(w, pid, source="127.0.0.1") for pid in (replacement, b)]
        code, lines = refusal(w, replacement, "127.0.0.1")
        assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
        held.append(open_session(w, replacement, source="127.0.0.4"))
        code, lines = refusal(w, b, "127.0.0.5")
        assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
    finally:
        for client in held:
            client.close()

"""Willi as a classic daemon, started from the checkout: `python3 willi.py -c FILE`.

Each test runs the real start command and talks to the detached process
over SMTP and signals: pidfile, refusal of a second start, SIGHUP reload,
SIGUSR1 log reopening, graceful SIGTERM, and the errors a start must report
on stderr before detaching. Every test runs twice, with `workers = 1` (one
process) and `workers = 2` (a supervising parent and two workers); what is
particular to workers is in test_workers.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from daemon_helpers import (
    CHECKOUT_COMMAND,
    Reaper,
    WilliDaemon,
    alive,
    children,
    config_text,
    free_port,
    wait_exit,
    wait_until,
    write_routes,
)
from support import RawClient

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def workers(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def make_daemon(tmp_path: Path, reaper: Reaper, workers: int):
    """`make_daemon(routes={...}, extra="")` writes config and CSV; the daemon is not started."""

    def factory(routes: dict[str, int], extra: str = "", logfile: str | None = None) -> WilliDaemon:
        port = free_port()
        write_routes(tmp_path / "routes.csv", routes)
        config = tmp_path / "willi.toml"
        config.write_text(config_text(tmp_path, port, extra, logfile, workers))
        return WilliDaemon(CHECKOUT_COMMAND, config, tmp_path / "run" / "willi.pid", tmp_path / "willi.log",
                           port, reaper, workers)

    return factory


def test_daemon_detaches_writes_pidfile_serves_and_stops(make_daemon, fake_upstream) -> None:
    upstream = fake_upstream()
    d = make_daemon({"example.com": upstream.port})
    pid = d.start()
    # detached: its own session, cwd /, umask 027, standard streams on /dev/null
    assert os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Umask:\t0027" in status
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert b"willi.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert d.pidfile.read_text() == f"{pid}\n"
    d.wait_log(f"pid {pid}")
    assert len(children(pid)) == (0 if d.workers == 1 else d.workers)

    code, reply = d.send()
    assert code == 250 and b"queued as" in reply
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)

    second = d.run()
    assert second.returncode != 0
    assert str(d.pidfile) in second.stderr and str(pid) in second.stderr, second.stderr
    assert alive(pid) and d.pidfile.read_text() == f"{pid}\n"

    assert d.stop() in (0, None)
    assert not d.pidfile.exists()
    d.wait_log("level=info stopped")


def test_exit_status_is_zero_after_sigterm(make_daemon, fake_upstream, reaper) -> None:
    if not reaper.subreaper:
        pytest.fail("prctl(PR_SET_CHILD_SUBREAPER) is needed to see the daemon's exit status")
    d = make_daemon({"example.com": fake_upstream().port})
    d.start()
    assert d.stop() == 0


def test_sighup_reloads_routes_and_keeps_old_config_when_broken(make_daemon, fake_upstream) -> None:
    first, second = fake_upstream(), fake_upstream()
    d = make_daemon({"example.com": first.port})
    d.start()
    assert d.send()[0] == 250
    assert first.wait_for(lambda: len(first.completed_transactions) == 1)

    # reload_interval is 1h: only the SIGHUP makes the new CSV count
    write_routes(d.config.parent / "routes.csv", {"example.com": second.port})
    mark = len(d.log())
    d.signal(signal.SIGHUP)
    d.wait_everywhere("configuration reloaded", start=mark)
    assert d.send()[0] == 250
    assert second.wait_for(lambda: len(second.completed_transactions) == 1)
    assert len(first.completed_transactions) == 1

    good = d.config.read_text()
    d.config.write_text(good.replace("shutdown_timeout", "shutdown_timeuot"))
    mark = len(d.log())
    d.signal(signal.SIGHUP)
    line = d.wait_log("reload failed", start=mark)
    assert "keeping the running configuration" in line and "shutdown_timeuot" in line
    assert str(d.config) in line
    assert d.send()[0] == 250
    assert second.wait_for(lambda: len(second.completed_transactions) == 2)

    # a setting that needs a restart is reported, the rest applies
    d.config.write_text(good.replace(f"127.0.0.1:{d.port}", f"127.0.0.1:{free_port()}"))
    mark = len(d.log())
    d.signal(signal.SIGHUP)
    line = d.wait_log("listen changed", start=mark)
    assert "restart" in line
    d.wait_everywhere("configuration reloaded", start=mark)
    assert d.count_log("listen changed", start=mark) == 1, "told once, by the process that checked the file"
    assert d.send()[0] == 250
    assert d.stop() in (0, None)


def test_sighup_with_unloadable_csv_keeps_old_routes(make_daemon, fake_upstream) -> None:
    upstream = fake_upstream()
    d = make_daemon({"example.com": upstream.port})
    d.start()
    (d.config.parent / "routes.csv").write_text("no header here\n")
    mark = len(d.log())
    d.signal(signal.SIGHUP)
    assert "routes.csv" in d.wait_log("reload failed", start=mark)
    assert d.send()[0] == 250
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)


def test_sigterm_during_slow_data_lets_the_message_finish(make_daemon, fake_upstream) -> None:
    upstream = fake_upstream()
    d = make_daemon({"example.com": upstream.port})
    pid = d.start()
    client = RawClient("127.0.0.1", d.port)
    try:
        client.ehlo()
        client.send("MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(354)
        client.send("Subject: slow\r\n\r\nfirst half\r\n")
        d.signal(signal.SIGTERM)
        d.wait_log("SIGTERM: stopping")

        def refused() -> bool:  # no new connections while stopping
            with socket.socket() as late:
                late.settimeout(2)
                return late.connect_ex(("127.0.0.1", d.port)) != 0

        wait_until(refused, 5, "the listener to close")
        time.sleep(0.3)
        assert alive(pid), "the daemon must wait for the transaction in flight"
        client.send("second half\r\n.\r\n")
        code, lines = client.reply()
        assert code == 250 and "queued as" in lines[0]
        code, lines = client.reply()
        assert code == 421 and lines[0].startswith("4.3.2")
    finally:
        client.close()
    assert wait_exit(pid) in (0, None)
    assert not d.pidfile.exists()
    assert upstream.completed_transactions[0].data.endswith(b"first half\r\nsecond half\r\n")


def test_sigusr1_reopens_the_log_file(make_daemon, fake_upstream) -> None:
    upstream = fake_upstream()
    d = make_daemon({"example.com": upstream.port})
    d.start()
    rotated = d.logfile.with_name("willi.log.1")
    d.logfile.rename(rotated)
    assert d.send()[0] == 250  # still written to the renamed file
    d.wait_log("result=accepted", path=rotated)
    assert not d.logfile.exists()
    d.signal(signal.SIGUSR1)
    d.wait_everywhere(f"log file {d.logfile} reopened")
    assert d.send(body="after rotation")[0] == 250
    d.wait_log("result=accepted")
    assert rotated.read_text().count("result=accepted") == 1
    assert oct(d.logfile.stat().st_mode & 0o777) == "0o640"


def test_configuration_error_at_start_names_the_key(make_daemon) -> None:
    d = make_daemon({"example.com": 2}, extra='max_recipients = "lots"')
    result = d.run()
    assert result.returncode != 0
    assert "max_recipients" in result.stderr and str(d.config) in result.stderr, result.stderr
    assert not d.pidfile.exists()


def test_address_in_use_fails_before_detaching(make_daemon) -> None:
    d = make_daemon({"example.com": 2})
    with socket.create_server(("127.0.0.1", d.port)):
        result = d.run()
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{d.port}" in result.stderr, result.stderr
    assert "in use" in result.stderr
    assert not d.pidfile.exists()


@pytest.mark.parametrize(
    ("extra", "logfile", "key"),
    [
        ('user = "no-such-willi-user"', None, "user"),
        ('user = "root"\ngroup = "no-such-willi-group"', None, "group"),
        ("", "/nonexistent-dir/willi.log", "logfile"),
    ],
)
def test_startup_errors_are_reported_on_stderr(make_daemon, extra: str, logfile: str | None, key: str) -> None:
    d = make_daemon({"example.com": 2}, extra=extra, logfile=logfile)
    result = d.run()
    assert result.returncode != 0
    assert f"key '{key}'" in result.stderr, result.stderr
    assert not d.pidfile.exists()


def test_unreadable_certificate_is_reported_before_detaching(make_daemon, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    d = make_daemon({"example.com": 2}, extra=f'tls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"')
    result = d.run()
    assert result.returncode != 0
    assert "tls_cert" in result.stderr and "cert.pem" in result.stderr, result.stderr
    assert not d.pidfile.exists()


def test_unloadable_csv_is_reported_before_ready(make_daemon) -> None:
    d = make_daemon({"example.com": 2})
    (d.config.parent / "routes.csv").write_text("example.com;127.0.0.1:2\n")
    result = d.run()
    assert result.returncode != 0
    assert "routes.csv" in result.stderr, result.stderr
    assert not d.pidfile.exists()


def test_stale_pidfile_is_replaced(make_daemon, fake_upstream) -> None:
    d = make_daemon({"example.com": fake_upstream().port})
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    d.pidfile.parent.mkdir()
    d.pidfile.write_text(f"{gone.pid}\n")
    pid = d.start()
    assert pid != gone.pid and d.pidfile.read_text() == f"{pid}\n"
    assert d.send()[0] == 250


def test_foreground_mode_reloads_and_stops_on_signals(make_daemon, fake_upstream) -> None:
    upstream = fake_upstream()
    d = make_daemon({"example.com": upstream.port})
    proc = subprocess.Popen([*CHECKOUT_COMMAND, "-f", "-c", str(d.config)], stderr=subprocess.PIPE, text=True)
    try:
        def accepting() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", d.port)) == 0

        wait_until(accepting, 15, "the foreground willi to listen")
        assert not d.pidfile.exists(), "-f writes no pidfile"
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert d.send()[0] == 250
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0, stderr
    assert "configuration reloaded" in stderr and "stopped" in stderr

"""Tests of the benchmark's own parts: `python3 -m pytest bench/` (not in the project's suite: tests/)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import idleclient
import proctree
import pytest
import services
import throughput

try:
    import tomllib
except ImportError:  # Python < 3.11
    import toml as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("buf", "expected"), [
    (b"", None),
    (b"220 mx ready", None),
    (b"220 mx ready\r\n", (220, b"220 mx ready", 14)),
    (b"250-mx\r\n250-PIPELINING\r\n", None),
    (b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\nrest", (250, b"250-mx", 37)),
    (b"421\r\n", (421, b"421", 5)),
    (b"250 ok\n", (250, b"250 ok", 7)),
    (b"garbage\r\n", (0, b"garbage", 9)),
])
def test_first_reply(buf: bytes, expected: tuple[int, bytes, int] | None) -> None:
    assert idleclient.first_reply(buf) == expected


def test_parse_stat_survives_parentheses_and_spaces_in_the_name() -> None:
    fields = ["S", "41"] + ["0"] * 9 + ["7", "5", "3", "2"] + ["0"] * 4 + ["999", "0"]
    stat = proctree.parse_stat(f"1234 (a) b (c) {' '.join(fields)}\n")
    assert stat == proctree.ProcStat(pid=1234, ppid=41, start_ticks=999, cpu_ticks=17)


def test_parse_stat_of_this_process() -> None:
    stat = proctree.read_stat(os.getpid())
    assert stat is not None and stat.pid == os.getpid() and stat.ppid == os.getppid()


def test_descendants_walks_the_whole_tree_and_nothing_else() -> None:
    def p(pid: int, ppid: int) -> proctree.ProcStat:
        return proctree.ProcStat(pid, ppid, 0, 0)
    table = [p(1, 0), p(10, 1), p(11, 10), p(12, 10), p(13, 12), p(20, 1), p(21, 20)]
    assert sorted(s.pid for s in proctree.descendants(10, table)) == [10, 11, 12, 13]
    assert proctree.descendants(99, table) == []


def test_tree_cpu_counts_a_reaped_child() -> None:
    """A worker that burned CPU and was reaped still counts (cutime of its parent)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    parent = ("import subprocess, sys, time\n"
              f"subprocess.run([sys.executable, '-c', {burn!r}])\nprint('reaped', flush=True)\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "reaped\n"
        assert proctree.tree_cpu_seconds(proc.pid) >= 0.25
        assert proctree.tree_rss_kib(proc.pid) > 0
    finally:
        proc.kill()
        proc.wait()


def test_still_running_tells_a_gone_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = proctree.read_stat(proc.pid)
    proc.wait()
    assert stat is not None and not proctree.still_running(stat)
    me = proctree.read_stat(os.getpid())
    assert me is not None and proctree.still_running(me)


@pytest.mark.parametrize(("text", "expected"), [
    ("2", "2"), ("false", "false"), ('"x y"', '"x y"'), ("[1, 2]", "[1, 2]"), ("30s", '"30s"'),
    ("20MiB", '"20MiB"'), ("info", '"info"'),
])
def test_toml_value(text: str, expected: str) -> None:
    assert services.toml_value(text) == expected


def test_parse_willi_with_extra_settings() -> None:
    spec = services.parse_willi(f"after={ROOT},workers=2,read_timeout=30s")
    assert spec == services.WilliSpec("after", ROOT, {"workers": "2", "read_timeout": '"30s"'})


@pytest.mark.parametrize("arg", ["nolabel", "=/x", f"direct={ROOT}", f"a b={ROOT}", "a=/nonexistent",
                                 f"a={ROOT},novalue", f"a={ROOT},bad key=1"])
def test_parse_willi_refuses(arg: str) -> None:
    with pytest.raises(ValueError):
        services.parse_willi(arg)


def test_willi_config_is_toml_and_the_users_keys_win() -> None:
    text = services.willi_config(2525, 2626, {"loglevel": '"warning"', "workers": "2"})
    config = tomllib.loads(text)
    assert config["listen"] == "127.0.0.1:2525" and config["loglevel"] == "warning" and config["workers"] == 2
    assert config["max_connections_per_ip"] == 30000
    assert config["mappings"] == [{"type": "static", "server": "127.0.0.1:2626", "tls_verify": False}]


def test_willi_config_is_accepted_by_this_checkout(tmp_path: Path) -> None:
    path = tmp_path / "willi.toml"
    path.write_text(services.willi_config(2525, 2626, {}))
    sys.path.insert(0, str(ROOT))
    from willi.config import load_config
    assert load_config(path).max_connections == 30000


@pytest.mark.parametrize(("data", "expected"), [
    (b"", 0), (b"sess=1 quit=1 mesg=1\r", 1), (b"mesg=9\rsess=10 quit=10 mesg=10\r", 10),
    (b"mesg=12\rsess=13 quit=13 mesg=1", 12),  # the last update is still being written
])
def test_last_count(data: bytes, expected: int) -> None:
    assert services.last_count(data) == expected


@pytest.mark.parametrize(("octets", "text"), [(1000, "1 KB"), (100_000, "100 KB"), (20_000_000, "20 MB"),
                                              (1500, "1500 B")])
def test_human_size(octets: int, text: str) -> None:
    assert throughput.human_size(octets) == text


@pytest.mark.parametrize(("value", "text"), [(2167.4, "2,167"), (73.61, "73.6"), (4.874, "4.87"), (0.0, "0.00")])
def test_number(value: float, text: str) -> None:
    assert throughput.number(value) == text


def test_table_shows_medians_ratio_and_failures() -> None:
    shape = throughput.Shape("1k-c1", 2000, 1000, 1)
    Run = throughput.Run
    cells = {"1k-c1": {
        "direct": throughput.Cell([Run("direct", 1.0, True), Run("direct", 2.0, True), Run("direct", 4.0, True)]),
        "a": throughput.Cell([Run("a", 4.0, True, cpu_seconds=4.0)] * 3),
        "b": throughput.Cell([Run("b", 4.0, True), Run("b", 9.0, False, "sink received 1999 of 2000")]),
    }}
    lines = throughput.mode_table("xclient", cells, [shape], ["a", "b"])
    row = next(line for line in lines if line.startswith("2000 x 1 KB, c=1"))
    assert "1,000" in row and "0.50" in row and "100%" in row and "FAILED 1/2" in row
    assert any("b, 2000 x 1 KB, c=1, run 2: sink received 1999 of 2000" in line for line in lines)


def test_a_run_with_no_time_has_no_rate() -> None:
    run = throughput.Run("a", 0.0, False, "willi exited", cpu_seconds=None)
    assert run.rate(throughput.SHAPES["20m"]) == 0.0 and run.cpu_percent() is None


def test_quick_options_shrink_the_shapes() -> None:
    args = throughput.parse_args(["--quick", "--shapes", "1k-c50,20m"])
    assert [(s.messages, s.sessions) for s in args.shapes] == [(200, 50), (1, 1)]
    assert args.repeat == 1 and args.idle == 1000 and args.willi == [services.WilliSpec("willi", ROOT)]


def test_burst_against_a_listener_that_never_greets_is_bounded() -> None:
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(50)
        started = time.monotonic()
        result = idleclient.burst(server.getsockname()[1], 5, timeout=0.5)
    assert result.greeted == 0 and result.failures == {"no greeting within 0.5 s": 5}
    assert time.monotonic() - started < 5

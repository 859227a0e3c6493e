"""CPU time and memory of a process *and all its descendants*, read from /proc.

Willi runs worker processes (design.md, "Process model"), so a figure taken
from the parent alone would miss most of the work. A process's own
utime+stime covers all its threads; cutime+cstime hold what its children
used once they were reaped, so summing all four over the live tree counts
every tick exactly once, also for workers that came and went.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The few /proc/PID/stat fields the benchmark needs."""

    pid: int
    ppid: int
    start_ticks: int  # since boot: tells a reused PID from the process we started
    cpu_ticks: int  # utime + stime + cutime + cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one /proc/PID/stat line (the command name may hold spaces and parentheses)."""
    head, _, tail = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()  # fields[0] is field 3 (state) of proc(5)
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcStat(pid=pid, ppid=int(fields[1]), start_ticks=int(fields[19]),
                    cpu_ticks=utime + stime + cutime + cstime)


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None when it is gone."""
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def all_stats() -> list[ProcStat]:
    """Every process visible now; ones that vanish while we read are skipped."""
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def descendants(root: int, stats: list[ProcStat]) -> list[ProcStat]:
    """Root (if alive) and everything below it, from one snapshot of the process table."""
    children: dict[int, list[ProcStat]] = {}
    by_pid = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
        by_pid[stat.pid] = stat
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in by_pid:
            found.append(by_pid[pid])
        todo.extend(child.pid for child in children.get(pid, ()))
    return found


def tree(root: int) -> list[ProcStat]:
    return descendants(root, all_stats())


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by root and all its descendants."""
    return sum(stat.cpu_ticks for stat in tree(root)) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone or a zombie)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_kib(root: int) -> int:
    """Sum of RSS over root's process tree (pages shared after fork count once per process)."""
    return sum(rss_kib(stat.pid) for stat in tree(root))


def still_running(stat: ProcStat) -> bool:
    """True while the process we saw is alive (not merely some process with its PID)."""
    now = read_stat(stat.pid)
    return now is not None and now.start_ticks == stat.start_ticks

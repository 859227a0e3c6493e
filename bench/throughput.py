#!/usr/bin/env python3
"""Willi's throughput and idle-connection cost, against smtp-sink directly, for several checkouts in one run.

Postfix's smtp-source is the client and smtp-sink the upstream, on loopback
only (Debian package `postfix`). For each load shape the same smtp-source
command runs straight to the sink ("direct") and through every Willi given
with --willi, alternating within each repetition so that machine noise hits
all of them alike. Each message is its own SMTP session (one connection per
message), and every run is checked: smtp-source must exit 0 and the sink's
message counter must grow by exactly the messages sent. Then a selector
client holds --idle connections on each Willi (RSS per connection, CPU while
idle) and fires a burst of connections on top of them (time until all got
their 220 greeting).

    .venv/bin/python bench/throughput.py                               # this checkout, full run
    .venv/bin/python bench/throughput.py --quick                       # smoke run
    .venv/bin/python bench/throughput.py --willi before=/tmp/old --willi after=.,workers=2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import idleclient
import proctree
from services import Sink, StartError, Willi, WilliSpec, parse_willi

ROOT = Path(__file__).resolve().parent.parent
DIRECT = "direct"
MODES = {"xclient": "sink offers XCLIENT", "noxclient": "sink without XCLIENT (smtp-sink -C)"}


@dataclass(frozen=True)
class Shape:
    """One load: how many messages of what payload size over how many parallel sessions."""

    key: str
    messages: int
    size: int  # smtp-source -l: payload octets, headers not counted
    sessions: int  # smtp-source -s

    @property
    def label(self) -> str:
        return f"{self.messages} x {human_size(self.size)}, c={self.sessions}"


def human_size(octets: int) -> str:
    """1000 -> "1 KB", 20000000 -> "20 MB" (decimal units, as MB/s is)."""
    for unit, scale in (("MB", 10**6), ("KB", 10**3)):
        if octets >= scale and octets % scale == 0:
            return f"{octets // scale} {unit}"
    return f"{octets} B"


# 20 MB (decimal) fits under Willi's default max_message_bytes of 20 MiB with smtp-source's headers.
SHAPES = {s.key: s for s in (Shape("1k-c1", 2000, 1000, 1), Shape("1k-c10", 2000, 1000, 10),
                             Shape("1k-c50", 2000, 1000, 50), Shape("100k-c10", 200, 100_000, 10),
                             Shape("20m", 1, 20_000_000, 1))}
QUICK_MESSAGES = {"1k-c1": 200, "1k-c10": 200, "1k-c50": 200, "100k-c10": 20, "20m": 1}
WARM_UP = Shape("warm-up", 20, 1000, 5)


@dataclass
class Run:
    """One smtp-source run against one target."""

    target: str
    seconds: float
    ok: bool
    problem: str = ""
    cpu_seconds: float | None = None  # Willi's process tree during the run; None for direct

    def rate(self, shape: Shape) -> float:
        return shape.messages / self.seconds if self.seconds else 0.0

    def megabytes(self, shape: Shape) -> float:
        return shape.messages * shape.size / self.seconds / 1e6 if self.seconds else 0.0

    def cpu_percent(self) -> float | None:
        return None if self.cpu_seconds is None or not self.seconds else 100.0 * self.cpu_seconds / self.seconds


@dataclass
class Cell:
    """All repetitions of one shape against one target, and their medians."""

    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def median(self, shape: Shape) -> dict[str, float | None]:
        cpu = [c for r in self.runs if (c := r.cpu_percent()) is not None]
        return {"msg_per_s": statistics.median(r.rate(shape) for r in self.runs),
                "mb_per_s": statistics.median(r.megabytes(shape) for r in self.runs),
                "cpu_percent": statistics.median(cpu) if cpu else None}


def source_command(port: int, shape: Shape) -> list[str]:
    return ["smtp-source", "-s", str(shape.sessions), "-m", str(shape.messages), "-l", str(shape.size),
            "-M", "client.bench.test", "-f", "sender@client.bench.test", "-t", "rcpt@bench.willi.test",
            f"127.0.0.1:{port}"]


def measure(target: str, port: int, willi: Willi | None, sink: Sink, shape: Shape, timeout: float) -> Run:
    """Run smtp-source once against port; check its status and the sink's count."""
    if willi is not None and not willi.child.alive():
        return Run(target, 0.0, False, f"willi exited with status {willi.child.popen.returncode}; "
                                       f"log: {willi.child.log_path}")
    received = sink.messages()
    cpu_before = proctree.tree_cpu_seconds(willi.pid) if willi else 0.0
    started = time.perf_counter()
    try:
        done = subprocess.run(source_command(port, shape), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
        status, stderr = done.returncode, done.stderr.decode(errors="replace").strip()
    except subprocess.TimeoutExpired:
        status, stderr = None, f"killed after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    cpu = proctree.tree_cpu_seconds(willi.pid) - cpu_before if willi else None
    delivered = sink.wait_messages(received + shape.messages) - received
    problems = []
    if status != 0:
        last = stderr.splitlines()[-1] if stderr else ""
        problems.append(f"smtp-source exit {status}: {last}" if status is not None else f"smtp-source {stderr}")
    if delivered != shape.messages:
        problems.append(f"sink received {delivered} of {shape.messages}")
    if problems and willi is not None:
        problems.append(f"log: {willi.child.log_path}")
    return Run(target, seconds, not problems, "; ".join(problems), cpu)


def run_mode(mode: str, sink: Sink, specs: Sequence[WilliSpec], shapes: Sequence[Shape], repeat: int,
             timeout: float, workdir: Path, cells: dict[str, dict[str, Cell]]) -> None:
    """All shapes in one mode: start this mode's Willis, measure into `cells`, stop them."""
    willis: list[Willi] = []
    try:
        for spec in specs:
            willis.append(Willi(spec, sink, workdir, mode))
        targets: list[tuple[str, int, Willi | None]] = [(DIRECT, sink.port, None)]
        targets += [(w.spec.label, w.port, w) for w in willis]
        for label, port, willi in targets:  # imports, first threads, the sink's first connections
            warm = measure(label, port, willi, sink, WARM_UP, timeout)
            if not warm.ok:
                print(f"bench: {mode}: warm-up of {label} failed: {warm.problem}", file=sys.stderr)
        for shape in shapes:
            for rep in range(repeat):
                line = []
                for label, port, willi in targets:
                    run = measure(label, port, willi, sink, shape, timeout)
                    cells.setdefault(shape.key, {}).setdefault(label, Cell()).runs.append(run)
                    cpu = run.cpu_percent()
                    line.append(f"{label} " + (f"{number(run.rate(shape))} msg/s" if run.ok else "FAILED")
                                + (f" ({cpu:.0f}% CPU)" if cpu is not None and run.ok else ""))
                print(f"  {mode} {shape.key} run {rep + 1}/{repeat}: " + ", ".join(line), file=sys.stderr)
    finally:
        stop_all(willis)


def run_idle(specs: Sequence[WilliSpec], sink: Sink, count: int, burst: int, idle_seconds: float,
             workdir: Path, results: dict[str, idleclient.IdleResult]) -> None:
    """The idle test on a fresh Willi per checkout (no earlier load in its memory figures)."""
    for spec in specs:
        willi = Willi(spec, sink, workdir, "idle")
        try:
            time.sleep(0.5)
            print(f"  idle {spec.label}: opening {count} connections", file=sys.stderr)
            result = results[spec.label] = idleclient.measure_idle(willi.pid, willi.port, count, burst, idle_seconds)
            burst_text = f", burst {result.burst.greeted}/{burst} greeted" if result.burst else ""
            print(f"  idle {spec.label}: {result.opened} opened in {result.open_seconds:.1f} s, "
                  f"idle CPU {result.idle_cpu_percent:.0f}%{burst_text}", file=sys.stderr)
        finally:
            willi.stop()


def stop_all(children: Sequence[Willi | Sink]) -> None:
    """Stop each by its PID, the rest even when stopping one fails or is interrupted."""
    interrupted = False
    for child in children:
        try:
            child.stop()
        except KeyboardInterrupt:
            interrupted = True
            child.child.stop(grace=0)  # SIGTERM and straight on to SIGKILL
        except Exception as exc:
            print(f"bench: stopping {child.child.name} (pid {child.child.pid}): {exc}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt


def number(value: float) -> str:
    """Three significant figures or so, with thousands separators: 2,167 / 73.6 / 4.87."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def mode_table(mode: str, cells: dict[str, dict[str, Cell]], shapes: Sequence[Shape],
               labels: Sequence[str]) -> list[str]:
    """The readable table of one mode, followed by the reasons of any failed runs."""
    shape_w = max(len(s.label) for s in shapes) + 2
    direct_w, willi_w = 17, 31
    head1 = " " * shape_w + f"{'direct':<{direct_w}}" + "".join(f"| {label:<{willi_w - 2}}" for label in labels)
    head2 = (f"{'shape':<{shape_w}}" + f"{'msg/s':>8}{'MB/s':>8} "
             + f"| {'ratio':>6}{'msg/s':>8}{'MB/s':>8}{'CPU%':>6} " * len(labels))
    out = [f"mode: {MODES[mode]}", head1.rstrip(), head2.rstrip()]
    problems = []
    for shape in (s for s in shapes if s.key in cells):
        row = cells[shape.key]
        direct = row.get(DIRECT, Cell())
        line = f"{shape.label:<{shape_w}}"
        d: dict[str, float | None] = {}
        if direct.ok:
            d = direct.median(shape)
            line += f"{number(d['msg_per_s'] or 0):>8}{number(d['mb_per_s'] or 0):>8} "
        else:
            line += f"{failed_text(direct):>16} "
        for label in labels:
            cell = row.get(label, Cell())
            if not cell.ok:
                line += f"| {failed_text(cell):>28} "
                continue
            m = cell.median(shape)
            ratio = f"{(m['msg_per_s'] or 0) / d['msg_per_s']:.2f}" if d.get("msg_per_s") else "-"
            cpu = f"{m['cpu_percent']:.0f}%" if m["cpu_percent"] is not None else "-"
            line += f"| {ratio:>6}{number(m['msg_per_s'] or 0):>8}{number(m['mb_per_s'] or 0):>8}{cpu:>6} "
        out.append(line.rstrip())
        for label, cell in row.items():
            problems += [f"  ! {label}, {shape.label}, run {i + 1}: {r.problem}"
                         for i, r in enumerate(cell.runs) if not r.ok]
    return out + problems


def failed_text(cell: Cell) -> str:
    bad = sum(not r.ok for r in cell.runs)
    return f"FAILED {bad}/{len(cell.runs)}" if cell.runs else "not run"


def idle_lines(results: dict[str, idleclient.IdleResult], count: int, burst: int, idle_seconds: float) -> list[str]:
    out = [f"idle connections (N={count}, each past 220 and EHLO; CPU over {idle_seconds:.0f} s idle; "
           f"then a burst of {burst} new connections on top, timed until all got 220):"]
    width = max(len(label) for label in results)
    for label, r in results.items():
        per = f"{r.kib_per_connection:.1f} KiB/conn" if r.kib_per_connection is not None else "- KiB/conn"
        opened = f"{r.opened} opened in {r.open_seconds:.1f} s" + ("" if r.opened == count else f" (of {count})")
        line = f"  {label:<{width}}  {per:>15}   idle CPU {r.idle_cpu_percent:.0f}%   "
        if r.burst is not None:
            line += f"burst {r.burst.greeted}/{r.burst.requested} greeted in {r.burst.seconds:.2f} s   "
        out.append(line + f"({opened})")
        failures = {**r.failures, **(r.burst.failures if r.burst else {})}
        out += [f"  ! {label}: {n} x {why}" for why, n in failures.items()]
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="shapes: " + ", ".join(f"{k} ({s.label})" for k, s in SHAPES.items()))
    parser.add_argument("--willi", action="append", type=willi_argument, metavar="LABEL=DIR[,key=value,...]",
                        help="a checkout to measure (repeatable); key=value pairs are extra TOML settings "
                             f"(default: willi={ROOT})")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated subset of the shapes below; none: only the idle test")
    parser.add_argument("--modes", default=",".join(MODES), help="xclient, noxclient or both")
    parser.add_argument("--repeat", type=int, help="repetitions per shape, the median is shown (default 3)")
    parser.add_argument("--idle", type=int, metavar="N", help="idle connections per Willi, 0 skips (default 10000)")
    parser.add_argument("--burst", type=int, default=2000, help="simultaneous new connections (default 2000)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one smtp-source run may take")
    parser.add_argument("--quick", action="store_true", help="smoke run: repeat 1, fewer messages and connections")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all figures and runs to FILE")
    args = parser.parse_args(argv)
    try:
        args.shapes = [] if args.shapes == "none" else [SHAPES[k] for k in split(args.shapes)]
    except KeyError as exc:
        parser.error(f"unknown shape {exc}; choose from {', '.join(SHAPES)}")
    args.modes = split(args.modes)
    if not set(args.modes) <= set(MODES):
        parser.error(f"unknown mode in {','.join(args.modes)}; choose from {', '.join(MODES)}")
    if args.quick:
        args.shapes = [Shape(s.key, QUICK_MESSAGES[s.key], s.size, s.sessions) for s in args.shapes]
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.idle = args.idle if args.idle is not None else (1000 if args.quick else 10000)
    args.burst = min(args.burst, 500) if args.quick else args.burst
    args.idle_seconds = 2.0 if args.quick else 10.0
    args.willi = args.willi or [WilliSpec("willi", ROOT)]
    labels = [s.label for s in args.willi]
    if len(set(labels)) != len(labels):
        parser.error("each --willi needs its own label")
    if args.repeat < 1 or args.idle < 0 or args.burst < 0 or not args.modes or not (args.shapes or args.idle):
        parser.error("--repeat must be at least 1, --idle and --burst at least 0, --modes not empty, "
                     "and there must be shapes or an idle test to run")
    return args


def willi_argument(text: str) -> WilliSpec:
    try:
        return parse_willi(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def raise_fd_limit(needed: int) -> None:
    """Lift our soft open-files limit to the hard one (Willi inherits it); warn when it is still short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        print(f"bench: open-files limit {hard} < {needed} needed for the idle test; raise ulimit -n",
              file=sys.stderr)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop our children, as Ctrl-C does


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    for tool in ("smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            print(f"bench: {tool} not found: apt-get install postfix", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    raise_fd_limit(args.idle + args.burst + 200)
    workdir = Path(tempfile.mkdtemp(prefix="willi-bench-"))
    labels = [s.label for s in args.willi]
    results: dict[str, dict[str, dict[str, Cell]]] = {}
    idle: dict[str, idleclient.IdleResult] = {}
    sinks: dict[str, Sink] = {}
    ok = interrupted = False
    print("willis: " + "; ".join(f"{s.label} = {s.describe()}" for s in args.willi), file=sys.stderr)
    try:
        for mode in args.modes:
            sinks[mode] = Sink(workdir, xclient=mode == "xclient")
        for mode in args.modes if args.shapes else ():
            run_mode(mode, sinks[mode], args.willi, args.shapes, args.repeat, args.timeout, workdir,
                     results.setdefault(mode, {}))
        if args.idle:
            run_idle(args.willi, sinks[args.modes[0]], args.idle, args.burst, args.idle_seconds, workdir, idle)
        ok = all(cell.ok for mode in results.values() for row in mode.values() for cell in row.values())
        ok = ok and all(r.ok for r in idle.values())
    except StartError as exc:
        print(f"bench: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; stopping what it started, figures so far follow", file=sys.stderr)
    finally:
        stop_all(list(sinks.values()))
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: configurations, logs and sink counters kept in {workdir}", file=sys.stderr)
    report = [f"{s.label}: {s.describe()}" for s in args.willi]
    if results:
        report += [f"smtp-source -> [Willi ->] smtp-sink on 127.0.0.1, one connection per message, "
                   f"median of {args.repeat} run{'s' if args.repeat > 1 else ''}",
                   "ratio = Willi msg/s / direct msg/s; CPU% = Willi's whole process tree, 100% = one core; "
                   "MB = 10^6 payload octets (smtp-source -l)"]
    for mode, cells in results.items():
        report += ["", *mode_table(mode, cells, args.shapes, labels)]
    if idle:
        report += ["", *idle_lines(idle, args.idle, args.burst, args.idle_seconds)]
    print("\n".join(report))
    if args.json:
        figures = {"ok": ok, "interrupted": interrupted, **to_json(args, results, idle)}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 130 if interrupted else 0 if ok else 1


def to_json(args: argparse.Namespace, results: dict[str, dict[str, dict[str, Cell]]],
            idle: dict[str, idleclient.IdleResult]) -> dict[str, Any]:
    shapes = {s.key: s for s in args.shapes}
    return {
        "repeat": args.repeat,
        "willis": [{"label": s.label, "directory": str(s.directory), "extra": s.extra,
                    "revision": s.describe()} for s in args.willi],
        "shapes": {k: {**asdict(s), "label": s.label} for k, s in shapes.items()},
        "modes": {mode: {key: {target: {"ok": cell.ok, **cell.median(shapes[key]),
                                        "runs": [{**asdict(r), "msg_per_s": r.rate(shapes[key]),
                                                  "mb_per_s": r.megabytes(shapes[key]),
                                                  "cpu_percent": r.cpu_percent()} for r in cell.runs]}
                               for target, cell in row.items()}
                         for key, row in cells.items()}
                  for mode, cells in results.items()},
        "idle": {label: r.as_dict() for label, r in idle.items()},
        "idle_settings": {"connections": args.idle, "burst": args.burst, "idle_seconds": args.idle_seconds},
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Messages per second through Willi vs straight to the sink, in one run.

Uses Postfix's smtp-source (client) and smtp-sink (upstream) from Debian's
`postfix` package, on loopback only. Prints figures; asserts nothing.

    python3 bench/throughput.py [--messages 2000] [--sessions 20] [--size 4096]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def source(port: int, args: argparse.Namespace, keep: bool) -> float:
    """Run smtp-source to completion; return messages per second."""
    cmd = ["smtp-source", *(["-d"] if keep else []), "-s", str(args.sessions), "-m", str(args.messages),
           "-l", str(args.size), "-f", "bench@sender.example", "-t", "rcpt@example.com", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600)
    return args.messages / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20, help="parallel client sessions")
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install postfix", file=sys.stderr)
            return 2
    sink_port, willi_port = free_port(), free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{sink_port}", "1024"])
    workdir = Path(tempfile.mkdtemp(prefix="willi-bench-"))
    willi = None
    try:
        wait_port(sink_port)
        config = workdir / "willi.toml"
        config.write_text(
            f'listen = "127.0.0.1:{willi_port}"\ndomain = "bench.willi.test"\nloglevel = "warning"\n'
            f"max_connections_per_ip = 1000\nclient_name_lookup = false\n"
            f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{sink_port}"\ntls_verify = false\n')
        willi = subprocess.Popen([sys.executable, str(ROOT / "willi.py"), "-c", str(config), "-f"],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_port(willi_port)
        figures = {keep: (source(sink_port, args, keep), source(willi_port, args, keep)) for keep in (False, True)}
    finally:
        if willi is not None:
            willi.send_signal(signal.SIGTERM)
            willi.wait(timeout=30)
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.messages} messages of {args.size} octets, {args.sessions} parallel sessions:")
    for keep, (direct, proxied) in figures.items():
        mode = "connections kept (smtp-source -d)" if keep else "one connection per message"
        print(f"  {mode}:")
        print(f"    straight to smtp-sink: {direct:8.0f} msg/s")
        print(f"    through Willi:         {proxied:8.0f} msg/s  ({proxied / direct:.0%} of direct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Counters for Prometheus, through the standard `prometheus_client` library.

`metrics_listen` unset (the default): every method is a no-op and
prometheus_client is not even imported, so the hot path pays nothing.

Set: each process records into prometheus_client's metrics. With several
worker processes the library's multiprocess mode is used: the parent sets
PROMETHEUS_MULTIPROC_DIR before any worker exists, each worker writes its
values to files there, and the parent, which serves /metrics, sums them
(`MultiProcessCollector`); a dead worker's live gauges are dropped
(`mark_process_dead`). Labels never carry addresses: results and mapping
kinds only (`resolver.metric_labels`: `csv`, `sql`, `static`), so the number
of series stays small and fixed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("willi.metrics")

#: Seconds, from a fast lookup to a slow upstream's final-dot verdict (several minutes).
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)
BYTES_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760, 26214400, 52428800)
HTTP_TIMEOUT = 2.0


class Metrics:
    """The interface, as no-ops: what a process with metrics off uses."""

    enabled = False

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def transaction(self, result: str) -> None: ...
    def recipient(self, result: str) -> None: ...
    def upstream_connect(self, result: str, seconds: float | None = None) -> None: ...
    def lookup(self, mapping: str, seconds: float) -> None: ...
    def lookup_cache(self, hit: bool) -> None: ...
    def message_bytes(self, size: int) -> None: ...


class PrometheusMetrics(Metrics):
    """The real counters (prometheus_client)."""

    enabled = True

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry or REGISTRY
        self.connections = Counter("willi_connections", "Client connections accepted", registry=reg)
        self.active = Gauge("willi_connections_active", "Client connections open now", registry=reg,
                            multiprocess_mode="livesum")
        self.transactions = Counter("willi_transactions", "Transactions by result (as in the log)", ["result"],
                                    registry=reg)
        self.recipients = Counter("willi_recipients", "Recipients by result: accept, reject, tempfail, split",
                                  ["result"], registry=reg)
        self.upstream_connects = Counter("willi_upstream_connects", "Upstream connections by result", ["result"],
                                         registry=reg)
        self.upstream_seconds = Histogram("willi_upstream_connect_seconds",
                                          "Time to a usable upstream connection (connect to EHLO/XCLIENT)",
                                          buckets=SECONDS_BUCKETS, registry=reg)
        self.lookup_seconds = Histogram("willi_lookup_seconds", "Mapping lookups by mapping", ["mapping"],
                                        buckets=SECONDS_BUCKETS, registry=reg)
        self.cache = Counter("willi_lookup_cache", "Lookup cache hits and misses", ["result"], registry=reg)
        self.bytes = Histogram("willi_message_bytes", "Sizes of messages relayed", buckets=BYTES_BUCKETS,
                               registry=reg)

    def connection_opened(self) -> None:
        self.connections.inc()
        self.active.inc()

    def connection_closed(self) -> None:
        self.active.dec()

    def transaction(self, result: str) -> None:
        self.transactions.labels(result).inc()

    def recipient(self, result: str) -> None:
        self.recipients.labels(result).inc()

    def upstream_connect(self, result: str, seconds: float | None = None) -> None:
        self.upstream_connects.labels(result).inc()
        if seconds is not None:
            self.upstream_seconds.observe(seconds)

    def lookup(self, mapping: str, seconds: float) -> None:
        self.lookup_seconds.labels(mapping).observe(seconds)

    def lookup_cache(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()

    def message_bytes(self, size: int) -> None:
        self.bytes.observe(size)


#: This process's metrics; replaced by `enable()` when metrics_listen is set.
METRICS: Metrics = Metrics()


def prepare_multiprocess(directory: str) -> None:
    """Before prometheus_client is imported anywhere: make every process write its values under `directory`."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))


def enable() -> Metrics:
    """Turn the counters on in this process (a worker, or the only process)."""
    global METRICS
    if not METRICS.enabled:
        METRICS = PrometheusMetrics()
    return METRICS


def mark_dead(pid: int) -> None:
    """A worker is gone: its live gauges no longer count (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def exposition() -> tuple[bytes, str]:
    """The text the /metrics endpoint serves, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve_request(listener: socket.socket) -> None:
    """Answer one HTTP request on the metrics listener; called from the main loop when it is readable.

    A tiny HTTP/1.0 responder instead of prometheus_client's threaded
    server: the main loop stays single-threaded, so forking a worker is
    always safe, and a slow scraper is cut off after HTTP_TIMEOUT.
    """
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        deadline = time.monotonic() + HTTP_TIMEOUT
        request = b""
        try:
            while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < 8192:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                conn.settimeout(remaining)
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            first = request.split(b"\n", 1)[0].split()
            if len(first) >= 2 and first[0] == b"GET" and first[1].split(b"?", 1)[0] in (b"/metrics", b"/"):
                body, ctype = exposition()
                head = f"HTTP/1.0 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            else:
                body, head = b"not found\n", "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\n"
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(head.encode("ascii") + body)
        except OSError:
            return
        except Exception:
            log.exception("metrics request failed")

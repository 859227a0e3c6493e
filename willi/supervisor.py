"""The main loop: one serving process (`workers = 1`), or a pre-fork parent and its workers.

CPython's GIL lets one process use about one core, so Willi runs `workers`
processes the way production Python servers do (design.md, Process model):
the parent has bound the listeners (as root) and dropped privileges; it
forks the workers, which serve the inherited sockets, and then only
supervises. A worker that dies is logged and replaced (its connection
counts are cleared); SIGTERM, SIGHUP and SIGUSR1 to the parent reach every
worker over a control channel and keep their meaning:

- TERM/INT: graceful drain (no new connections, idle clients 421 4.3.2,
  transactions in flight may finish for `shutdown_timeout`); a second one
  during the drain ends it at once (open sessions get 421 4.3.2, upstream
  transactions are cut without the final dot).
- HUP: the parent checks the new configuration once, in a short-lived child
  running as the service user (so the parent never holds database
  connections or threads that a fork would copy), then sends the checked
  configuration to every worker.
- USR1: every process reopens its log file.

Workers also act on TERM/INT themselves (systemd's default KillMode signals
every process of the unit), and a worker whose parent disappears (its
control channel reaches EOF) drains and exits. The parent stays
single-threaded: it serves /metrics from its own loop, so every fork is
safe.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from willi import metrics
from willi.config import Config, ConfigError, load_config
from willi.log import reopen_log_files, set_syslog_ident
from willi.mappings.base import MappingError
from willi.runtime import Runtime
from willi.server import WilliService
from willi.signals import Signals
from willi.tls import TlsSetupError

log = logging.getLogger("willi")

#: Settings read only at start; a reload that changes them says so.
RESTART_KEYS = ("listen", "user", "group", "pidfile", "logfile", "syslog_facility", "workers", "metrics_listen",
                "listen_backlog")
LOAD_ERRORS = (ConfigError, OSError, MappingError, TlsSetupError)
WORKER_START_TIMEOUT = 60.0
CHECK_TIMEOUT = 60.0
RESPAWN_DELAY_MAX = 30.0
QUICK_DEATH = 5.0


def _restart_notes(started: Config, config: Config) -> list[str]:
    notes = []
    for key in RESTART_KEYS:
        old, new = getattr(started, key), getattr(config, key)
        if old != new:
            shown_old = (", ".join(map(str, old)) if key == "listen" else str(old)) or '""'
            shown_new = (", ".join(map(str, new)) if key == "listen" else str(new)) or '""'
            notes.append(f"reload: {key} changed ({shown_old} -> {shown_new}); this takes effect only after a restart")
    return notes


def apply_reload(service: WilliService, config: Config, started: Config, *, notes: bool = True) -> bool:
    """Build a runtime for `config` here and swap it in; keep the running one on any error.

    `notes` False in a worker: the parent, which checked the file, has told
    the operator once which settings need a restart.
    """
    try:
        runtime = Runtime.load(config)
    except LOAD_ERRORS as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    except Exception:
        log.exception("reload failed, keeping the running configuration")
        return False
    for note in _restart_notes(started, config) if notes else ():
        log.warning("%s", note)
    service.reload(runtime)
    logging.getLogger("willi").setLevel(config.loglevel.upper())
    log.info("configuration reloaded from %s", config.path)
    return True


def reload_service(service: WilliService, path: str, started: Config | None = None) -> bool:
    """SIGHUP in a single process: load the file again; on any error keep the running configuration."""
    try:
        config = load_config(path)
    except LOAD_ERRORS as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    return apply_reload(service, config, started or service.config)


def _drain_and_wait(service: WilliService, signals: Signals, timeout: float,
                    control: _ControlReader | None = None) -> None:
    """Drain, then wait for the sessions; a second stop (a signal, or "force" from the parent) ends it at once.

    A worker told to drain by its parent may get its own first SIGTERM
    after that (systemd's KillMode=control-group signals every process of
    the unit, so does `kill` of every PID): one signal per process is still
    one stop, so only a second own signal counts.
    """
    service.drain()
    deadline = time.monotonic() + timeout
    stops = max(signals.stops, 1)
    while service.sessions():
        fds = [control.fd] if control is not None and not control.eof else []
        ready = signals.wait(0.05, fds)
        forced = control is not None and bool(ready) and control() == "force"
        if forced or signals.stops > stops or time.monotonic() >= deadline:
            if signals.stops > stops or forced:
                log.info("second stop request: ending the drain now")
            service.force()
            service.finish_force()
            return


# ---------------------------------------------------------------- one process


def serve_single(service: WilliService, path: str, started: Config, signals: Signals,
                 metrics_listener: socket.socket | None = None) -> int:
    """`workers = 1`: this process serves; the main thread acts on signals and /metrics."""
    fds = [metrics_listener.fileno()] if metrics_listener is not None else []
    while True:
        ready = signals.wait(None, fds)
        if ready and metrics_listener is not None:
            metrics.serve_request(metrics_listener)
        if signals.stop:
            timeout = service.config.shutdown_timeout
            log.info("%s: stopping; no new connections, transactions in flight may take up to %gs "
                     "(a second signal ends them at once)", signal.Signals(signals.stop).name, timeout)
            _drain_and_wait(service, signals, timeout)
            if service.runtime is not None:
                service.runtime.close()
            log.info("stopped")
            return 0
        if signals.reopen:
            signals.reopen = False
            _reopen_logs()
        if signals.reload:
            signals.reload = False
            reload_service(service, path, started)


def _reopen_logs() -> None:
    for filename, error in reopen_log_files():
        if error is None:
            log.info("SIGUSR1: log file %s reopened", filename)
        else:
            log.error("SIGUSR1: cannot reopen log file %s, still writing to the old one: %s", filename,
                      error.strerror)


# ---------------------------------------------------------------- workers


@dataclass
class Worker:
    """The parent's view of one worker process."""

    index: int
    pid: int
    control: Connection
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    deaths: int = 0


class _ControlReader:
    """A worker's end of the control channel, readable without blocking."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.messages: list[tuple] = []
        self.eof = False

    def __call__(self) -> str | None:
        """Read what is there; the name of the last command read (or None)."""
        last = None
        try:
            while self.conn.poll(0):
                message = self.conn.recv()
                self.messages.append(message)
                last = message[0]
        except (EOFError, OSError):
            self.eof = True  # the parent is gone: drain and exit
        return last


def worker_main(index: int, service: WilliService, control: Connection, config: Config) -> int:
    """In a forked worker: load the runtime as the service user, serve, obey the parent."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # the parent handles these and tells us
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signals = Signals()
    signals.install()
    set_syslog_ident(os.getpid())
    service.limits.own(index)
    if config.metrics_listen is not None:
        metrics.enable()
    try:
        service.install(Runtime.load(config))
        service.start(announce=False)  # the parent says where it listens, once
    except LOAD_ERRORS as exc:
        control.send(("error", str(exc)))
        return 1
    except Exception as exc:
        log.exception("worker %d: start-up failed", index)
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return 1
    control.send(("ready", os.getpid()))
    reader = _ControlReader(control)
    started = config
    while True:
        ready = signals.wait(None, [reader.fd])
        if ready:
            reader()
        messages, reader.messages = reader.messages, []
        for message in messages:
            if message[0] == "reload":
                apply_reload(service, message[1], started, notes=False)
            elif message[0] == "reopen":
                _reopen_logs()
        commands = {m[0] for m in messages}
        if signals.stops or reader.eof or commands & {"drain", "force"}:
            if "force" in commands or signals.stops >= 2:
                service.drain()
                service.force()
                service.finish_force()
            else:
                _drain_and_wait(service, signals, service.config.shutdown_timeout, None if reader.eof else reader)
            if service.runtime is not None:
                service.runtime.close()
            return 0


class Supervisor:
    """The pre-fork parent: forks the workers, replaces dead ones, relays signals, serves /metrics."""

    def __init__(self, service: WilliService, path: str, config: Config, signals: Signals,
                 metrics_listener: socket.socket | None = None) -> None:
        self.service = service
        self.path = path
        self.started = config
        self.config = config
        self.signals = signals
        self.metrics_listener = metrics_listener
        self.workers: dict[int, Worker] = {}  # index -> worker
        self.pending: dict[int, float] = {}  # index -> when to respawn
        self.deaths: dict[int, int] = {}
        self.draining = False
        self.drain_deadline = 0.0
        self.force_deadline = 0.0
        self.forced = False

    # ---------------------------------------------------------- workers

    def spawn(self, index: int) -> Worker:
        parent_end, child_end = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                parent_end.close()
                for worker in self.workers.values():
                    worker.control.close()
                if self.metrics_listener is not None:
                    self.metrics_listener.close()
                status = worker_main(index, self.service, Connection(child_end.detach()), self.config)
            except BaseException:
                log.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        worker = Worker(index, pid, Connection(parent_end.detach()))
        self.workers[index] = worker
        return worker

    def start(self) -> None:
        """Fork every worker and wait until each has loaded its runtime; StartupError-like text on failure."""
        for index in range(self.config.workers):
            self.spawn(index)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        errors = []
        for worker in list(self.workers.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not worker.control.poll(remaining):
                errors.append(f"worker {worker.index} did not start within {WORKER_START_TIMEOUT:g}s")
                continue
            try:
                kind, value = worker.control.recv()
            except (EOFError, OSError):
                errors.append(f"worker {worker.index} exited during start-up")
                continue
            if kind == "ready":
                worker.ready = True
            else:
                errors.append(str(value))
        if errors:
            self.kill_all()
            raise RuntimeError(errors[0])
        self.service.announce()
        log.info("%d worker processes serving: %s", len(self.workers),
                 ", ".join(str(w.pid) for w in self.workers.values()))

    def send_all(self, message: tuple) -> None:
        for worker in self.workers.values():
            try:
                worker.control.send(message)
            except OSError:
                pass

    def kill_all(self) -> None:
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap(block=True)

    def reap(self, block: bool = False) -> None:
        """Collect ended workers; log, clear their counts, schedule a replacement."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is None:
                continue
            del self.workers[worker.index]
            self._read_worker(worker)  # its last words (why it could not start) may not have been read yet
            worker.control.close()
            self.service.limits.reset_region(worker.index)
            metrics.mark_dead(pid)
            if self.draining:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            lived = time.monotonic() - worker.started
            deaths = self.deaths.get(worker.index, 0) + 1 if lived < QUICK_DEATH else 0
            self.deaths[worker.index] = deaths
            delay = 0.0 if deaths <= 1 else min(RESPAWN_DELAY_MAX, 2.0 ** (deaths - 1))
            log.error("worker %d (pid %d) ended with %s after %.1fs; replacing it%s", worker.index, pid, how,
                      lived, f" in {delay:g}s" if delay else "")
            self.pending[worker.index] = time.monotonic() + delay

    def respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.pending.items()):
            if when <= now:
                del self.pending[index]
                self.spawn(index)

    # ---------------------------------------------------------- the loop

    def run(self) -> int:
        signals = self.signals
        while True:
            fds = [w.control.fileno() for w in self.workers.values()]
            if self.metrics_listener is not None:
                fds.append(self.metrics_listener.fileno())
            timeout = None
            if self.pending:
                timeout = max(0.0, min(self.pending.values()) - time.monotonic())
            if self.draining:
                timeout = 0.1
            ready = signals.wait(timeout, fds)
            if self.metrics_listener is not None and self.metrics_listener.fileno() in ready:
                metrics.serve_request(self.metrics_listener)
            self._read_workers(ready)
            signals.child = False
            self.reap()
            if signals.stops and not self.draining:
                self.draining = True
                self.drain_deadline = time.monotonic() + self.config.shutdown_timeout
                self.pending.clear()
                log.info("%s: stopping %d workers; transactions in flight may take up to %gs "
                         "(a second signal ends them at once)", signal.Signals(signals.stop).name,
                         len(self.workers), self.config.shutdown_timeout)
                self.send_all(("drain",))
                self.service.close()  # our copies of the listeners: the kernel stops queueing when workers close
            if self.draining:
                now = time.monotonic()
                if not self.forced and (signals.stops >= 2 or now >= self.drain_deadline):
                    self.forced = True
                    self.send_all(("force",))
                    self.force_deadline = now + 5.0
                if self.forced and now >= self.force_deadline:
                    self.kill_all()
                if not self.workers:
                    log.info("stopped")
                    return 0
                continue
            if signals.reopen:
                signals.reopen = False
                _reopen_logs()
                self.send_all(("reopen",))
            if signals.reload:
                signals.reload = False
                self.reload()
            self.respawn_due()

    def _read_workers(self, ready: list[int]) -> None:
        for worker in list(self.workers.values()):
            if worker.control.fileno() in ready:
                self._read_worker(worker)

    def _read_worker(self, worker: Worker) -> None:
        """Act on what the worker said: it serves, or why it could not start."""
        try:
            while worker.control.poll(0):
                kind, value = worker.control.recv()
                if kind == "ready":
                    worker.ready = True
                    log.info("worker %d (pid %d) serving", worker.index, worker.pid)
                elif kind == "error":
                    log.error("worker %d (pid %d) could not start: %s", worker.index, worker.pid, value)
        except (EOFError, OSError):
            pass

    def reload(self) -> None:
        """Check the configuration once, in a child as this (unprivileged) user; then hand it to every worker."""
        config, error = check_in_child(self.path)
        if config is None:
            log.error("reload failed, keeping the running configuration: %s", error)
            return
        for note in _restart_notes(self.started, config):
            log.warning("%s", note)
        self.config = config
        logging.getLogger("willi").setLevel(config.loglevel.upper())
        self.send_all(("reload", config))
        log.info("configuration reloaded from %s; sent to %d workers", self.path, len(self.workers))


def check_in_child(path: str) -> tuple[Config | None, str]:
    """Load the file and every mapping and certificate it names, in a forked child; (config, "") or (None, why)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        status = 0
        try:
            try:
                config = load_config(path)
                Runtime.load(config).close()
                result: tuple = ("ok", config)
            except LOAD_ERRORS as exc:
                result = ("error", str(exc))
            except Exception as exc:
                result = ("error", f"{type(exc).__name__}: {exc}")
            data = pickle.dumps(result)
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + CHECK_TIMEOUT
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    try:
        kind, value = pickle.loads(b"".join(chunks))
    except Exception:
        return None, f"checking the configuration took longer than {CHECK_TIMEOUT:g}s or failed"
    return (value, "") if kind == "ok" else (None, value)

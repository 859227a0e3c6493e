"""Starting Willi: as a classic daemon (the default) or in the foreground (`-f`).

Start-up, in the order a postmaster's mistakes are found. Every step up to
"ready" reports its error on the starting terminal (or to systemd) with a
non-zero exit status:

1. the configuration is loaded (`cli.main`);
2. `user` / `group` are resolved; the pidfile is checked: a live Willi
   holding it refuses the start, a stale one is replaced;
3. every listening socket (and the metrics listener) is bound, as root, so
   port 25 works; the log file is opened (as root; a new one is given to the
   user) and the pidfile's directory is created (owned by the user);
4. daemon only: fork; the starting process waits on a pipe for the daemon's
   verdict. The daemon calls setsid(), forks again, writes and locks the
   pidfile (still root), drops to `user`/`group`, then python-daemon's
   DaemonContext sets cwd `/`, umask 027, closes every other descriptor and
   points the standard streams at /dev/null; logging moves to syslog (or
   `logfile`);
5. the mappings and TLS files are loaded as the unprivileged user (what a
   SIGHUP reload will do), by this process or, with `workers` > 1, by each
   forked worker, which reports back. Only when every worker serves does the
   daemon say "ready", and the starting process exits 0: with systemd's
   Type=forking the service is up exactly when the port accepts mail and the
   pidfile names the daemon (the supervising parent).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable

import daemon as python_daemon

from willi import __version__, metrics
from willi.config import Config, ConfigError, domain_warning
from willi.limits import SharedLimits
from willi.log import ReopenableFileHandler, setup_logging
from willi.mappings.base import MappingError
from willi.pidfile import PidFile, prepare_directory
from willi.privileges import Identity, StartupError, drop_privileges, resolve_identity, root_warning
from willi.runtime import Runtime
from willi.server import WilliService
from willi.signals import Signals
from willi.supervisor import Supervisor, reload_service, serve_single
from willi.tls import TlsSetupError

log = logging.getLogger("willi")

#: How long the starting process waits for the daemon's verdict.
STARTUP_TIMEOUT = 90.0
STARTUP_ERRORS = (ConfigError, OSError, MappingError, TlsSetupError, RuntimeError)

__all__ = ["reload_service", "run_daemon", "run_foreground", "startup_warnings"]


def fail(message: str, status: int = 1) -> int:
    print(f"willi: {message}", file=sys.stderr, flush=True)
    return status


def startup_warnings(config: Config, identity: Identity | None, *, detached: bool = True) -> list[str]:
    """What the operator should hear about, though Willi can run."""
    warnings = [w for w in (root_warning(config, identity), domain_warning(config)) if w]
    if detached and config.logfile is None and not os.path.exists("/dev/log"):
        warnings.append("no logfile is set and there is no /dev/log: log messages go to syslog "
                        "over UDP to localhost:514")
    return warnings


def open_logfile(config: Config, identity: Identity | None) -> ReopenableFileHandler | None:
    """Open `logfile` now, as root; a file created here is handed to the daemon's user."""
    if config.logfile is None:
        return None
    existed = config.logfile.exists()
    try:
        handler = ReopenableFileHandler(config.logfile)
        if not existed and identity is not None and os.geteuid() == 0:
            os.chown(config.logfile, identity.uid, identity.gid)
    except OSError as exc:
        raise ConfigError(config.path, "logfile", f"cannot open {config.logfile}: {exc.strerror}") from None
    return handler


def bind(config: Config) -> tuple[WilliService, socket.socket | None]:
    """Every listener, and the metrics listener, bound now (as root); nothing loaded yet."""
    service = WilliService(config, limits=SharedLimits(config.workers, config.max_connections), load=False)
    service.bind()
    listener = None
    if config.metrics_listen is not None:
        address = config.metrics_listen
        try:
            listener = socket.create_server((address.host, address.port), family=address.family,
                                            reuse_port=False)
        except OSError as exc:
            service.close()
            raise OSError(exc.errno, f"cannot listen on {address} (metrics_listen): {exc.strerror}") from None
    return service, listener


def begin_serving(service: WilliService, config: Config, path: str, signals: Signals,
                  metrics_listener: socket.socket | None) -> Callable[[], int]:
    """As the service user: load and start (this process, or the workers); the main loop to run."""
    cleanup: list[Callable[[], None]] = []
    if config.metrics_listen is not None:
        if config.workers > 1:
            directory = tempfile.mkdtemp(prefix="willi-metrics-")
            metrics.prepare_multiprocess(directory)
            cleanup.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        else:
            metrics.enable()
    if config.workers > 1:
        supervisor = Supervisor(service, path, config, signals, metrics_listener)
        supervisor.start()
        main = supervisor.run
    else:
        service.install(Runtime.load(config))
        service.start()

        def main() -> int:
            return serve_single(service, path, config, signals, metrics_listener)

    def run() -> int:
        try:
            return main()
        finally:
            for step in cleanup:
                step()

    return run


def run_foreground(config: Config) -> int:
    """`-f`: log to stderr, no pidfile; still binds as root, drops to `user`, runs the workers."""
    setup_logging(config.loglevel)
    path = os.path.abspath(config.path)
    signals = Signals(children=config.workers > 1)
    signals.install()  # before the port opens: a signal from then on is never fatal
    service: WilliService | None = None
    try:
        identity = resolve_identity(config)
        service, metrics_listener = bind(config)
        drop_privileges(identity)
        for warning in startup_warnings(config, identity, detached=False):
            log.warning("%s", warning)
        main = begin_serving(service, config, path, signals, metrics_listener)
    except (*STARTUP_ERRORS, StartupError) as exc:
        if service is not None:
            service.close()
        return fail(str(exc))
    log.info("willi %s started in the foreground, pid %d, %d worker%s", __version__, os.getpid(), config.workers,
             "" if config.workers == 1 else "s")
    return main()


# -- the daemon ------------------------------------------------------------


class _StatusPipe:
    """The daemon's half of the start-up report: `warning ...`, `error ...`, `ready PID`."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, kind: str, text: str) -> None:
        if self.fd is None:
            return
        data = "".join(f"{kind} {line}\n" for line in (text.splitlines() or [""])).encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _await_daemon(fd: int) -> int:
    """The starting process: relay the daemon's report to stderr; exit 0 once it is ready."""
    buf = b""
    errors = 0
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            readable, _, _ = select.select([pipe], [], [], STARTUP_TIMEOUT)
            if not readable:
                return fail(f"the daemon did not report within {STARTUP_TIMEOUT:g}s; see its log")
            chunk = pipe.read(4096)
            if chunk:
                buf += chunk
            while b"\n" in buf or (not chunk and buf):
                line, _, buf = buf.partition(b"\n")
                kind, _, text = line.decode("utf-8", "replace").partition(" ")
                if kind == "ready":
                    return 0
                if kind == "warning":
                    fail(f"warning: {text}")
                else:
                    errors += 1
                    fail(text)
            if not chunk:
                return 1 if errors else fail("the daemon exited during start-up without saying why")


def run_daemon(config: Config) -> int:
    """Check everything that can be checked, bind, detach; exit 0 once the daemon serves."""
    path = os.path.abspath(config.path)
    service: WilliService | None = None
    try:
        identity = resolve_identity(config)
        pidfile = PidFile(config.pidfile)
        holder = pidfile.holder()
        if holder is not None:
            raise StartupError(pidfile.refusal(holder))
        service, metrics_listener = bind(config)
        log_handler = open_logfile(config, identity)
        prepare_directory(config, identity)
    except (*STARTUP_ERRORS, StartupError) as exc:
        if service is not None:
            service.close()
        return fail(str(exc))
    warnings = startup_warnings(config, identity)
    for warning in warnings:
        fail(f"warning: {warning}")
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        service.close()
        if metrics_listener is not None:
            metrics_listener.close()
        if log_handler is not None:
            log_handler.close()
        os.waitpid(child, 0)
        return _await_daemon(read_fd)
    os.close(read_fd)
    status = _StatusPipe(write_fd)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
    except OSError as exc:
        status.send("error", f"cannot detach: {exc.strerror}")
        os._exit(1)
    return _daemon_main(config, path, service, metrics_listener, identity, pidfile, log_handler, warnings, status)


def _daemon_main(config: Config, path: str, service: WilliService, metrics_listener: socket.socket | None,
                 identity: Identity | None, pidfile: PidFile, log_handler: ReopenableFileHandler | None,
                 warnings: list[str], status: _StatusPipe) -> int:
    """In the detached process: pidfile, privilege drop, DaemonContext, logging, serve."""
    signals = Signals(children=config.workers > 1)
    try:
        pidfile.acquire()
        drop_privileges(identity)
        preserve: list[object] = [srv.socket for srv in service.servers]
        preserve += [pidfile.fd, status.fd, *service.preserved_fds()]
        if metrics_listener is not None:
            preserve.append(metrics_listener)
        if log_handler is not None:
            preserve.append(log_handler.fd)
        context = python_daemon.DaemonContext(
            detach_process=False, working_directory="/", umask=0o027, prevent_core=True,
            files_preserve=preserve, signal_map=signals.signal_map())
        context.open()
        if log_handler is not None:
            setup_logging(config.loglevel, handler=log_handler)
        else:
            setup_logging(config.loglevel, target="syslog", facility=config.syslog_facility)
        for warning in warnings:
            log.warning("%s", warning)
        signals.arm()
        main = begin_serving(service, config, path, signals, metrics_listener)
    except BaseException as exc:
        text = str(exc) if isinstance(exc, (*STARTUP_ERRORS, StartupError)) else f"{type(exc).__name__}: {exc}"
        if log.handlers:
            log.error("start-up failed: %s", text)
        status.send("error", text)
        status.close()
        pidfile.release()
        service.close()
        return 1
    who = f"{identity.user}:{identity.group}" if identity else f"uid {os.getuid()}"
    log.info("willi %s started as a daemon, pid %d, running as %s, pidfile %s, %d worker%s", __version__,
             os.getpid(), who, config.pidfile, config.workers, "" if config.workers == 1 else "s")
    status.send("ready", str(os.getpid()))
    status.close()
    try:
        return main()
    except Exception:
        log.exception("unexpected error in the main loop; stopping")
        service.stop(2.0)
        return 1
    finally:
        pidfile.release()

"""Running Willi: as a classic daemon (the default) or in the foreground (`-f`).

Daemon start-up, in the order a postmaster's mistakes are found. Every step
up to "ready" reports its error on the starting terminal (or to systemd)
with a non-zero exit status:

1. the configuration is loaded (`cli.main`);
2. `user` / `group` are resolved; the pidfile is checked: a live Willi
   holding it refuses the start, a stale one is replaced;
3. TLS material is loaded and every listening socket is bound, as root, so
   port 25 works; the log file is opened (as root; a new one is given to the
   user) and the pidfile's directory is created (owned by the user);
4. fork: the starting process waits on a pipe for the daemon's verdict. The
   daemon calls setsid(), forks again, writes and locks the pidfile (still
   root), drops to `user`/`group` (initgroups, setgid, setuid), then
   python-daemon's DaemonContext sets cwd `/`, umask 027, closes every file
   descriptor except the listening sockets, the log file, the pidfile and
   the pipe, and points the standard streams at /dev/null;
5. logging moves to syslog (or `logfile`); mappings and TLS files are loaded
   again, as the unprivileged user (what a SIGHUP reload will do), and the
   listeners start. Only then does the daemon send "ready", and the starting
   process exits 0: with systemd's Type=forking the service is up exactly when
   the port accepts and the pidfile names the daemon.

Signals only set flags (`Signals`); the main thread acts on them in `serve`:
SIGTERM/SIGINT stop gracefully, SIGHUP reloads, SIGUSR1 reopens the log file.

The pidfile is locked (flock) for the daemon's lifetime: a locked pidfile is
"held", an unlocked one is stale whatever PID it names, unless that PID is a
running Willi (one started before this scheme). It is written as root and
removed at exit by the unprivileged daemon, which works when the daemon
created the directory (it then belongs to `user`); in a root-owned directory
(systemd's RuntimeDirectory) the file is emptied instead and systemd removes
it with the directory.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import select
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import daemon as python_daemon

from willi import __version__
from willi.config import Config, ConfigError, load_config
from willi.log import ReopenableFileHandler, reopen_log_files, setup_logging
from willi.mappings.base import MappingError
from willi.server import Runtime, WilliService
from willi.tls import TlsSetupError

log = logging.getLogger("willi")

#: Settings read only at start; a reload that changes them says so.
RESTART_KEYS = ("listen", "user", "group", "pidfile", "logfile", "syslog_facility")
#: How long the starting process waits for the daemon's verdict.
STARTUP_TIMEOUT = 60.0
STARTUP_ERRORS = (ConfigError, OSError, MappingError, TlsSetupError)


class StartupError(Exception):
    """Willi cannot start; the text is for the operator."""


def fail(message: str, status: int = 1) -> int:
    print(f"willi: {message}", file=sys.stderr, flush=True)
    return status


# -- who we run as ---------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The account the daemon drops to."""

    user: str
    uid: int
    group: str
    gid: int


def resolve_identity(config: Config) -> Identity | None:
    """The configured `user`/`group`, or None to stay who we are."""
    if not config.user:
        if config.group:
            raise ConfigError(config.path, "group", "is set but user is not; set user as well")
        return None
    try:
        pw = pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(config.path, "user", f"no such user {config.user!r}") from None
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise ConfigError(config.path, "group", f"no such group {config.group!r}") from None
        group = config.group
    else:
        gid = pw.pw_gid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
    if os.geteuid() != 0 and (pw.pw_uid != os.geteuid() or gid != os.getegid()):
        raise ConfigError(config.path, "user", f"willi runs as uid {os.geteuid()}, not root, so it cannot "
                          f"switch to {config.user}:{group}; start it as root or remove user/group")
    return Identity(config.user, pw.pw_uid, group, gid)


def root_warning(config: Config, identity: Identity | None) -> str | None:
    if os.geteuid() == 0 and (identity is None or identity.uid == 0):
        return (f"running as root: set user (and group) in {config.path} so that willi drops root "
                "privileges after binding its ports")
    return None


def startup_warnings(config: Config, identity: Identity | None) -> list[str]:
    """What the operator should hear about, though the daemon can run."""
    warnings = [w for w in (root_warning(config, identity),) if w]
    if config.logfile is None and not Path("/dev/log").exists():
        warnings.append("no logfile is set and there is no /dev/log: log messages go to syslog "
                        "over UDP to localhost:514")
    return warnings


def drop_privileges(identity: Identity | None) -> None:
    """initgroups, setgid, setuid; then prove root cannot be regained."""
    if identity is None or os.geteuid() != 0 or identity.uid == 0:
        return
    try:
        os.initgroups(identity.user, identity.gid)
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise StartupError(f"cannot switch to {identity.user}:{identity.group}: {exc.strerror}") from None
    if os.geteuid() != identity.uid or os.getegid() != identity.gid:
        raise StartupError(f"switching to {identity.user}:{identity.group} did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise StartupError("root privileges could be regained after dropping them; refusing to run")


# -- the pidfile -----------------------------------------------------------


def _parse_pid(data: bytes) -> int | None:
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _is_running_willi(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: trust kill()
    return b"willi" in cmdline and state != "Z"


class PidFile:
    """A pidfile locked with flock() while its daemon lives."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def _open(self, flags: int) -> int:
        """Open without following a symlink or blocking on a FIFO; only a plain file will do."""
        fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise StartupError(f"pidfile {self.path} is not a plain file; remove it")
        return fd

    def holder(self) -> int | None:
        """The PID of the running Willi that holds the pidfile; None when absent or stale."""
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StartupError(f"pidfile {self.path} is a symbolic link; remove it") from None
            raise StartupError(f"cannot read pidfile {self.path}: {exc.strerror}") from None
        try:
            pid = _parse_pid(os.read(fd, 64))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return pid or -1
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if pid is not None and _is_running_willi(pid):
            return pid
        return None

    def refusal(self, pid: int) -> str:
        shown = f"pid {pid}" if pid > 0 else "pid unknown"
        return f"pidfile {self.path} is held by a running willi ({shown}); stop it first"

    def acquire(self) -> None:
        """Create or take over the file, lock it and write our PID."""
        try:
            fd = self._open(os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise StartupError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _parse_pid(os.pread(fd, 64, 0)) or -1
            os.close(fd)
            raise StartupError(self.refusal(pid)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fchmod(fd, 0o644)
        self.fd = fd

    def release(self) -> None:
        """Remove the file if it is still ours; empty it when the directory forbids that."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.path.samestat(os.stat(self.path, follow_symlinks=False), os.fstat(fd)):
                try:
                    os.unlink(self.path)
                except PermissionError:
                    os.ftruncate(fd, 0)
                    log.info("pidfile %s emptied, not removed: its directory is not writable by uid %d",
                             self.path, os.geteuid())
        except OSError:
            pass
        finally:
            os.close(fd)


def prepare_directory(config: Config, identity: Identity | None) -> None:
    """Create the pidfile's directory when missing, owned by the daemon's user."""
    directory = config.pidfile.parent
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o755, parents=True)
        if identity is not None and os.geteuid() == 0:
            os.chown(directory, identity.uid, identity.gid)
    except OSError as exc:
        raise ConfigError(config.path, "pidfile", f"cannot create directory {directory}: {exc.strerror}") from None


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


# -- signals ---------------------------------------------------------------


class Signals:
    """Handlers that only set flags and wake the main thread through a pipe."""

    def __init__(self) -> None:
        self.stop = 0  # the signal number that asked for the stop
        self.reload = False
        self.reopen = False
        self._pipe: tuple[int, int] | None = None

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = self.stop or signum

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload = True

    def _on_reopen(self, signum: int, frame: object) -> None:
        self.reopen = True

    def handlers(self) -> dict[int, object]:
        return {signal.SIGTERM: self._on_stop, signal.SIGINT: self._on_stop,
                signal.SIGHUP: self._on_reload, signal.SIGUSR1: self._on_reopen}

    def signal_map(self) -> dict[int, object]:
        """For DaemonContext: ours, and job-control signals ignored (None)."""
        return {**self.handlers(), signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None}

    def install(self) -> None:
        for signum, handler in self.handlers().items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.arm()

    def arm(self) -> None:
        """A wakeup fd makes `wait` return as soon as a signal arrives."""
        if self._pipe is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or `timeout` passes (main thread only)."""
        self.arm()
        if self.stop or self.reload or self.reopen:
            return
        assert self._pipe is not None
        readable, _, _ = select.select([self._pipe[0]], [], [], timeout)
        if readable:
            try:
                while os.read(self._pipe[0], 512):
                    pass
            except BlockingIOError:
                pass


# -- serving ---------------------------------------------------------------


def build_runtime(config: Config) -> Runtime:
    """Load TLS files and every mapping (a CSV must parse) as the current user."""
    runtime = Runtime.build(config)
    try:
        for mapping in runtime.resolver.mappings:
            mapping.refresh()
    except MappingError:
        runtime.close()
        raise
    return runtime


def reload_service(service: WilliService, path: str, started: Config | None = None) -> bool:
    """SIGHUP: load the file again; on any error keep the running configuration.

    `started` is the configuration the process started with, to report
    settings that only a restart applies.
    """
    try:
        config = load_config(path)
        runtime = build_runtime(config)
    except STARTUP_ERRORS as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return False
    except Exception:
        log.exception("reload failed, keeping the running configuration")
        return False
    base = started or service.config
    for key in RESTART_KEYS:
        old, new = getattr(base, key), getattr(config, key)
        if old != new:
            shown_old = ", ".join(map(str, old)) if key == "listen" else old
            shown_new = ", ".join(map(str, new)) if key == "listen" else new
            log.warning("reload: %s changed (%s -> %s); this takes effect only after a restart",
                        key, shown_old or '""', shown_new or '""')
    service.reload(runtime)
    logging.getLogger("willi").setLevel(config.loglevel.upper())
    log.info("configuration reloaded from %s", path)
    return True


def serve(service: WilliService, path: str, started: Config, signals: Signals) -> int:
    """The main thread's loop: act on the flags the signal handlers set."""
    while True:
        signals.wait(5.0)
        if signals.stop:
            timeout = service.config.shutdown_timeout
            log.info("%s: stopping; no new connections, transactions in flight may take up to %gs",
                     signal.Signals(signals.stop).name, timeout)
            service.stop(timeout)
            log.info("stopped")
            return 0
        if signals.reopen:
            signals.reopen = False
            for filename, error in reopen_log_files():
                if error is None:
                    log.info("SIGUSR1: log file %s reopened", filename)
                else:
                    log.error("SIGUSR1: cannot reopen log file %s, still writing to the old one: %s",
                              filename, error.strerror)
        if signals.reload:
            signals.reload = False
            reload_service(service, path, started)


def _replace_runtime(service: WilliService, config: Config) -> None:
    """Load mappings and TLS again as the user that will serve (and reload) them."""
    service.reload(build_runtime(config))  # closes the old runtime once no session uses it


def run_foreground(config: Config) -> int:
    """`-f`: log to stderr, no pidfile; still binds as root and drops to `user`."""
    setup_logging(config.loglevel)
    path = os.path.abspath(config.path)
    signals = Signals()
    signals.install()  # before the port opens: a signal from then on is never fatal
    service: WilliService | None = None
    try:
        identity = resolve_identity(config)
        service = WilliService(config)
        service.bind()
        drop_privileges(identity)
        _replace_runtime(service, config)
    except (*STARTUP_ERRORS, StartupError) as exc:
        if service is not None:
            service.close()
        return fail(str(exc))
    if warning := root_warning(config, identity):
        log.warning("%s", warning)
    service.start()
    log.info("willi %s started in the foreground, pid %d", __version__, os.getpid())
    return serve(service, path, config, signals)


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
        service = WilliService(config)
        service.bind()
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
    return _daemon_main(config, path, service, identity, pidfile, log_handler, warnings, status)


def _daemon_main(config: Config, path: str, service: WilliService, identity: Identity | None,
                 pidfile: PidFile, log_handler: ReopenableFileHandler | None, warnings: list[str],
                 status: _StatusPipe) -> int:
    """In the detached process: pidfile, privilege drop, DaemonContext, logging, serve."""
    signals = Signals()
    try:
        pidfile.acquire()
        drop_privileges(identity)
        preserve: list[object] = [srv.socket for srv in service.servers]
        preserve += [pidfile.fd, status.fd]
        if log_handler is not None:
            preserve.append(log_handler.stream)
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
        _replace_runtime(service, config)
        signals.arm()
        service.start()
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
    log.info("willi %s started as a daemon, pid %d, running as %s, pidfile %s",
             __version__, os.getpid(), who, config.pidfile)
    status.send("ready", str(os.getpid()))
    status.close()
    try:
        return serve(service, path, config, signals)
    except Exception:
        log.exception("unexpected error in the main loop; stopping")
        service.stop(2.0)
        return 1
    finally:
        pidfile.release()

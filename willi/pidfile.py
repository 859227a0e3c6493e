"""The pidfile: locked with flock() while its daemon lives.

A locked pidfile is "held", an unlocked one is stale whatever PID it names,
unless that PID is a running Willi (one started before this scheme). It is
written as root and removed at exit by the unprivileged daemon, which works
when the daemon created the directory (it then belongs to `user`); in a
root-owned directory (systemd's RuntimeDirectory) the file is emptied
instead and systemd removes it with the directory.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from willi.config import Config, ConfigError
from willi.privileges import Identity, StartupError

log = logging.getLogger("willi")


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

"""logfmt output: one line per transaction at info, the dialog at debug."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRANSACTION_LOGGER = "willi.transaction"

# No record carries the process id, thread name or multiprocessing name: each costs a call (getpid is a
# system call) per log record, and none is shown.
logging.logProcesses = False
logging.logMultiprocessing = False
logging.logThreads = False
logging._srcfile = None  # no caller lookup (a stack walk per record): no format shows file or line


_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """Make `text` safe to write as (part of) one log line.

    Every character that is not printable is escaped: C0 and C1 controls
    (ESC, VT, FF, NEL ...), DEL, the line and paragraph separators, bidi
    controls and other format characters, and bytes that were not UTF-8
    (kept as surrogates by surrogateescape). So a transaction is always one
    line, reads the same in a terminal, and encodes as UTF-8 whatever the
    client sent.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def logfmt_value(value: Any) -> str:
    """Quote a value when it holds spaces, quotes, '=', backslashes, is empty or not printable."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    else:
        text = str(value)
    if text == "" or not text.isprintable() or _NEEDS_QUOTES.search(text):
        escaped = escape_text(text.replace("\\", "\\\\").replace('"', '\\"'))
        return f'"{escaped}"'
    return text


def logfmt(fields: Mapping[str, Any]) -> str:
    """`{"result": "accepted", "reply": "250 ok"}` -> `result=accepted reply="250 ok"`."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items() if value is not None)


class LogfmtFormatter(logging.Formatter):
    """`time=... level=info msg` in the foreground and in files.

    The time prefix is formatted once per second (strftime and localtime
    per record were a measurable share of a busy Willi's time).
    """

    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        prefix = ""
        if self.with_time:
            second = int(record.created)
            if second != self._second:
                self._stamp = time.strftime("time=%Y-%m-%dT%H:%M:%S", time.localtime(second))
                self._second = second
            prefix = f"{self._stamp}.{int(record.msecs):03d} "
        line = f"{prefix}level={record.levelname.lower()} {escape_text(record.getMessage())}"
        if record.exc_info:
            # A traceback is several lines by nature; each line is escaped like the message.
            line += "\n" + "\n".join(escape_text(t) for t in self.formatException(record.exc_info).split("\n"))
        return line


class LineHandler(logging.Handler):
    """Each record is one write() of its whole line to a file descriptor.

    No buffered stream between the record and the descriptor: one system
    call per line, and several processes (workers) writing to one file
    with O_APPEND never interleave inside a line.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except Exception:
            self.handleError(record)

    def fileno(self) -> int:
        return self.fd


class ReopenableFileHandler(LineHandler):
    """A log file that `reopen()` opens again by name: SIGUSR1 after logrotate moved it.

    Unlike WatchedFileHandler it does not stat the file for every record;
    like syslogd and Postfix it keeps writing to the renamed file until it is
    told to reopen. New files are created with mode 0640.
    """

    def __init__(self, filename: str | Path) -> None:
        self.baseFilename = os.path.abspath(str(filename))
        super().__init__(self._open())

    def _open(self) -> int:
        return os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """Open the file by name again; on error (raised) the old descriptor stays in use."""
        new = self._open()
        with self.lock:  # type: ignore[union-attr]
            old, self.fd = self.fd, new
        os.close(old)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        super().close()


def reopen_log_files() -> list[tuple[str, OSError | None]]:
    """Reopen every ReopenableFileHandler of the `willi` logger: (file, error or None) each."""
    results: list[tuple[str, OSError | None]] = []
    for handler in logging.getLogger("willi").handlers:
        if isinstance(handler, ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                results.append((handler.baseFilename, exc))
            else:
                results.append((handler.baseFilename, None))
    return results


def set_syslog_ident(pid: int) -> None:
    """A forked worker logs to syslog under its own PID."""
    for handler in logging.getLogger("willi").handlers:
        if isinstance(handler, logging.handlers.SysLogHandler):
            handler.ident = f"willi[{pid}]: "


def setup_logging(level: str, *, target: str = "stderr", logfile: Path | None = None,
                  facility: str = "mail", handler: logging.Handler | None = None) -> logging.Handler:
    """Route all `willi.*` logging to stderr, a file, syslog or `handler`; return the handler."""
    if handler is not None:
        handler.setFormatter(LogfmtFormatter())
    elif target == "file" and logfile is not None:
        handler = ReopenableFileHandler(logfile)
        handler.setFormatter(LogfmtFormatter())
    elif target == "syslog":
        address = "/dev/log" if Path("/dev/log").exists() else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names[facility])
        handler.ident = f"willi[{os.getpid()}]: "
        handler.setFormatter(LogfmtFormatter(with_time=False))
    else:
        handler = LineHandler(sys.stderr.fileno())
        handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("willi")
    for old in list(root.handlers):
        if old is not handler:
            root.removeHandler(old)
            old.close()
    if handler not in root.handlers:
        root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return handler

"""logfmt output: one line per transaction at info, the dialog at debug."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRANSACTION_LOGGER = "willi.transaction"


def logfmt_value(value: Any) -> str:
    """Quote a value when it holds spaces, quotes, '=' or is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    return text


def logfmt(fields: Mapping[str, Any]) -> str:
    """`{"result": "accepted", "reply": "250 ok"}` -> `result=accepted reply="250 ok"`."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items() if value is not None)


class LogfmtFormatter(logging.Formatter):
    """`time=... level=info msg` in the foreground and in files."""

    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        prefix = ""
        if self.with_time:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            prefix = f"time={ts}.{int(record.msecs):03d} "
        line = f"{prefix}level={record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class ReopenableFileHandler(logging.FileHandler):
    """A log file that `reopen()` opens again by name: SIGUSR1 after logrotate moved it.

    Unlike WatchedFileHandler it does not stat the file for every record;
    like syslogd and Postfix it keeps writing to the renamed file until it is
    told to reopen. New files are created with mode 0640.
    """

    def __init__(self, filename: str | Path) -> None:
        super().__init__(str(filename), mode="a", encoding="utf-8")

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def reopen(self) -> None:
        """Open the file by name again; on error (raised) the old stream stays in use."""
        new = self._open()
        with self.lock:  # type: ignore[union-attr]
            old, self.stream = self.stream, new
            if old is not None:
                old.close()


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
        handler = logging.StreamHandler(sys.stderr)
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

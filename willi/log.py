"""logfmt output: one line per transaction at info, the dialog at debug."""

from __future__ import annotations

import logging
import logging.handlers
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


def setup_logging(level: str, *, target: str = "stderr", logfile: Path | None = None,
                  facility: str = "mail") -> logging.Handler:
    """Route all `willi.*` logging to stderr, a file or syslog; return the handler."""
    handler: logging.Handler
    if target == "file" and logfile is not None:
        handler = logging.handlers.WatchedFileHandler(str(logfile))
        handler.setFormatter(LogfmtFormatter())
    elif target == "syslog":
        address = "/dev/log" if Path("/dev/log").exists() else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names[facility])
        handler.ident = "willi: "
        handler.setFormatter(LogfmtFormatter(with_time=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("willi")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return handler

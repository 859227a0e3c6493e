"""The `csv` mapping: the original program's `pattern;server;tls_verify` file.

The file is re-read when it changes on disk (checked at most every
`reload_interval` seconds, on lookup). A new file that does not parse
keeps the old table in service and is logged: a typo must not take mail
routing down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from willi.address import PatternError, pattern_key
from willi.mappings.base import MappingError
from willi.route import Route, RouteSyntaxError, make_route

log = logging.getLogger("willi.mappings.csv")

HEADER = ("pattern", "server", "tls_verify", "tls")


class CsvFormatError(ValueError):
    """A line of the file that cannot be used, with its line number."""


def normalize_pattern(pattern: str, *, case_sensitive_local: bool) -> str:
    """The lookup key a pattern stands for (see willi.address.pattern_key); PatternError when it has none."""
    return pattern_key(pattern, case_sensitive_local=case_sensitive_local)


def is_bare_name(pattern: str) -> bool:
    """`bob`, `postmaster`: no `@`, no dot, not `.domain` or an address literal.

    Postfix's transport maps would read it as a domain, but recipients
    reaching an MX from the internet always have a dotted domain, so such a
    line can only be a local part written without its domain.
    """
    return "@" not in pattern and "." not in pattern and not pattern.startswith("[")


def parse_csv(text: str, *, case_sensitive_local: bool = False, source: str = "<csv>") -> dict[str, Route]:
    """Parse the whole file; raise CsvFormatError naming `file:line` on any defect.

    Format: a header `pattern;server;tls_verify` (the third column may be
    absent; a fourth, `tls`, may follow), `#` comments and empty lines
    ignored, `;` separated. A pattern is a full address, an address without
    subaddress, a domain, or `.domain` for every subdomain of domain; one that
    could never match a recipient (`@domain`, `*.domain`, white space, a bare
    local part) is an error, not a silent dead line.
    """
    table: dict[str, Route] = {}
    columns = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(";")]
        if not columns:
            names = tuple(f.lower() for f in fields)
            if names not in (HEADER[:2], HEADER[:3], HEADER):
                raise CsvFormatError(
                    f"{source}:{number}: expected the header 'pattern;server;tls_verify' (optionally ';tls'), "
                    f"got {line!r}")
            columns = len(names)
            continue
        if not 2 <= len(fields) <= columns:
            raise CsvFormatError(f"{source}:{number}: expected 2 to {columns} ';'-separated fields "
                                 f"({';'.join(HEADER[:columns])}), got {len(fields)}")
        pattern = fields[0]
        try:
            key = normalize_pattern(pattern, case_sensitive_local=case_sensitive_local)
        except PatternError as exc:
            raise CsvFormatError(f"{source}:{number}: {exc}") from None
        if is_bare_name(pattern):
            raise CsvFormatError(
                f"{source}:{number}: pattern {pattern!r} is a bare local part (or a domain of one label), which "
                f"no recipient at an MX has: write {pattern}@example.com for an address, example.com for a domain")
        if not fields[1]:
            raise CsvFormatError(f"{source}:{number}: empty server for pattern {pattern!r}")
        try:
            extra = fields[2:] + [None] * (4 - len(fields))
            route = make_route(fields[1], extra[0], extra[1])
        except RouteSyntaxError as exc:
            raise CsvFormatError(f"{source}:{number}: {exc}") from None
        if key in table:
            raise CsvFormatError(f"{source}:{number}: pattern {pattern!r} appears twice")
        table[key] = route
    if not columns:
        raise CsvFormatError(f"{source}: empty file, expected the header 'pattern;server;tls_verify'")
    return table


class CsvMapping:
    """A CSV routing table kept in memory and reloaded when the file changes."""

    def __init__(self, file: Path, index: int = 0, *, reload_interval: float = 5.0,
                 case_sensitive_local: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.file = Path(file)
        self.name = f"csv:{self.file}"
        self.reload_interval = reload_interval
        self.case_sensitive_local = case_sensitive_local
        self.clock = clock
        self._lock = threading.Lock()
        self._table: dict[str, Route] | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._listener: Callable[[], None] = lambda: None

    def set_change_listener(self, listener: Callable[[], None]) -> None:
        self._listener = listener

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.file)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> tuple[dict[str, Route], tuple[int, int, int]]:
        stamp = self._stat()
        text = self.file.read_text(encoding="utf-8")
        return parse_csv(text, case_sensitive_local=self.case_sensitive_local, source=str(self.file)), stamp

    def _current(self) -> dict[str, Route]:
        """The table in force, reloading it first when the file changed."""
        with self._lock:
            now = self.clock()
            if self._table is not None and now < self._next_check:
                return self._table
            self._next_check = now + self.reload_interval
            try:
                if self._table is not None and self._stat() == self._stamp:
                    return self._table
                table, stamp = self._load()
            except (OSError, UnicodeDecodeError, CsvFormatError) as exc:
                if self._table is None:
                    raise MappingError(f"{self.name}: cannot load: {exc}") from None
                log.error("csv mapping %s: keeping the previous table, the new file is unusable: %s", self.file, exc)
                return self._table
            changed = self._table is not None
            self._table, self._stamp = table, stamp
        if changed:
            log.info("csv mapping %s reloaded: %d entries", self.file, len(table))
            self._listener()
        return table

    def refresh(self) -> None:
        """Reload now if the file changed, so cached answers never outlive it."""
        self._current()

    def lookup(self, key: str) -> Route | None:
        return self._current().get(key)

    def check(self) -> str:
        try:
            table, _ = self._load()
        except (OSError, UnicodeDecodeError, CsvFormatError) as exc:
            raise MappingError(f"{self.name}: {exc}") from None
        return f"{self.name}: {len(table)} entries"

    def close(self) -> None:
        """Nothing held open between lookups."""

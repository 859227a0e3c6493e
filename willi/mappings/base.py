"""The contract every mapping backend fulfils."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from willi.route import Route


class MappingError(Exception):
    """A backend could not answer (database down, unreadable file, ...).

    The resolver turns it into a temporary failure (451 4.3.0) and stops
    the chain: a later mapping must not answer for a key an earlier one
    might have routed elsewhere. The message must never contain secrets.
    """


class Mapping(Protocol):
    """A backend: `lookup` returns a Route, or None when the key is unknown."""

    #: Short label for logs and `--lookup`, e.g. "csv:/etc/willi/routes.csv".
    name: str

    def lookup(self, key: str) -> Route | None:
        """Answer one key; raise MappingError when the backend cannot answer."""
        ...

    def refresh(self) -> None:
        """Cheap, called before every resolution: notice changed data (may clear the cache)."""
        ...

    def check(self) -> str:
        """Load or connect now, raise MappingError on trouble; return a summary."""
        ...

    def set_change_listener(self, listener: Callable[[], None]) -> None:
        """Register a callback run when the backend's data changed (cache clear)."""
        ...

    def close(self) -> None:
        """Release files, connections, pools."""
        ...

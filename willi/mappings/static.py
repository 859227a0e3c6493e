"""The `static` mapping: one upstream for every key (a default route)."""

from __future__ import annotations

from collections.abc import Callable

from willi.route import Route


class StaticMapping:
    """Answers every key with the same route; put it last in the chain."""

    def __init__(self, route: Route, index: int = 0) -> None:
        self.route = route
        self.name = f"static:{route.endpoint}"

    def lookup(self, key: str) -> Route | None:
        return self.route

    def refresh(self) -> None:
        """Nothing can change."""

    def check(self) -> str:
        return f"{self.name}: every recipient -> {self.route.endpoint} tls_verify={str(self.route.tls_verify).lower()}"

    def set_change_listener(self, listener: Callable[[], None]) -> None:
        """A static route never changes while running."""

    def close(self) -> None:
        """Nothing to release."""

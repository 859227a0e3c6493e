"""The ordered mapping chain, its lookup keys, and a thread-safe TTL cache.

The cache is per (mapping, key), not per address: every address of a
domain routed by a domain entry shares one cached answer, so 10,000
recipients over 100 domains cost about 100 backend queries for the domain
keys. Concurrent misses for one (mapping, key) are collapsed into a
single backend query. Errors are never cached.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from willi.address import KEY_KINDS, labeled_keys, lookup_keys
from willi.config import Config
from willi.mappings import build_mapping
from willi.mappings.base import Mapping, MappingError
from willi.route import Route


class LookupFailed(Exception):
    """A mapping could not answer: a temporary failure (451 4.3.0)."""

    def __init__(self, mapping: str, key: str, error: MappingError) -> None:
        self.mapping, self.key, self.error = mapping, key, error
        super().__init__(f"{mapping}: lookup of {key!r} failed: {error}")


@dataclass(frozen=True)
class Resolution:
    """Where a recipient goes, and which mapping and key said so."""

    route: Route | None
    mapping: str = ""
    key: str = ""
    cached: bool = False
    #: The mapping as a metrics label (`metric_labels`): its kind, never a host, port or path; derived
    #: from `mapping`, so it takes no part in comparisons.
    label: str = dataclasses.field(default="", compare=False)


def metric_labels(names: Sequence[str]) -> list[str]:
    """Label values for willi_lookup_seconds{mapping}, one per mapping of the chain.

    A mapping's name says where it reads (`sql:user@db.example:3306/mail`,
    `static:10.0.0.7:25`); a label must never carry an address, so the label
    is the kind only (`sql`, `csv`, `static`), and a kind used more than once
    gets its place in the chain as `--check` numbers it: `sql[0]`, `sql[1]`.
    """
    kinds = [name.split(":", 1)[0] for name in names]
    return [kind if kinds.count(kind) == 1 else f"{kind}[{index}]" for index, kind in enumerate(kinds)]


_MISS = object()


class _InFlight:
    """One backend query that other threads asking the same key wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Route | None = None
        self.error: MappingError | None = None


class LookupCache:
    """LRU cache with positive and negative TTLs and single-flight misses."""

    def __init__(self, positive_ttl: float, negative_ttl: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.positive_ttl, self.negative_ttl, self.max_entries = positive_ttl, negative_ttl, max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, str], tuple[float, Route | None]] = OrderedDict()
        self._inflight: dict[tuple[int, str], _InFlight] = {}
        self._generation = 0  # bumped by clear(): answers fetched before it are not stored
        self.hits = self.misses = self.backend_queries = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation += 1

    def get(self, slot: tuple[int, str], fetch: Callable[[], Route | None]) -> tuple[Route | None, bool]:
        """Return (answer, cached?) for `slot`, calling `fetch` at most once at a time."""
        with self._lock:
            now = self.clock()
            entry = self._entries.get(slot, _MISS)
            if entry is not _MISS:
                expires, value = entry  # type: ignore[misc]
                if expires > now:
                    self._entries.move_to_end(slot)
                    self.hits += 1
                    return value, True
                del self._entries[slot]
            self.misses += 1
            flight = self._inflight.get(slot)
            generation = self._generation
            leader = flight is None
            if leader:
                flight = self._inflight[slot] = _InFlight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, True
        try:
            self.backend_queries += 1
            flight.result = fetch()
        except BaseException as exc:
            # Waiting threads must see a failure too, never a cached "no route".
            flight.error = exc if isinstance(exc, MappingError) else MappingError(f"backend failed: {exc!r}")
            raise
        finally:
            with self._lock:
                del self._inflight[slot]
                if flight.error is None and generation == self._generation:
                    ttl = self.positive_ttl if flight.result is not None else self.negative_ttl
                    self._entries[slot] = (self.clock() + ttl, flight.result)
                    self._entries.move_to_end(slot)
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
            flight.done.set()
        return flight.result, False


class Resolver:
    """Walks the mapping chain for each recipient; the first answer wins."""

    def __init__(self, mappings: Sequence[Mapping], *, delimiter: str = "+", case_sensitive_local: bool = False,
                 cache: LookupCache | None = None, key_kinds: Sequence[Sequence[str]] | None = None,
                 xclient: Sequence[str | None] | None = None) -> None:
        self.mappings = list(mappings)
        #: Per mapping, its own `xclient` setting, given to the routes it returns.
        self.xclient = list(xclient) if xclient else [None] * len(self.mappings)
        #: Per mapping, which kinds of key it is asked (config `keys`); all by default.
        self.key_kinds = [frozenset(k) for k in key_kinds] if key_kinds else [frozenset(KEY_KINDS)] * len(mappings)
        self.delimiter, self.case_sensitive_local = delimiter, case_sensitive_local
        self.cache = cache or LookupCache(300.0, 60.0, 10000)
        self.labels = metric_labels([mapping.name for mapping in self.mappings])
        for mapping in self.mappings:
            mapping.set_change_listener(self.cache.clear)

    def keys(self, address: str) -> list[str]:
        """The keys tried for `address`, in order (for --lookup)."""
        return lookup_keys(address, self.delimiter, case_sensitive_local=self.case_sensitive_local)

    def resolve(self, address: str) -> Resolution:
        """Route for `address`, or Resolution(None) when no mapping knows it.

        Raises LookupFailed when a mapping errs: the chain stops there, so a
        later, broader mapping never answers for a key an earlier one owns.
        """
        keys = labeled_keys(address, self.delimiter, case_sensitive_local=self.case_sensitive_local)  # AddressError
        for index, mapping in enumerate(self.mappings):
            try:
                mapping.refresh()
            except MappingError as exc:
                raise LookupFailed(mapping.name, keys[0][1], exc) from exc
            for kind, key in keys:
                if kind not in self.key_kinds[index]:
                    continue
                try:
                    route, cached = self.cache.get((index, key), lambda m=mapping, k=key: m.lookup(k))
                except MappingError as exc:
                    raise LookupFailed(mapping.name, key, exc) from exc
                if route is not None:
                    if self.xclient[index] is not None and route.xclient != self.xclient[index]:
                        route = dataclasses.replace(route, xclient=self.xclient[index])
                    return Resolution(route, mapping.name, key, cached, self.labels[index])
        return Resolution(None)

    def close(self) -> None:
        for mapping in self.mappings:
            mapping.close()


def build_resolver(config: Config) -> Resolver:
    """The mapping chain and cache that `config` describes."""
    mappings = [build_mapping(m, i, case_sensitive_local=config.local_part_case_sensitive)
                for i, m in enumerate(config.mappings)]
    cache = LookupCache(config.cache_positive_ttl, config.cache_negative_ttl, config.cache_max_entries)
    return Resolver(mappings, delimiter=config.recipient_delimiter,
                    case_sensitive_local=config.local_part_case_sensitive, cache=cache,
                    key_kinds=[m.keys for m in config.mappings], xclient=[m.xclient for m in config.mappings])

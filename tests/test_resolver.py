"""Routing: lookup keys, the mapping chain, the TTL/LRU cache, and the CSV mapping."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from willi.config import KEY_KINDS, parse_config
from willi.mappings.base import MappingError
from willi.mappings.csv import CsvFormatError, CsvMapping, normalize_pattern, parse_csv
from willi.mappings.static import StaticMapping
from willi.resolver import LookupCache, LookupFailed, Resolution, Resolver, build_resolver, lookup_keys
from willi.route import Route

R = Route.single

R1 = R("mx1.example.net", 25, True)
R2 = R("mx2.example.net", 2525, False)
R3 = R("mx3.example.net", 25, True)

#: The domain key and its parent key, which every example.com address ends with.
EXAMPLE_COM = ("example.com", ".com")


# ---------------------------------------------------------------- lookup keys


@pytest.mark.parametrize(
    ("address", "delimiter", "case_sensitive", "expected"),
    [
        pytest.param("user+ext@Example.COM", "+", False, ["user+ext@example.com", "user@example.com", *EXAMPLE_COM],
                     id="design-example"),
        pytest.param("user@example.com", "+", False, ["user@example.com", *EXAMPLE_COM], id="no-subaddress"),
        pytest.param("User+Ext@Example.COM", "+", False, ["user+ext@example.com", "user@example.com", *EXAMPLE_COM],
                     id="local-lowered-by-default"),
        pytest.param("User+Ext@Example.COM", "+", True, ["User+Ext@example.com", "User@example.com", *EXAMPLE_COM],
                     id="local-case-sensitive-domain-still-lowered"),
        pytest.param("user-ext@example.com", "+-", False, ["user-ext@example.com", "user@example.com", *EXAMPLE_COM],
                     id="second-delimiter-char"),
        pytest.param("user+a-b@example.com", "+-", False, ["user+a-b@example.com", "user@example.com", *EXAMPLE_COM],
                     id="several-delimiters-plus-first"),
        pytest.param("user-a+b@example.com", "+-", False, ["user-a+b@example.com", "user@example.com", *EXAMPLE_COM],
                     id="several-delimiters-hyphen-first"),
        pytest.param("user+a+b@example.com", "+", False, ["user+a+b@example.com", "user@example.com", *EXAMPLE_COM],
                     id="cut-at-first-delimiter"),
        pytest.param("user-ext@example.com", "+", False, ["user-ext@example.com", *EXAMPLE_COM],
                     id="other-char-not-a-delimiter"),
        pytest.param("user+ext@example.com", "", False, ["user+ext@example.com", *EXAMPLE_COM],
                     id="no-delimiter-configured"),
        pytest.param("user+@example.com", "+", False, ["user+@example.com", "user@example.com", *EXAMPLE_COM],
                     id="empty-extension"),
        pytest.param("+user@example.com", "+", False, ["+user@example.com", *EXAMPLE_COM],
                     id="leading-delimiter-not-cut"),
        pytest.param('"user+ext"@example.com', "+", False, ['"user+ext"@example.com', *EXAMPLE_COM],
                     id="quoted-local-not-cut"),
        pytest.param('"John.Doe"@Example.com', "+", True, ['"John.Doe"@example.com', *EXAMPLE_COM],
                     id="quoted-local-case-sensitive"),
        pytest.param("bob@Sub.Example.COM", "+", False, ["bob@sub.example.com", "sub.example.com", ".example.com",
                                                         ".com"], id="subdomain-then-parents"),
        pytest.param("Jörg+X@Bücher.DE", "+", False, ["jörg+x@xn--bcher-kva.de", "jörg@xn--bcher-kva.de",
                                                      "xn--bcher-kva.de", ".de"], id="utf8-a-label-ascii-case-only"),
        pytest.param("user@[192.0.2.1]", "+", False, ["user@[192.0.2.1]", "[192.0.2.1]"], id="address-literal"),
        pytest.param("Postmaster", "+", False, ["postmaster"], id="postmaster-without-domain"),
        pytest.param("example.com", "+", False, ["example.com"], id="domain-only"),
    ],
)
def test_lookup_keys(address: str, delimiter: str, case_sensitive: bool, expected: list[str]) -> None:
    assert lookup_keys(address, delimiter, case_sensitive_local=case_sensitive) == expected


# ---------------------------------------------------------------- the chain


class FakeMapping:
    """A mapping backed by a dict that records every key it is asked."""

    def __init__(self, name: str, table: dict[str, Route] | None = None, *,
                 errors: dict[str, MappingError] | None = None, error: MappingError | None = None) -> None:
        self.name = name
        self.table = dict(table or {})
        self.errors = dict(errors or {})
        self.error = error
        self.refresh_error: MappingError | None = None
        self.calls: list[str] = []
        self.refreshes = 0
        self.closed = False
        self.listener: Callable[[], None] | None = None

    def lookup(self, key: str) -> Route | None:
        self.calls.append(key)
        if self.error is not None:
            raise self.error
        if key in self.errors:
            raise self.errors[key]
        return self.table.get(key)

    def refresh(self) -> None:
        self.refreshes += 1
        if self.refresh_error is not None:
            raise self.refresh_error

    def check(self) -> str:
        return self.name

    def set_change_listener(self, listener: Callable[[], None]) -> None:
        self.listener = listener

    def close(self) -> None:
        self.closed = True


class CountingStatic(StaticMapping):
    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.calls: list[str] = []

    def lookup(self, key: str) -> Route | None:
        self.calls.append(key)
        return super().lookup(key)


ADDRESS = "Bob+News@Example.COM"
FULL, BASE, DOMAIN, PARENT = "bob+news@example.com", "bob@example.com", "example.com", ".com"


@pytest.mark.parametrize(
    ("entries", "winner"),
    [
        ({FULL: R1, BASE: R2, DOMAIN: R3}, FULL),
        ({BASE: R2, DOMAIN: R3}, BASE),
        ({FULL: R1, DOMAIN: R3}, FULL),
        ({DOMAIN: R3}, DOMAIN),
    ],
)
def test_keys_in_order_full_subaddress_domain(entries: dict[str, Route], winner: str) -> None:
    mapping = FakeMapping("m", entries)
    resolution = Resolver([mapping]).resolve(ADDRESS)
    assert resolution == Resolution(entries[winner], "m", winner, False)
    assert mapping.calls == [FULL, BASE, DOMAIN][: [FULL, BASE, DOMAIN].index(winner) + 1]


def test_mapping_order_beats_key_specificity() -> None:
    """Each mapping is asked all keys before the next mapping: an earlier domain entry wins."""
    first = FakeMapping("first", {DOMAIN: R1})
    second = FakeMapping("second", {FULL: R2})
    resolution = Resolver([first, second]).resolve(ADDRESS)
    assert resolution.route == R1 and resolution.mapping == "first" and resolution.key == DOMAIN
    assert second.calls == []


def test_first_match_wins() -> None:
    first = FakeMapping("first", {FULL: R1})
    second = FakeMapping("second", {FULL: R2})
    static = CountingStatic(R3)
    assert Resolver([first, second, static]).resolve(ADDRESS).route == R1
    assert second.calls == [] and static.calls == []


def test_later_mapping_answers_after_misses() -> None:
    first = FakeMapping("first", {"other.example": R1})
    second = FakeMapping("second", {BASE: R2})
    resolution = Resolver([first, second]).resolve(ADDRESS)
    assert resolution == Resolution(R2, "second", BASE, False)
    assert first.calls == [FULL, BASE, DOMAIN, PARENT]
    assert second.calls == [FULL, BASE]


def test_static_default_last() -> None:
    static = CountingStatic(R3)
    resolution = Resolver([FakeMapping("csv"), static]).resolve(ADDRESS)
    assert resolution.route == R3 and resolution.mapping == static.name and resolution.key == FULL


def test_no_mapping_knows_the_recipient() -> None:
    first, second = FakeMapping("a"), FakeMapping("b")
    assert Resolver([first, second]).resolve(ADDRESS) == Resolution(None)
    assert first.calls == second.calls == [FULL, BASE, DOMAIN, PARENT]


@pytest.mark.parametrize(
    ("setup", "failing_key"),
    [
        pytest.param(lambda m: setattr(m, "error", MappingError("database down")), FULL, id="first-key"),
        pytest.param(lambda m: m.errors.update({DOMAIN: MappingError("timeout")}), DOMAIN, id="domain-key"),
        pytest.param(lambda m: setattr(m, "refresh_error", MappingError("unreadable")), FULL, id="refresh"),
    ],
)
@pytest.mark.parametrize("position", [0, 1])
def test_mapping_error_stops_the_chain(setup: Callable[[FakeMapping], None], failing_key: str, position: int) -> None:
    broken = FakeMapping("broken")
    setup(broken)
    static = CountingStatic(R3)
    chain = [broken, static] if position == 0 else [FakeMapping("empty"), broken, static]
    with pytest.raises(LookupFailed) as info:
        Resolver(chain).resolve(ADDRESS)
    assert info.value.mapping == "broken"
    assert info.value.key == failing_key
    assert isinstance(info.value.error, MappingError)
    assert static.calls == [], "a later (static) mapping must not answer when an earlier one failed"


def test_error_after_an_answer_is_never_reached() -> None:
    first = FakeMapping("first", {DOMAIN: R1})
    broken = FakeMapping("broken", error=MappingError("down"))
    assert Resolver([first, broken]).resolve(ADDRESS).route == R1
    assert broken.calls == []


def test_failed_lookup_is_not_cached_by_the_resolver() -> None:
    mapping = FakeMapping("m", {FULL: R1}, error=MappingError("down"))
    resolver = Resolver([mapping])
    with pytest.raises(LookupFailed):
        resolver.resolve(ADDRESS)
    mapping.error = None
    assert resolver.resolve(ADDRESS) == Resolution(R1, "m", FULL, False)
    assert resolver.resolve(ADDRESS) == Resolution(R1, "m", FULL, True)


def test_answers_are_cached_per_mapping_and_key() -> None:
    mapping = FakeMapping("m", {DOMAIN: R1})
    resolver = Resolver([mapping])
    assert resolver.resolve("a@example.com").cached is False
    assert resolver.resolve("b@example.com") == Resolution(R1, "m", DOMAIN, True)  # the domain key is shared
    assert mapping.calls == ["a@example.com", DOMAIN, "b@example.com"]


def test_per_mapping_key_kinds() -> None:
    domains = FakeMapping("domains", {DOMAIN: R1, FULL: R2})
    rest = FakeMapping("rest")
    resolver = Resolver([domains, rest], key_kinds=[("domain",), KEY_KINDS])
    assert resolver.resolve(ADDRESS) == Resolution(R1, "domains", DOMAIN, False)
    assert domains.calls == [DOMAIN]


def test_case_sensitive_local_parts() -> None:
    mapping = FakeMapping("m", {"Bob@example.com": R1})
    assert Resolver([mapping], case_sensitive_local=True).resolve("Bob@EXAMPLE.com").route == R1
    assert Resolver([FakeMapping("m", {"Bob@example.com": R1})]).resolve("Bob@EXAMPLE.com").route is None


def test_close_closes_every_mapping() -> None:
    mappings = [FakeMapping("a"), FakeMapping("b")]
    Resolver(mappings).close()
    assert all(m.closed for m in mappings)


def test_change_listener_is_registered() -> None:
    mapping = FakeMapping("m", {DOMAIN: R1})
    resolver = Resolver([mapping])
    resolver.resolve(ADDRESS)
    assert len(resolver.cache) > 0
    assert mapping.listener is not None
    mapping.table[DOMAIN] = R2
    mapping.listener()
    assert len(resolver.cache) == 0
    assert resolver.resolve(ADDRESS).route == R2


# ---------------------------------------------------------------- the cache


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = [now]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds


class Backend:
    def __init__(self, answers: dict[str, Route | None]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def fetch(self, key: str) -> Callable[[], Route | None]:
        def run() -> Route | None:
            self.calls.append(key)
            return self.answers.get(key)

        return run


def test_cache_positive_ttl() -> None:
    clock = Clock()
    cache = LookupCache(positive_ttl=300, negative_ttl=60, max_entries=100, clock=clock)
    backend = Backend({"k": R1})
    assert cache.get((0, "k"), backend.fetch("k")) == (R1, False)
    clock.advance(299.9)
    assert cache.get((0, "k"), backend.fetch("k")) == (R1, True)
    clock.advance(0.1)
    assert cache.get((0, "k"), backend.fetch("k")) == (R1, False)
    assert backend.calls == ["k", "k"]


def test_cache_negative_ttl() -> None:
    clock = Clock()
    cache = LookupCache(positive_ttl=300, negative_ttl=60, max_entries=100, clock=clock)
    backend = Backend({"known": R1})
    assert cache.get((0, "known"), backend.fetch("known")) == (R1, False)
    assert cache.get((0, "unknown"), backend.fetch("unknown")) == (None, False)
    clock.advance(59.9)
    assert cache.get((0, "unknown"), backend.fetch("unknown")) == (None, True)
    clock.advance(0.1)
    assert cache.get((0, "unknown"), backend.fetch("unknown")) == (None, False)
    assert cache.get((0, "known"), backend.fetch("known")) == (R1, True)  # the positive TTL is longer
    assert backend.calls == ["known", "unknown", "unknown"]


def test_cache_slots_are_per_mapping() -> None:
    cache = LookupCache(300, 60, 100, clock=Clock())
    assert cache.get((0, "k"), lambda: R1) == (R1, False)
    assert cache.get((1, "k"), lambda: R2) == (R2, False)
    assert cache.get((0, "k"), lambda: R3) == (R1, True)


def test_cache_lru_eviction() -> None:
    cache = LookupCache(300, 60, max_entries=3, clock=Clock())
    backend = Backend({"a": R1, "b": R2, "c": R3, "d": R1})
    for key in ("a", "b", "c"):
        cache.get((0, key), backend.fetch(key))
    assert cache.get((0, "a"), backend.fetch("a")) == (R1, True)  # "a" is now the most recently used
    cache.get((0, "d"), backend.fetch("d"))  # evicts "b", the least recently used
    assert len(cache) == 3
    assert cache.get((0, "a"), backend.fetch("a")) == (R1, True)
    assert cache.get((0, "c"), backend.fetch("c")) == (R3, True)
    assert cache.get((0, "d"), backend.fetch("d")) == (R1, True)
    assert backend.calls == ["a", "b", "c", "d"]
    assert cache.get((0, "b"), backend.fetch("b")) == (R2, False)
    assert backend.calls[-1] == "b"
    assert len(cache) == 3


def test_cache_negative_entries_count_towards_the_bound() -> None:
    cache = LookupCache(300, 60, max_entries=2, clock=Clock())
    for i in range(10):
        cache.get((0, f"unknown{i}"), lambda: None)
    assert len(cache) == 2


@pytest.mark.parametrize(
    "error",
    [pytest.param(MappingError("database down"), id="MappingError"),
     pytest.param(RuntimeError("bug in a backend"), id="unexpected-exception")],
)
def test_cache_never_caches_errors(error: Exception) -> None:
    cache = LookupCache(300, 60, 100, clock=Clock())
    calls = []

    def failing() -> Route | None:
        calls.append(1)
        raise error

    for _ in range(3):
        with pytest.raises(type(error)):
            cache.get((0, "k"), failing)
    assert len(calls) == 3
    assert len(cache) == 0
    assert cache.get((0, "k"), lambda: R1) == (R1, False)


def test_cache_clear() -> None:
    cache = LookupCache(300, 60, 100, clock=Clock())
    cache.get((0, "k"), lambda: R1)
    cache.clear()
    assert len(cache) == 0
    assert cache.get((0, "k"), lambda: R2) == (R2, False)


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_cache_single_flight() -> None:
    """50 threads missing the same key at once cause exactly one backend query."""
    threads_n = 50
    cache = LookupCache(300, 60, 100)
    release = threading.Event()
    calls = []

    def slow_backend() -> Route | None:
        calls.append(threading.current_thread().name)
        assert release.wait(10)
        return R1

    results: list[tuple[Route | None, bool]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(cache.get((0, "k"), slow_backend))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    _wait_for(lambda: cache.misses == threads_n)  # every thread is inside get(), waiting for the one query
    release.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(calls) == 1
    assert len(results) == threads_n
    assert all(route == R1 for route, _ in results)
    assert sorted(cached for _, cached in results) == [False] + [True] * (threads_n - 1)
    assert cache.get((0, "k"), slow_backend) == (R1, True)
    assert len(calls) == 1


def test_cache_single_flight_error_reaches_every_waiter_and_is_not_cached() -> None:
    threads_n = 20
    cache = LookupCache(300, 60, 100)
    release = threading.Event()
    calls = []

    def failing_backend() -> Route | None:
        calls.append(1)
        assert release.wait(10)
        raise MappingError("database down")

    outcomes: list[object] = []

    def worker() -> None:
        try:
            outcomes.append(cache.get((0, "k"), failing_backend))
        except MappingError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    _wait_for(lambda: cache.misses == threads_n)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(outcomes) == threads_n and all(isinstance(o, MappingError) for o in outcomes)
    assert cache.get((0, "k"), lambda: R2) == (R2, False)


def test_resolver_single_flight() -> None:
    """The same through the resolver: 50 sessions resolving one new recipient, one backend query."""
    threads_n = 50
    release = threading.Event()

    class SlowMapping(FakeMapping):
        def lookup(self, key: str) -> Route | None:
            result = super().lookup(key)
            assert release.wait(10)
            return result

    mapping = SlowMapping("slow", {FULL: R1})
    resolver = Resolver([mapping])
    results: list[Resolution] = []
    threads = [threading.Thread(target=lambda: results.append(resolver.resolve(ADDRESS))) for _ in range(threads_n)]
    for t in threads:
        t.start()
    _wait_for(lambda: resolver.cache.misses == threads_n)
    release.set()
    for t in threads:
        t.join(10)
    assert mapping.calls == [FULL]
    assert len(results) == threads_n and all(r.route == R1 for r in results)


def test_cache_clear_during_inflight_query_keeps_no_stale_answer() -> None:
    """A change notification (cache clear) that arrives while a query is running wins.

    The query read the old data; storing its answer after the clear would let
    the old route outlive the change for a whole TTL.
    """
    cache = LookupCache(300, 60, 100, clock=Clock())
    started, release = threading.Event(), threading.Event()

    def old_data_query() -> Route | None:
        started.set()
        assert release.wait(10)
        return R1  # the answer from before the change

    leader = threading.Thread(target=lambda: cache.get((0, "k"), old_data_query))
    leader.start()
    assert started.wait(10)
    cache.clear()  # the mapping's data changed meanwhile
    release.set()
    leader.join(10)
    assert cache.get((0, "k"), lambda: R2) == (R2, False)


# ---------------------------------------------------------------- CSV format

HEADER = "pattern;server;tls_verify\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(HEADER + "example.com;mx.example.net:2525;false\n",
                     {"example.com": R("mx.example.net", 2525, False)}, id="three-columns"),
        pytest.param("pattern;server\nexample.com;mx.example.net\n",
                     {"example.com": R("mx.example.net", 25, True)}, id="two-column-header"),
        pytest.param(HEADER + "example.com;mx.example.net\n", {"example.com": R("mx.example.net", 25, True)},
                     id="two-column-row"),
        pytest.param(HEADER + "example.com;mx.example.net;\n", {"example.com": R("mx.example.net", 25, True)},
                     id="empty-tls-verify"),
        pytest.param("Pattern ; Server ; TLS_Verify\n example.com ; mx ; 0 \n", {"example.com": R("mx", 25, False)},
                     id="header-case-and-spaces"),
        pytest.param("# routing table\n\n   \n" + HEADER + "# a comment\n\nexample.com;mx\n  # indented comment\n",
                     {"example.com": R("mx", 25, True)}, id="comments-and-empty-lines"),
        pytest.param(HEADER.replace("\n", "\r\n") + "example.com;mx\r\n", {"example.com": R("mx", 25, True)},
                     id="crlf-file"),
        pytest.param(HEADER, {}, id="header-only"),
        pytest.param(HEADER + "example.net;[::1]:2526;false\nv6.example;[2001:db8::1]\n",
                     {"example.net": R("::1", 2526, False), "v6.example": R("2001:db8::1", 25, True)},
                     id="ipv6-servers"),
        pytest.param(HEADER + "User+Tag@Example.COM;mx\nsales@example.com;mx2:26\nExample.ORG;mx3\n",
                     {"user+tag@example.com": R("mx", 25, True), "sales@example.com": R("mx2", 26, True),
                      "example.org": R("mx3", 25, True)}, id="patterns-normalized"),
    ],
)
def test_parse_csv_valid(text: str, expected: dict[str, Route]) -> None:
    assert parse_csv(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True), ("", True), (" True ", True),
     ("false", False), ("False", False), ("no", False), ("off", False), ("0", False)],
)
def test_parse_csv_tls_verify(value: str, expected: bool) -> None:
    assert parse_csv(f"{HEADER}example.com;mx;{value}\n") == {"example.com": R("mx", 25, expected)}


def test_parse_csv_case_sensitive_local() -> None:
    table = parse_csv(HEADER + "User@Example.COM;mx\n", case_sensitive_local=True)
    assert table == {"User@example.com": R("mx", 25, True)}
    assert normalize_pattern("User@Example.COM", case_sensitive_local=True) == "User@example.com"
    assert normalize_pattern("Example.COM", case_sensitive_local=True) == "example.com"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param("", None, "header", id="empty-file"),
        pytest.param("# only a comment\n\n", None, "header", id="only-comments"),
        pytest.param("example.com;mx;true\n", 1, "header", id="no-header"),
        pytest.param("address;server;tls_verify\nexample.com;mx\n", 1, "header", id="wrong-header"),
        pytest.param("pattern;server;tls_verify;extra\n", 1, "header", id="four-column-header"),
        pytest.param("pattern,server,tls_verify\n", 1, "header", id="comma-header"),
        pytest.param(HEADER + "example.com\n", 2, "fields", id="one-field"),
        pytest.param(HEADER + "example.com;mx;true;extra\n", 2, "fields", id="four-fields"),
        pytest.param(HEADER + "example.com,mx,true\n", 2, "fields", id="commas"),
        pytest.param(HEADER + ";mx\n", 2, "pattern", id="empty-pattern"),
        pytest.param(HEADER + "a b@example.com;mx\n", 2, "pattern", id="space-in-pattern"),
        pytest.param(HEADER + "# c\nexample.com;mx\nexample.com;mx2\n", 4, "twice", id="duplicate"),
        pytest.param(HEADER + "Example.com;mx\nexample.COM;mx2\n", 3, "twice", id="duplicate-after-normalizing"),
        pytest.param(HEADER + "example.com;\n", 2, "server", id="empty-server"),
        pytest.param(HEADER + "example.com;mx:99999\n", 2, "port", id="bad-port"),
        pytest.param(HEADER + "example.com;mx:smtp\n", 2, "port", id="named-port"),
        pytest.param(HEADER + "example.com;::1\n", 2, "IPv6", id="unbracketed-ipv6"),
        pytest.param(HEADER + "example.com;[::1\n", 2, "unclosed", id="unclosed-bracket"),
        pytest.param(HEADER + "example.com;mx host\n", 2, "host", id="space-in-server"),
        pytest.param(HEADER + "example.com;mx;maybe\n", 2, "tls_verify", id="bad-tls-verify"),
        pytest.param(HEADER + "example.com;mx;2\n", 2, "tls_verify", id="tls-verify-2"),
    ],
)
def test_parse_csv_invalid(text: str, line: int | None, fragment: str) -> None:
    with pytest.raises(CsvFormatError) as info:
        parse_csv(text, source="routes.csv")
    message = str(info.value)
    assert message.startswith("routes.csv")
    if line is not None:
        assert message.startswith(f"routes.csv:{line}:"), message
    assert fragment in message


# ---------------------------------------------------------------- CSV reload


class CsvFile:
    """A routes file whose every rewrite is visible to stat (distinct mtime)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0

    def write(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")
        self.version += 1
        stamp = 1_600_000_000_000_000_000 + self.version * 1_000_000_000
        os.utime(self.path, ns=(stamp, stamp))


@pytest.fixture
def routes(tmp_path: Path) -> CsvFile:
    csv = CsvFile(tmp_path / "routes.csv")
    csv.write(HEADER + "example.com;mx-old.example.net;false\n")
    return csv


def make_csv_mapping(routes: CsvFile, clock: Clock, **kwargs: object) -> tuple[CsvMapping, list[int]]:
    mapping = CsvMapping(routes.path, reload_interval=0.01, clock=clock, **kwargs)  # type: ignore[arg-type]
    changes: list[int] = []
    mapping.set_change_listener(lambda: changes.append(1))
    return mapping, changes


OLD = R("mx-old.example.net", 25, False)
NEW = R("mx-new.example.net", 25, True)


def test_csv_reloads_changed_file(routes: CsvFile) -> None:
    clock = Clock()
    mapping, changes = make_csv_mapping(routes, clock)
    assert mapping.lookup("example.com") == OLD
    routes.write(HEADER + "example.com;mx-new.example.net\nexample.org;mx-new.example.net\n")
    assert mapping.lookup("example.com") == OLD  # not checked again before reload_interval
    assert changes == []
    clock.advance(0.02)
    assert mapping.lookup("example.com") == NEW
    assert mapping.lookup("example.org") == NEW
    assert changes == [1]


def test_csv_unchanged_file_does_not_notify(routes: CsvFile) -> None:
    clock = Clock()
    mapping, changes = make_csv_mapping(routes, clock)
    for _ in range(5):
        assert mapping.lookup("example.com") == OLD
        mapping.refresh()
        clock.advance(1)
    assert changes == []


def test_csv_broken_new_file_keeps_old_table(routes: CsvFile) -> None:
    clock = Clock()
    mapping, changes = make_csv_mapping(routes, clock)
    assert mapping.lookup("example.com") == OLD
    routes.write(HEADER + "example.com;mx-new.example.net:99999\n")
    clock.advance(1)
    mapping.refresh()
    assert mapping.lookup("example.com") == OLD
    assert changes == []
    routes.write("no header at all\n")
    clock.advance(1)
    assert mapping.lookup("example.com") == OLD
    routes.write(HEADER + "example.com;mx-new.example.net\n")
    clock.advance(1)
    assert mapping.lookup("example.com") == NEW
    assert changes == [1]


def test_csv_deleted_file_keeps_old_table(routes: CsvFile) -> None:
    clock = Clock()
    mapping, _ = make_csv_mapping(routes, clock)
    assert mapping.lookup("example.com") == OLD
    routes.path.unlink()
    clock.advance(1)
    assert mapping.lookup("example.com") == OLD


@pytest.mark.parametrize(
    "content",
    [pytest.param(None, id="missing"), pytest.param("example.com;mx\n", id="no-header"),
     pytest.param(HEADER + "example.com;mx;perhaps\n", id="bad-row")],
)
def test_csv_unusable_at_start_is_a_mapping_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "routes.csv"
    if content is not None:
        path.write_text(content)
    mapping = CsvMapping(path, reload_interval=0.01, clock=Clock())
    with pytest.raises(MappingError):
        mapping.lookup("example.com")
    with pytest.raises(MappingError):
        mapping.check()
    static = CountingStatic(R3)
    with pytest.raises(LookupFailed):
        Resolver([mapping, static]).resolve("bob@example.com")
    assert static.calls == []


def test_csv_check_summarises(routes: CsvFile) -> None:
    mapping = CsvMapping(routes.path)
    assert "1 entries" in mapping.check()


def test_csv_case_sensitive_local(tmp_path: Path) -> None:
    routes = CsvFile(tmp_path / "routes.csv")
    routes.write(HEADER + "Bob@Example.com;mx-new.example.net\n")
    mapping = CsvMapping(routes.path, case_sensitive_local=True)
    assert mapping.lookup("Bob@example.com") == NEW
    assert mapping.lookup("bob@example.com") is None


def test_csv_change_clears_the_resolver_cache(routes: CsvFile) -> None:
    """A cached answer (positive or negative) never outlives the file change."""
    clock = Clock()
    mapping = CsvMapping(routes.path, reload_interval=0.01, clock=clock)
    cache = LookupCache(positive_ttl=3600, negative_ttl=3600, max_entries=100, clock=clock)
    resolver = Resolver([mapping], cache=cache)
    assert resolver.resolve("bob@example.com") == Resolution(OLD, mapping.name, "example.com", False)
    assert resolver.resolve("bob@example.com").cached is True
    assert resolver.resolve("eve@example.org") == Resolution(None)
    routes.write(HEADER + "example.com;mx-new.example.net\nexample.org;mx-new.example.net\n")
    clock.advance(1)  # past reload_interval, far inside both cache TTLs
    assert resolver.resolve("bob@example.com") == Resolution(NEW, mapping.name, "example.com", False)
    assert resolver.resolve("eve@example.org").route == NEW


def test_csv_broken_change_keeps_cached_answers_valid(routes: CsvFile) -> None:
    clock = Clock()
    mapping = CsvMapping(routes.path, reload_interval=0.01, clock=clock)
    resolver = Resolver([mapping], cache=LookupCache(3600, 3600, 100, clock=clock))
    assert resolver.resolve("bob@example.com").route == OLD
    routes.write("garbage\n")
    clock.advance(1)
    assert resolver.resolve("bob@example.com").route == OLD


def test_build_resolver_from_config(tmp_path: Path) -> None:
    CsvFile(tmp_path / "routes.csv").write(HEADER + "Sales@example.com;mx-new.example.net\nexample.com;[::1]:2526;0\n")
    config = parse_config(
        'recipient_delimiter = "+-"\nlocal_part_case_sensitive = false\n'
        '[[mappings]]\ntype = "csv"\nfile = "routes.csv"\n'
        '[[mappings]]\ntype = "static"\nserver = "fallback.example.net:2525"\n',
        str(tmp_path / "willi.toml"), base=tmp_path,
    )
    resolver = build_resolver(config)
    try:
        assert resolver.resolve("SALES-team@Example.COM").route == NEW
        assert resolver.resolve("bob@example.com").route == R("::1", 2526, False)
        assert resolver.resolve("bob@other.example").route == R("fallback.example.net", 2525, True)
    finally:
        resolver.close()

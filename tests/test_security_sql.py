"""Issue 7, points 2 and 9, against a real MariaDB with its default collation.

Point 2. The old README schema (`pattern VARCHAR(255) PRIMARY KEY` in a
utf8mb4 database, so `utf8mb4_general_ci`) compares accent-, case- and
partly width-insensitively: `'jörg@example.com' = 'jorg@example.com'` is
true there. Willi defends at two levels: domain keys are A-labels (pure
ASCII), so `exämple.com` is asked as `xn--exmple-cua.com` and never meets
the `example.com` row; and when the query returns the `pattern` column, a
row counts only if that pattern, normalized as Willi normalizes keys, is the
key itself. The documented schema (`pattern VARBINARY(255) NOT NULL PRIMARY
KEY`, `SELECT pattern, server, tls_verify FROM routes WHERE pattern = ?`)
matches exactly at the database already.

Point 9. The database host's name is resolved by Willi's bounded DNS
within `connect_timeout`; a resolver that hangs costs each lookup at most
its deadline and one lookup thread for everyone, not a wait per recipient.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from mariadb_harness import TestDatabase
from security_helpers import captured, dns_threads, open_transaction, start
from support import RunningWilli

import willi.dns
from willi.config import parse_config
from willi.mappings.base import MappingError
from willi.mappings.mysql import SqlMapping

pytestmark = pytest.mark.mysql

OLD_SCHEMA = ("CREATE TABLE {t} (pattern VARCHAR(255) PRIMARY KEY, server VARCHAR(255) NOT NULL,"
              " tls_verify VARCHAR(10) NULL)")
NEW_SCHEMA = ("CREATE TABLE {t} (pattern VARBINARY(255) NOT NULL PRIMARY KEY, server VARCHAR(255) NOT NULL,"
              " tls_verify VARCHAR(10) NULL)")
OLD_QUERY = "SELECT server, tls_verify FROM {t} WHERE pattern = ?"
NEW_QUERY = "SELECT pattern, server, tls_verify FROM {t} WHERE pattern = ?"


class Routes:
    """One routes table of the session's database, created with a given schema."""

    def __init__(self, db: TestDatabase, name: str, schema: str) -> None:
        self.db, self.name = db, name
        db.execute(f"DROP TABLE IF EXISTS {name}", schema.format(t=name))

    def add(self, pattern: str, server: str) -> None:
        conn = self.db.connect()
        try:
            cur = conn.cursor()
            cur.execute(f"INSERT INTO {self.name} (pattern, server, tls_verify) VALUES (%s, %s, 'false')",
                        (pattern, server))
            cur.close()
        finally:
            conn.close()

    def schema(self) -> str:
        return self.scalar(f"SHOW CREATE TABLE {self.name}", column=1)

    def scalar(self, statement: str, params: tuple = (), column: int = 0) -> object:
        conn = self.db.connect()
        try:
            cur = conn.cursor()
            cur.execute(statement, params)
            row = cur.fetchone()
            cur.close()
            return None if row is None else row[column]
        finally:
            conn.close()

    def mapping_toml(self, query: str, host: str | None = None, extra: str = "") -> str:
        d = self.db
        return (f'[[mappings]]\ntype = "sql"\nhost = "{host or d.host}"\nport = {d.port}\nuser = "{d.user}"\n'
                f'password = "{d.password}"\ndatabase = "{d.name}"\nquery = "{query.format(t=self.name)}"\n'
                f'connect_timeout = "2s"\nread_timeout = "2s"\n{extra}')

    def mapping(self, query: str, host: str | None = None) -> SqlMapping:
        config = parse_config(self.mapping_toml(query, host), "test.toml")
        return SqlMapping(config.mappings[0], 0)  # type: ignore[arg-type]

    def drop(self) -> None:
        self.db.execute(f"DROP TABLE IF EXISTS {self.name}")


@pytest.fixture
def old_routes(system_mariadb: TestDatabase) -> Iterator[Routes]:
    routes = Routes(system_mariadb, "sec_old_routes", OLD_SCHEMA)
    yield routes
    routes.drop()


@pytest.fixture
def new_routes(system_mariadb: TestDatabase) -> Iterator[Routes]:
    routes = Routes(system_mariadb, "sec_new_routes", NEW_SCHEMA)
    yield routes
    routes.drop()


def test_premise_the_old_schema_has_mariadbs_default_collation(old_routes: Routes) -> None:
    assert "utf8mb4_general_ci" in str(old_routes.scalar(
        "SELECT TABLE_COLLATION FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (old_routes.name,))), old_routes.schema()
    old_routes.add("example.com", "127.0.0.1:1")
    old_routes.add("jorg@example.com", "127.0.0.1:2")
    # What the database itself considers equal to the key: the reason for everything below.
    for lookalike in ("ex\u00e4mple.com", "EXAMPLE.COM", "\u00e9xample.com"):
        assert old_routes.scalar(f"SELECT server FROM {old_routes.name} WHERE pattern = %s",
                                 (lookalike,)) == "127.0.0.1:1", lookalike
    assert old_routes.scalar(f"SELECT server FROM {old_routes.name} WHERE pattern = %s",
                             ("j\u00f6rg@example.com",)) == "127.0.0.1:2"


# ---------------------------------------------------------------- the old schema


@pytest.mark.parametrize("query", [OLD_QUERY, NEW_QUERY])
@pytest.mark.parametrize("recipient", ["victim@ex\u00e4mple.com", "victim@\u00e9xample.com",
                                       "victim@EX\u00c4MPLE.COM", "victim@sub.ex\u00e4mple.com"])
def test_old_schema_an_idn_recipient_never_takes_the_ascii_row(old_routes: Routes, recipient: str,
                                                               query: str) -> None:
    old_routes.add("example.com", "127.0.0.1:1")
    old_routes.add(".example.com", "127.0.0.1:1")
    mapping = old_routes.mapping(query)
    try:
        from willi.address import lookup_keys

        keys = lookup_keys(recipient, "+")
        assert all(key.isascii() for key in keys), keys  # A-labels: the collation has nothing to fold
        assert [key for key in keys if mapping.lookup(key) is not None] == []
    finally:
        mapping.close()


@pytest.mark.parametrize(("row", "recipient"), [
    ("jorg@example.com", "j\u00f6rg@example.com"),
    ("j\u00f6rg@example.com", "jorg@example.com"),
    ("strase@example.com", "stra\u00dfe@example.com"),
    ("jorg@example.com", "J\u00d6RG@example.com"),
    ("jorg@example.com", "JORG@example.com"),  # control: the row's own key (ASCII case folds)
])
def test_old_schema_with_pattern_column_ignores_rows_that_are_not_the_key(old_routes: Routes, row: str,
                                                                          recipient: str) -> None:
    old_routes.add(row, "127.0.0.1:2")
    mapping = old_routes.mapping(NEW_QUERY)
    try:
        from willi.address import lookup_keys

        full_key = lookup_keys(recipient, "+")[0]
        route = mapping.lookup(full_key)
        row_is_the_key = full_key == lookup_keys(row, "+")[0]
        assert (route is not None) == row_is_the_key, (row, recipient, route)
    finally:
        mapping.close()


def test_old_query_without_pattern_column_is_what_the_new_schema_fixes(old_routes: Routes) -> None:
    """Documents the danger of the old README: the collation's row is taken as the answer."""
    old_routes.add("jorg@example.com", "127.0.0.1:2")
    mapping = old_routes.mapping(OLD_QUERY)
    try:
        route = mapping.lookup("j\u00f6rg@example.com")
    finally:
        mapping.close()
    assert route is not None and route.endpoint == "127.0.0.1:2"


def test_old_schema_a_row_ignored_for_its_collation_is_logged_once(old_routes: Routes) -> None:
    old_routes.add("jorg@example.com", "127.0.0.1:2")
    mapping = old_routes.mapping(NEW_QUERY)
    try:
        with captured("willi.mappings", level=30) as lines:
            assert mapping.lookup("j\u00f6rg@example.com") is None
            assert mapping.lookup("j\u00f6rg@example.com") is None
    finally:
        mapping.close()
    warnings = [line for line in lines if "not the key" in line]
    assert len(warnings) == 1 and "VARBINARY" in warnings[0], lines


def test_old_schema_end_to_end_the_lookalike_local_part_is_not_routed(
        old_routes: Routes, willi: Callable[..., RunningWilli], fake_upstream: Callable[..., FakeUpstream]) -> None:
    jorg = fake_upstream()
    old_routes.add("jorg@example.com", f"127.0.0.1:{jorg.port}")
    w = willi(mappings=old_routes.mapping_toml(NEW_QUERY))
    client = open_transaction(w, utf8=True)
    try:
        code, lines = client.cmd("RCPT TO:<j\u00f6rg@example.com>")
        assert code == 554 and "Relay access denied" in lines[0], (code, lines)
        assert jorg.sessions == []  # no upstream: the only row was not this recipient's
        assert client.cmd("RCPT TO:<JORG@example.com>")[0] == 250  # control: the row's own key routes
    finally:
        client.close()


# ---------------------------------------------------------------- the new, documented schema


def test_new_schema_each_recipient_matches_only_its_own_row(new_routes: Routes) -> None:
    new_routes.add("example.com", "127.0.0.1:1")
    new_routes.add("xn--exmple-cua.com", "127.0.0.1:2")
    new_routes.add("jorg@example.com", "127.0.0.1:3")
    new_routes.add("j\u00f6rg@example.com", "127.0.0.1:4")
    new_routes.add(".example.com", "127.0.0.1:5")
    from willi.address import lookup_keys

    mapping = new_routes.mapping(NEW_QUERY)
    try:
        def route_of(recipient: str) -> str | None:
            for key in lookup_keys(recipient, "+"):
                route = mapping.lookup(key)
                if route is not None:
                    return route.endpoint
            return None

        assert route_of("victim@example.com") == "127.0.0.1:1"
        assert route_of("victim@EXAMPLE.com") == "127.0.0.1:1"
        assert route_of("victim@ex\u00e4mple.com") == "127.0.0.1:2"
        assert route_of("victim@EX\u00c4MPLE.com") == "127.0.0.1:2"
        assert route_of("jorg@example.com") == "127.0.0.1:3"
        assert route_of("Jorg+tag@Example.com") == "127.0.0.1:3"
        assert route_of("j\u00f6rg@example.com") == "127.0.0.1:4"
        assert route_of("J\u00d6RG@example.com") == "127.0.0.1:1"  # not jörg's row: Ö is not folded
        assert route_of("victim@sub.example.com") == "127.0.0.1:5"
        assert route_of("victim@\u00e9xample.com") is None
        assert route_of("stra\u00dfe@ex\u00e4mple.org") is None
    finally:
        mapping.close()


def test_new_schema_compares_bytes_at_the_database(new_routes: Routes) -> None:
    new_routes.add("jorg@example.com", "127.0.0.1:3")
    for lookalike in ("j\u00f6rg@example.com", "JORG@example.com", "jorg@example.com "):
        assert new_routes.scalar(f"SELECT server FROM {new_routes.name} WHERE pattern = %s",
                                 (lookalike.encode(),)) is None, lookalike


@pytest.mark.parametrize("query", [NEW_QUERY, OLD_QUERY])
def test_new_schema_end_to_end(new_routes: Routes, willi: Callable[..., RunningWilli],
                               fake_upstream: Callable[..., FakeUpstream], query: str) -> None:
    plain, idn = fake_upstream(), fake_upstream()
    new_routes.add("example.com", f"127.0.0.1:{plain.port}")
    new_routes.add("xn--exmple-cua.com", f"127.0.0.1:{idn.port}")
    w = willi(mappings=new_routes.mapping_toml(query))
    client = open_transaction(w, utf8=True)
    try:
        assert client.cmd("RCPT TO:<victim@ex\u00e4mple.com>")[0] == 250
        assert idn.sessions and plain.sessions == []
        assert client.cmd("RCPT TO:<victim@example.com>")[0] == 452  # another route: a separate transaction
        assert plain.sessions == []
    finally:
        client.close()


# ---------------------------------------------------------------- point 9: the database host's DNS


class SlowResolver:
    """getaddrinfo for one name hangs (until released); another name resolves to 127.0.0.1 at once."""

    def __init__(self, slow: str, fast: str, hang: float = 10.0) -> None:
        self.slow, self.fast, self.hang = slow, fast, hang
        self.original = socket.getaddrinfo
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, host: object, port: object, *args: object, **kwargs: object) -> list:
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        if isinstance(host, str) and host.lower() == self.slow and not int(flags) & socket.AI_NUMERICHOST:  # type: ignore[call-overload]
            with self._lock:
                self.calls += 1
            self.release.wait(self.hang)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if isinstance(host, str) and host.lower() == self.fast:
            host = "127.0.0.1"
        return self.original(host, port, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowResolver]:
    resolver = SlowResolver("slow-db.willi.test", "fast-db.willi.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    willi.dns.DNS.clear()
    yield resolver
    resolver.release.set()
    willi.dns.DNS.clear()


def test_fast_name_resolves_through_the_bounded_resolver(new_routes: Routes, slow_dns: SlowResolver) -> None:
    new_routes.add("example.com", "127.0.0.1:1")
    mapping = new_routes.mapping(NEW_QUERY, host="fast-db.willi.test")
    try:
        route = mapping.lookup("example.com")
    finally:
        mapping.close()
    assert route is not None and route.endpoint == "127.0.0.1:1"


def test_slow_database_name_fails_within_connect_timeout(new_routes: Routes, slow_dns: SlowResolver) -> None:
    mapping = new_routes.mapping(NEW_QUERY, host="slow-db.willi.test")
    try:
        started = time.monotonic()
        with pytest.raises(MappingError, match=r"slow-db\.willi\.test"):
            mapping.lookup("example.com")
        elapsed = time.monotonic() - started
    finally:
        mapping.close()
    assert 1.5 <= elapsed < 4.5, elapsed  # connect_timeout = 2s, not the resolver's 10 s


def test_concurrent_lookups_share_one_resolution_and_keep_their_deadlines(new_routes: Routes,
                                                                         slow_dns: SlowResolver) -> None:
    mapping = new_routes.mapping(NEW_QUERY, host="slow-db.willi.test")
    durations: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def lookup(i: int) -> None:
        started = time.monotonic()
        try:
            mapping.lookup(f"d{i}.example.com")
        except MappingError as exc:
            with lock:
                errors.append(exc)
        finally:
            with lock:
                durations.append(time.monotonic() - started)

    try:
        threads = [threading.Thread(target=lookup, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # staggered: later ones join a resolution already under way
        for t in threads:
            t.join(15)
        # A second wave while the first resolution still hangs: each waits its own deadline, not 10 s.
        second_started = time.monotonic()
        with pytest.raises(MappingError):
            mapping.lookup("again.example.com")
        second = time.monotonic() - second_started
    finally:
        mapping.close()
    assert len(errors) == 8 and max(durations) < 4.5, durations
    assert second < 4.5, second
    assert slow_dns.calls == 1, "every lookup asked the resolver anew"
    assert dns_threads() <= willi.dns.THREADS  # the pool's own (other tests' pools may still run theirs)


def test_slow_database_name_end_to_end_is_451_430_in_time(new_routes: Routes, slow_dns: SlowResolver,
                                                          tmp_path: Path) -> None:
    mapping_toml = new_routes.mapping_toml(NEW_QUERY, host="slow-db.willi.test")
    from toml import loads

    table = loads(mapping_toml)["mappings"][0]
    w = start(tmp_path, [table])
    try:
        client = open_transaction(w)
        try:
            for recipient in ("a@example.com", "b@example.com"):
                started = time.monotonic()
                code, lines = client.cmd(f"RCPT TO:<{recipient}>")
                elapsed = time.monotonic() - started
                assert code == 451 and lines[0].startswith("4.3.0"), (code, lines)
                assert elapsed < 4.5, elapsed
        finally:
            client.close()
    finally:
        w.stop()


# ---------------------------------------------------------------- point 9: the whole connect has one deadline


class DribblingDatabase:
    """Accepts TCP and sends a real server's handshake packet one byte every `pause` seconds."""

    def __init__(self, handshake: bytes, pause: float = 0.5) -> None:
        self.handshake, self.pause = handshake, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.dribble, args=(conn,), daemon=True).start()

    def dribble(self, conn: socket.socket) -> None:
        with conn:
            for byte in self.handshake:
                if self.stopping.wait(self.pause):
                    return
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def dribbling_db(system_mariadb: TestDatabase) -> Iterator[DribblingDatabase]:
    with socket.create_connection((system_mariadb.host, system_mariadb.port), timeout=5) as real:
        handshake = real.recv(4096)  # the server speaks first: its greeting packet, ~100 bytes
    assert len(handshake) > 20
    db = DribblingDatabase(handshake)
    yield db
    db.stop()


def test_a_database_dribbling_its_handshake_fails_within_connect_timeout(new_routes: Routes,
                                                                         dribbling_db: DribblingDatabase) -> None:
    config = parse_config(new_routes.mapping_toml(NEW_QUERY).replace(f"port = {new_routes.db.port}",
                                                                     f"port = {dribbling_db.port}"), "test.toml")
    mapping = SqlMapping(config.mappings[0], 0)  # type: ignore[arg-type]
    durations: list[float] = []

    def lookup() -> None:
        started = time.monotonic()
        try:
            with pytest.raises(MappingError, match="timed out after 2s"):
                mapping.lookup("example.com")
        finally:
            durations.append(time.monotonic() - started)

    try:
        threads = [threading.Thread(target=lookup) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        lookup()  # and once more, alone
    finally:
        mapping.close()
    assert len(durations) == 4 and max(durations) < 2 + 2.5, durations  # not ~50 s of dribbled handshake


def test_a_dribbling_database_is_451_430_in_time_end_to_end(new_routes: Routes, dribbling_db: DribblingDatabase,
                                                            tmp_path: Path) -> None:
    from toml import loads

    table = loads(new_routes.mapping_toml(NEW_QUERY))["mappings"][0]
    table["port"] = dribbling_db.port
    w = start(tmp_path, [table])
    try:
        client = open_transaction(w)
        try:
            started = time.monotonic()
            code, lines = client.cmd("RCPT TO:<a@example.com>")
            elapsed = time.monotonic() - started
        finally:
            client.close()
    finally:
        w.stop()
    assert code == 451 and lines[0].startswith("4.3.0"), (code, lines)
    assert elapsed < 2 + 2.5, elapsed

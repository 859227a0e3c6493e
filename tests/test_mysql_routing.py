"""The `sql` mapping through the whole proxy, against a real MariaDB/MySQL.

The session's own database and user on the machine's MariaDB (see
mariadb_harness.py) hold the routes. The database is made to vanish with a
TCP forwarder in front of it, so the shared server itself is never stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from mariadb_harness import TestDatabase
from tcpforward import TcpForwarder

from willi.config import parse_config
from willi.mappings.mysql import SqlMapping
from willi.resolver import build_resolver

pytestmark = pytest.mark.mysql

TABLE = "e2e_routes"


class Db:
    """The test database with a fresh routes table, filled by the test user."""

    def __init__(self, database: TestDatabase) -> None:
        self.database = database
        self.conn = database.connect()

    def set_route(self, pattern: str, server: str, tls_verify: str | None = "false") -> None:
        cur = self.conn.cursor()
        cur.execute(f"REPLACE INTO {TABLE} (pattern, server, tls_verify) VALUES (%s, %s, %s)",
                    (pattern, server, tls_verify))
        cur.close()


@pytest.fixture
def db(system_mariadb: TestDatabase) -> Iterator[Db]:
    system_mariadb.execute(
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (pattern VARCHAR(255) PRIMARY KEY, server VARCHAR(255) NOT NULL,"
        " tls_verify VARCHAR(10) NULL)",
    )
    handle = Db(system_mariadb)
    try:
        yield handle
    finally:
        handle.conn.close()
        system_mariadb.execute(f"DROP TABLE IF EXISTS {TABLE}")


def sql_mapping(db: Db, port: int | None = None,
                query: str = f"SELECT server, tls_verify FROM {TABLE} WHERE pattern = ?", extra: str = "") -> str:
    d = db.database
    return (f'[[mappings]]\ntype = "sql"\nhost = "{d.host}"\nport = {port or d.port}\nuser = "{d.user}"\n'
            f'password = "{d.password}"\ndatabase = "{d.name}"\nquery = "{query}"\n'
            f'connect_timeout = "1s"\nread_timeout = "1s"\n{extra}')


def send(w, recipient: str) -> tuple[int, str]:
    """MAIL + RCPT over a raw socket; returns the RCPT reply."""
    client = w.raw()
    try:
        client.ehlo()
        client.cmd("MAIL FROM:<a@sender.example>")
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        client.cmd("QUIT")
        return code, lines[0]
    finally:
        client.close()


def test_sql_routing_end_to_end(db, willi, fake_upstream) -> None:
    upstream = fake_upstream()
    db.set_route("example.com", f"127.0.0.1:{upstream.port}")
    w = willi(mappings=sql_mapping(db))
    with w.smtp() as client:
        client.sendmail("a@sender.example", ["Bob+tag@Example.com"], b"Subject: sql\r\n\r\nrouted by sql\r\n")
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)
    assert upstream.completed_transactions[0].data.endswith(b"routed by sql\r\n")


def test_chain_order_sql_csv_static(db, willi, fake_upstream, tmp_path) -> None:
    by_sql, by_csv, by_static = fake_upstream(), fake_upstream(), fake_upstream()
    db.set_route("vip@example.com", f"127.0.0.1:{by_sql.port}")
    csv = tmp_path / "routes.csv"
    csv.write_text(f"pattern;server;tls_verify\nexample.com;127.0.0.1:{by_csv.port};false\n")
    mappings = (sql_mapping(db) + f'\n[[mappings]]\ntype = "csv"\nfile = "{csv}"\n'
                f'\n[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{by_static.port}"\ntls_verify = false\n')
    w = willi(mappings=mappings)
    for recipient, upstream in (("vip@example.com", by_sql), ("other@example.com", by_csv),
                                ("someone@elsewhere.example", by_static)):
        with w.smtp() as client:
            client.sendmail("a@sender.example", [recipient], b"Subject: chain\r\n\r\nx\r\n")
        assert upstream.wait_for(lambda u=upstream: len(u.completed_transactions) == 1), recipient
        assert upstream.completed_transactions[0].rcpts[0].lower().endswith(f"<{recipient}>")


def test_database_outage_gives_451_and_recovers_without_restart(db, willi, fake_upstream) -> None:
    upstream, fallback = fake_upstream(), fake_upstream()
    db.set_route("example.com", f"127.0.0.1:{upstream.port}")
    forwarder = TcpForwarder((db.database.host, db.database.port)).start()
    try:
        mappings = (sql_mapping(db, port=forwarder.port)
                    + f'\n[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{fallback.port}"\ntls_verify = false\n')
        w = willi(mappings=mappings)
        assert send(w, "one@example.com")[0] == 250
        forwarder.stop()
        started = time.monotonic()
        code, text = send(w, "two@example.com")
        assert (code, text[:5]) == (451, "4.3.0"), "a database error is temporary, never 5xx"
        assert time.monotonic() - started < 5
        assert not fallback.sessions, "a failing mapping must stop the chain: the static was asked"
        forwarder.start()
        assert send(w, "three@example.com")[0] == 250, "Willi must serve again once the database is back"
    finally:
        forwarder.stop()


def test_slow_query_gives_451_within_the_read_timeout(db, willi, fake_upstream) -> None:
    upstream = fake_upstream()
    db.set_route("example.com", f"127.0.0.1:{upstream.port}")
    slow = f"SELECT server, tls_verify FROM {TABLE} WHERE pattern = ? AND SLEEP(3) = 0"
    w = willi(mappings=sql_mapping(db, query=slow))
    started = time.monotonic()
    code, text = send(w, "x@example.com")
    elapsed = time.monotonic() - started
    assert (code, text[:5]) == (451, "4.3.0")
    assert elapsed < 2.9, f"the 1s read timeout took {elapsed:.1f}s"


def test_200_threads_get_correct_answers(db, tmp_path) -> None:
    for d in range(20):
        db.set_route(f"d{d}.example", f"mx{d}.example:25")
    config = parse_config('[[mappings]]\n' + sql_mapping(db).split("[[mappings]]\n", 1)[1])
    resolver = build_resolver(config)
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(200)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            resolution = resolver.resolve(f"user{i}@d{i % 20}.example")
            results[i] = resolution.route.endpoint if resolution.route else "none"
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    resolver.close()
    assert not errors
    assert results == {i: f"mx{i % 20}.example:25" for i in range(200)}


def test_concurrent_lookups_of_one_key_make_one_query_each(db, monkeypatch) -> None:
    db.set_route("example.com", "mx.example:25")
    calls: list[str] = []
    real = SqlMapping.lookup

    def counting(self, key):
        calls.append(key)
        time.sleep(0.2)  # keep the query in flight while the other threads arrive
        return real(self, key)

    monkeypatch.setattr(SqlMapping, "lookup", counting)
    config = parse_config('[[mappings]]\n' + sql_mapping(db).split("[[mappings]]\n", 1)[1])
    resolver = build_resolver(config)
    barrier = threading.Barrier(50)
    answers: list[str] = []

    def work() -> None:
        barrier.wait(timeout=10)
        answers.append(resolver.resolve("same@example.com").route.endpoint)

    threads = [threading.Thread(target=work) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    resolver.close()
    assert answers == ["mx.example:25"] * 50
    assert sorted(calls) == ["example.com", "same@example.com"], "one query per key, whatever the concurrency"

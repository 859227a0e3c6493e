"""The `sql` mapping against a real MariaDB/MySQL server.

The tests create their own database and a dedicated user with a password,
and drop both at the end. Without a reachable server they are skipped,
unless `CI` is set: there a missing database must fail the run, not hide it.
Override the server with WILLI_TEST_MYSQL_HOST / _PORT / _USER / _PASSWORD.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mysql.connector
import pytest
from mysql.connector.connection import MySQLConnection

from willi.config import SqlMappingConfig
from willi.mappings.base import MappingError
from willi.mappings.mysql import PROBE_KEY, SqlMapping, convert_placeholder
from willi.route import Route

HOST = os.environ.get("WILLI_TEST_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("WILLI_TEST_MYSQL_PORT", "3306"))
ADMIN_USER = os.environ.get("WILLI_TEST_MYSQL_USER", "root")
ADMIN_PASSWORD = os.environ.get("WILLI_TEST_MYSQL_PASSWORD", "")

QUERY = "SELECT server, tls_verify FROM routes WHERE pattern = ?"

ROWS = [
    ("alice@example.org", "mx1.example.net", "true"),
    ("bob@example.org", "mx2.example.net:2525", "false"),
    ("zero@example.org", "mx3.example.net", "0"),
    ("one@example.org", "mx4.example.net", "1"),
    ("null@example.org", "[2001:db8::25]:587", None),
    ("example.com", "relay.example.net", "TRUE"),
    ("bad@example.org", "mx.example.net:notaport", None),
    ("slow@example.org", "slow.example.net", None),
    ("ünïcode@exämple.org", "mx-utf8.example.net", None),
] + [(f"user{i}@bulk.example", f"mx{i}.bulk.example:{2500 + i}", None) for i in range(50)]


@dataclass(frozen=True)
class Db:
    """The throw-away database and the password-protected user that reads it."""

    name: str
    user: str
    password: str


def admin_connect(database: str | None = None) -> MySQLConnection:
    """A root connection for setting up, inspecting and killing sessions."""
    return MySQLConnection(
        host=HOST,
        port=PORT,
        user=ADMIN_USER,
        password=ADMIN_PASSWORD,
        database=database,
        autocommit=True,
        use_pure=True,
        connection_timeout=3,
    )


@pytest.fixture(scope="module")
def db() -> Iterator[Db]:
    try:
        admin = admin_connect()
    except mysql.connector.Error as err:
        reason = f"no MySQL/MariaDB server at {HOST}:{PORT} as {ADMIN_USER}: {err}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the database is required: {reason}")
        pytest.skip(reason)
    token = secrets.token_hex(4)
    info = Db(name=f"willi_test_{token}", user=f"willi_{token}", password=f"Pw-{secrets.token_hex(8)}")
    cur = admin.cursor()
    try:
        cur.execute(f"CREATE DATABASE `{info.name}` CHARACTER SET utf8mb4")
        cur.execute(
            f"CREATE TABLE `{info.name}`.routes ("
            " pattern VARCHAR(255) NOT NULL PRIMARY KEY,"
            " server VARCHAR(255),"
            " tls_verify VARCHAR(10) NULL)"
        )
        cur.executemany(
            f"INSERT INTO `{info.name}`.routes (pattern, server, tls_verify) VALUES (%s, %s, %s)",
            ROWS,
        )
        cur.execute(f"CREATE USER '{info.user}'@'%' IDENTIFIED BY '{info.password}'")
        cur.execute(f"GRANT SELECT ON `{info.name}`.* TO '{info.user}'@'%'")
        yield info
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS `{info.name}`")
        cur.execute(f"DROP USER IF EXISTS '{info.user}'@'%'")
        admin.close()


def config(db: Db, **changes: object) -> SqlMappingConfig:
    """The dedicated user's settings, with short timeouts for the tests."""
    base = SqlMappingConfig(
        query=QUERY,
        database=db.name,
        user=db.user,
        password=db.password,
        host=HOST,
        port=PORT,
        connect_timeout=3.0,
        read_timeout=3.0,
        pool_size=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def mapping(db: Db) -> Iterator[SqlMapping]:
    m = SqlMapping(config(db), 0)
    yield m
    m.close()


def sessions_of(user: str) -> list[int]:
    """Server-side connection ids of `user`, to count or kill them."""
    admin = admin_connect()
    try:
        cur = admin.cursor()
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
        return [int(row[0]) for row in cur.fetchall()]  # type: ignore[arg-type, index]
    finally:
        admin.close()


def sleeping_queries(user: str) -> int:
    admin = admin_connect()
    try:
        cur = admin.cursor()
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
            " WHERE USER = %s AND COMMAND = 'Query' AND INFO LIKE '%%SLEEP%%'",
            (user,),
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0  # type: ignore[arg-type]
    finally:
        admin.close()


def kill_sessions(user: str) -> int:
    admin = admin_connect()
    try:
        ids = sessions_of(user)
        for cid in ids:
            admin.cmd_query(f"KILL CONNECTION {cid}")
        return len(ids)
    finally:
        admin.close()


# -- placeholders ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT server FROM r WHERE p = ?", "SELECT server FROM r WHERE p = %s"),
        ("SELECT server FROM r WHERE p = %s", "SELECT server FROM r WHERE p = %s"),
        ("SELECT 'why?' AS x, server FROM r WHERE p=?", "SELECT 'why?' AS x, server FROM r WHERE p=%s"),
        ('SELECT "a?b" FROM r WHERE p = ?', 'SELECT "a?b" FROM r WHERE p = %s'),
        ("SELECT `odd?col` FROM r WHERE p = ?", "SELECT `odd?col` FROM r WHERE p = %s"),
        ("SELECT 'it''s?' FROM r WHERE p = ?", "SELECT 'it''s?' FROM r WHERE p = %s"),
        ("SELECT 'a\\'?' FROM r WHERE p = ?", "SELECT 'a\\'?' FROM r WHERE p = %s"),
        ("SELECT s FROM r -- who?\nWHERE p = ?", "SELECT s FROM r -- who?\nWHERE p = %s"),
        ("SELECT s FROM r # who?\nWHERE p = ?", "SELECT s FROM r # who?\nWHERE p = %s"),
        ("SELECT s /* ? */ FROM r WHERE p = ?", "SELECT s /* ? */ FROM r WHERE p = %s"),
        ("SELECT s FROM r WHERE p = ?--1", "SELECT s FROM r WHERE p = %s--1"),
        ("SELECT s FROM r WHERE p = 'unterminated ?", "SELECT s FROM r WHERE p = 'unterminated ?"),
        ("?", "%s"),
        ("", ""),
    ],
)
def test_convert_placeholder(query: str, expected: str) -> None:
    assert convert_placeholder(query) == expected


# -- lookups ----------------------------------------------------------------------


def test_name_never_contains_password(db: Db, mapping: SqlMapping) -> None:
    assert mapping.name == f"sql:{db.user}@{HOST}:{PORT}/{db.name}"
    assert db.password not in mapping.name
    assert db.password not in repr(mapping.config)


def test_lookup_hit_and_miss(mapping: SqlMapping) -> None:
    assert mapping.lookup("alice@example.org") == Route("mx1.example.net", 25, True)
    assert mapping.lookup("bob@example.org") == Route("mx2.example.net", 2525, False)
    assert mapping.lookup("null@example.org") == Route("2001:db8::25", 587, True)
    assert mapping.lookup("nobody@example.org") is None
    assert mapping.lookup("ünïcode@exämple.org") == Route("mx-utf8.example.net", 25, True)
    # A key full of quoting tricks is a parameter, not SQL.
    assert mapping.lookup("x' OR '1'='1") is None


def test_percent_s_query(db: Db) -> None:
    m = SqlMapping(config(db, query="SELECT server, tls_verify FROM routes WHERE pattern = %s"), 0)
    try:
        assert m.lookup("bob@example.org") == Route("mx2.example.net", 2525, False)
        assert m.lookup("nobody@example.org") is None
    finally:
        m.close()


def test_question_mark_inside_literal_is_not_a_placeholder(db: Db) -> None:
    query = "SELECT server, 'really?' AS note FROM routes WHERE pattern = ?"
    m = SqlMapping(config(db, query=query), 0)
    try:
        assert m.lookup("alice@example.org") == Route("mx1.example.net", 25, True)
    finally:
        m.close()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("alice@example.org", True),  # 'true'
        ("example.com", True),  # 'TRUE'
        ("bob@example.org", False),  # 'false'
        ("zero@example.org", False),  # '0'
        ("one@example.org", True),  # '1'
        ("null@example.org", True),  # NULL
    ],
)
def test_tls_verify_text_values(mapping: SqlMapping, key: str, expected: bool) -> None:
    route = mapping.lookup(key)
    assert route is not None
    assert route.tls_verify is expected


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("0 AS tls_verify", False),
        ("1 AS tls_verify", True),
        ("NULL AS tls_verify", True),
        ("CAST(0 AS UNSIGNED) AS TLS_VERIFY", False),
        ("'false' AS tls_verify", False),
        ("'no-column' AS other", True),  # tls_verify absent
    ],
)
def test_tls_verify_column_types(db: Db, column: str, expected: bool) -> None:
    m = SqlMapping(config(db, query=f"SELECT server, {column} FROM routes WHERE pattern = ?"), 0)
    try:
        route = m.lookup("alice@example.org")
        assert route is not None
        assert route.tls_verify is expected
    finally:
        m.close()


def test_bad_server_value_is_a_mapping_error(mapping: SqlMapping) -> None:
    with pytest.raises(MappingError) as exc:
        mapping.lookup("bad@example.org")
    text = str(exc.value)
    assert mapping.name in text
    assert "bad@example.org" in text
    assert "notaport" in text
    # The connection is still fine afterwards.
    assert mapping.lookup("alice@example.org") is not None


def test_bad_tls_verify_value_is_a_mapping_error(db: Db) -> None:
    m = SqlMapping(config(db, query="SELECT server, 'maybe' AS tls_verify FROM routes WHERE pattern = ?"), 0)
    try:
        with pytest.raises(MappingError, match=r"alice@example\.org.*maybe"):
            m.lookup("alice@example.org")
    finally:
        m.close()


def test_null_server_is_a_mapping_error(db: Db) -> None:
    m = SqlMapping(config(db, query="SELECT NULL AS server FROM routes WHERE pattern = ?"), 0)
    try:
        with pytest.raises(MappingError, match="NULL"):
            m.lookup("alice@example.org")
    finally:
        m.close()


def test_changes_are_seen_by_pooled_connections(db: Db, mapping: SqlMapping) -> None:
    """Autocommit: a pooled connection must not keep an old snapshot."""
    assert mapping.lookup("new@example.org") is None
    admin = admin_connect(db.name)
    try:
        admin.cmd_query("INSERT INTO routes VALUES ('new@example.org', 'fresh.example.net', NULL)")
        assert mapping.lookup("new@example.org") == Route("fresh.example.net")
    finally:
        admin.cmd_query("DELETE FROM routes WHERE pattern = 'new@example.org'")
        admin.close()


def test_check_reports_success(db: Db, mapping: SqlMapping) -> None:
    summary = mapping.check()
    assert mapping.name in summary
    assert PROBE_KEY in summary
    assert "\n" not in summary
    assert db.password not in summary


def test_set_change_listener_is_accepted(mapping: SqlMapping) -> None:
    mapping.set_change_listener(lambda: None)
    assert mapping.lookup("alice@example.org") is not None


# -- errors -------------------------------------------------------------------


def test_wrong_password(db: Db) -> None:
    wrong = f"Wrong-{secrets.token_hex(6)}"
    m = SqlMapping(config(db, password=wrong), 0)
    try:
        for call in (lambda: m.lookup("alice@example.org"), m.check):
            with pytest.raises(MappingError) as exc:
                call()
            text = str(exc.value)
            assert "cannot connect" in text
            assert "Access denied" in text
            assert m.name in text
            assert wrong not in text
            assert db.password not in text
    finally:
        m.close()


def test_password_file(db: Db, tmp_path: Path) -> None:
    secret = tmp_path / "db.secret"
    secret.write_text(db.password + "\n", encoding="utf-8")
    m = SqlMapping(config(db, password="", password_file=secret), 0)
    try:
        assert m.lookup("alice@example.org") == Route("mx1.example.net")
    finally:
        m.close()


def test_unreadable_password_file(db: Db, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.secret"
    m = SqlMapping(config(db, password="", password_file=missing), 0)
    try:
        with pytest.raises(MappingError, match="password_file") as exc:
            m.lookup("alice@example.org")
        assert str(missing) in str(exc.value)
    finally:
        m.close()


def test_unknown_table(db: Db) -> None:
    m = SqlMapping(config(db, query="SELECT server FROM no_such_table WHERE pattern = ?"), 0)
    try:
        for call in (lambda: m.lookup("alice@example.org"), m.check):
            with pytest.raises(MappingError) as exc:
                call()
            text = str(exc.value)
            assert "no_such_table" in text
            assert "doesn't exist" in text
            assert m.name in text
            assert db.password not in text
    finally:
        m.close()


def test_missing_server_column(db: Db) -> None:
    m = SqlMapping(config(db, query="SELECT server AS host, tls_verify FROM routes WHERE pattern = ?"), 0)
    try:
        # Reported even when the key has no row, so `check` catches it.
        for call in (lambda: m.lookup("alice@example.org"), lambda: m.lookup("nobody@x"), m.check):
            with pytest.raises(MappingError, match="no 'server' column") as exc:
                call()
            assert "host, tls_verify" in str(exc.value)
            assert db.password not in str(exc.value)
    finally:
        m.close()


def test_unknown_database(db: Db) -> None:
    m = SqlMapping(config(db, database=f"{db.name}_missing"), 0)
    try:
        with pytest.raises(MappingError, match="cannot connect"):
            m.check()
    finally:
        m.close()


def test_server_not_listening() -> None:
    cfg = SqlMappingConfig(query=QUERY, database="x", user="x", host="127.0.0.1", port=1, connect_timeout=2.0)
    m = SqlMapping(cfg, 0)
    started = time.monotonic()
    try:
        with pytest.raises(MappingError, match="cannot connect"):
            m.lookup("alice@example.org")
    finally:
        m.close()
    assert time.monotonic() - started < 2.5


def test_slow_query_times_out_and_connection_is_replaced(db: Db) -> None:
    query = (
        "SELECT server, tls_verify, SLEEP(IF(pattern = 'slow@example.org', 5, 0)) AS slept"
        " FROM routes WHERE pattern = ?"
    )
    m = SqlMapping(config(db, query=query, read_timeout=1.0, pool_size=1), 0)
    try:
        assert m.lookup("alice@example.org") is not None
        started = time.monotonic()
        with pytest.raises(MappingError, match="timed out") as exc:
            m.lookup("slow@example.org")
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 2.0
        assert "slow@example.org" in str(exc.value)
        # The server gave up too (max_statement_time): no abandoned SLEEP lingers.
        deadline = time.monotonic() + 1.5
        while sleeping_queries(db.user) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeping_queries(db.user) == 0
        # The timed-out connection was discarded; the only slot works again.
        assert m.lookup("alice@example.org") == Route("mx1.example.net")
    finally:
        m.close()


def test_waiting_for_a_connection_is_bounded(db: Db) -> None:
    m = SqlMapping(config(db, connect_timeout=0.5, read_timeout=1.0, pool_size=1), 0)
    held = m._slots.acquire(timeout=1)  # a stuck lookup holding the only connection
    assert held
    started = time.monotonic()
    try:
        with pytest.raises(MappingError, match="no free database connection"):
            m.lookup("alice@example.org")
    finally:
        m._slots.release()
        m.close()
    assert 1.3 < time.monotonic() - started < 2.5


def test_closed_mapping_refuses(db: Db) -> None:
    m = SqlMapping(config(db), 0)
    before = set(sessions_of(db.user))  # earlier tests may leave sessions closing
    assert m.lookup("alice@example.org") is not None
    assert set(sessions_of(db.user)) - before
    m.close()
    deadline = time.monotonic() + 2
    while set(sessions_of(db.user)) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(sessions_of(db.user)) - before
    with pytest.raises(MappingError, match="closed"):
        m.lookup("alice@example.org")


# -- concurrency and recovery ------------------------------------------------


def test_many_threads_get_correct_answers(db: Db) -> None:
    m = SqlMapping(config(db, pool_size=8), 0)
    expected = {f"user{i}@bulk.example": Route(f"mx{i}.bulk.example", 2500 + i) for i in range(50)}
    keys = [f"user{i % 50}@bulk.example" if i % 4 else f"miss{i}@bulk.example" for i in range(200)]
    results: dict[int, Route | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(keys))
    peak = [0]
    before = set(sessions_of(db.user))  # sessions of earlier tests still closing

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for _ in range(3):
                results[n] = m.lookup(keys[n])
        except Exception as err:  # collected and asserted below
            errors.append(err)

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(set(sessions_of(db.user)) - before))
            time.sleep(0.01)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(keys))]
    watcher.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        watcher.join()
        m.close()
    assert errors == []
    assert len(results) == len(keys)
    for n, key in enumerate(keys):
        assert results[n] == expected.get(key), key
    assert 1 <= peak[0] <= 8


def test_reconnects_after_the_server_killed_its_connections(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="willi.mappings.mysql")
    m = SqlMapping(config(db, pool_size=3), 0)
    try:
        # Fill the pool with three idle connections.
        barrier = threading.Barrier(3)

        def fill() -> None:
            barrier.wait()
            m.lookup("alice@example.org")

        fillers = [threading.Thread(target=fill) for _ in range(3)]
        for t in fillers:
            t.start()
        for t in fillers:
            t.join()
        assert kill_sessions(db.user) >= 1
        time.sleep(0.2)
        # Every pooled connection is dead now; each lookup still succeeds.
        for _ in range(5):
            assert m.lookup("bob@example.org") == Route("mx2.example.net", 2525, False)
        assert len(sessions_of(db.user)) >= 1
        # The dead pooled connections were found and replaced, not just skipped.
        assert any("pooled connection lost" in r.getMessage() for r in caplog.records)
    finally:
        m.close()


def test_server_unreachable_after_pool_was_used(db: Db) -> None:
    """A retry never loops: if reconnecting fails too, the lookup fails once."""
    m = SqlMapping(config(db), 0)
    try:
        assert m.lookup("alice@example.org") is not None
        admin = admin_connect()
        try:
            admin.cmd_query(f"ALTER USER '{db.user}'@'%' ACCOUNT LOCK")
            kill_sessions(db.user)
            time.sleep(0.2)
            with pytest.raises(MappingError, match="cannot connect"):
                m.lookup("alice@example.org")
        finally:
            admin.cmd_query(f"ALTER USER '{db.user}'@'%' ACCOUNT UNLOCK")
            admin.close()
        assert m.lookup("alice@example.org") is not None
    finally:
        m.close()


def test_tls_required_but_server_has_none(db: Db) -> None:
    """Asking for TLS never silently falls back to plaintext."""
    admin = admin_connect()
    try:
        cur = admin.cursor()
        cur.execute("SHOW VARIABLES LIKE 'have_ssl'")
        row = cur.fetchone()
    finally:
        admin.close()
    if row is not None and str(row[1]).upper() == "YES":
        pytest.skip("this server offers TLS; the refusal cannot be shown here")
    for verify, reason in ((True, "SSL is required"), (False, "does not offer TLS")):
        m = SqlMapping(config(db, tls=True, tls_verify=verify), 0)
        try:
            with pytest.raises(MappingError, match=f"cannot connect: .*{reason}"):
                m.lookup("alice@example.org")
        finally:
            m.close()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"ssl_disabled": True}),
        (
            {"tls": True},
            {"ssl_disabled": False, "ssl_verify_cert": True, "ssl_verify_identity": True},
        ),
        (
            {"tls": True, "tls_verify": False, "tls_ca": Path("/etc/willi/db-ca.pem")},
            {
                "ssl_disabled": False,
                "ssl_verify_cert": False,
                "ssl_verify_identity": False,
                "ssl_ca": "/etc/willi/db-ca.pem",
            },
        ),
    ],
)
def test_tls_settings_reach_the_connector(changes: dict[str, object], expected: dict[str, object]) -> None:
    cfg = replace(SqlMappingConfig(query=QUERY, database="d", user="u"), **changes)  # type: ignore[arg-type]
    args = SqlMapping(cfg, 0)._connect_args("pw")
    assert {k: v for k, v in args.items() if k.startswith("ssl_")} == expected

"""The `sql` mapping against real MariaDB servers.

Most tests use the machine's MariaDB through the session's own database
and user (see mariadb_harness.py; never root). The TLS tests use two private
servers the session starts: one offering TLS with the test CA's
certificate, one with TLS off. Without a server the tests skip, unless
`CI` is set: there conftest.py turns the skip into a failure.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from certs import TestPKI
from mariadb_harness import TestDatabase
from tcpforward import TcpForwarder

from willi.config import SqlMappingConfig
from willi.mappings.base import MappingError
from willi.mappings.mysql import PROBE_KEY, SqlMapping, convert_placeholder
from willi.route import Route

QUERY = "SELECT server, tls_verify FROM routes WHERE pattern = ?"

#: Answers, on the mapping's own connection, whether that connection is
#: encrypted: `<cipher>.cipher.test`, or `plaintext.cipher.test`.
CIPHER_QUERY = (
    "SELECT CONCAT(IF(VARIABLE_VALUE = '', 'plaintext', REPLACE(LOWER(VARIABLE_VALUE), '_', '-')),"
    " '.cipher.test') AS server FROM information_schema.SESSION_STATUS"
    " WHERE VARIABLE_NAME = 'SSL_CIPHER' AND ? <> ''"
)
PLAINTEXT = "plaintext.cipher.test"

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


def create_routes(db: TestDatabase) -> None:
    """The `routes` table with ROWS, made by the test user in its own database."""
    conn = db.connect()
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS routes")
        cur.execute(
            "CREATE TABLE routes ("
            " pattern VARCHAR(255) NOT NULL PRIMARY KEY,"
            " server VARCHAR(255),"
            " tls_verify VARCHAR(10) NULL)"
        )
        cur.executemany("INSERT INTO routes (pattern, server, tls_verify) VALUES (%s, %s, %s)", ROWS)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def db(system_mariadb: TestDatabase) -> Iterator[TestDatabase]:
    """The machine's MariaDB, with the routes table for this module."""
    create_routes(system_mariadb)
    yield system_mariadb
    system_mariadb.execute("DROP TABLE IF EXISTS routes")


@pytest.fixture(scope="module")
def tls_db(tls_mariadb: TestDatabase) -> TestDatabase:
    """The private server that offers TLS (and, on purpose, accepts plaintext too)."""
    create_routes(tls_mariadb)
    return tls_mariadb


@pytest.fixture(scope="module")
def plain_db(plain_mariadb: TestDatabase) -> TestDatabase:
    """The private server with TLS switched off."""
    create_routes(plain_mariadb)
    return plain_mariadb


def config(db: TestDatabase, **changes: object) -> SqlMappingConfig:
    """The test user's settings, with short timeouts for the tests."""
    base = SqlMappingConfig(
        query=QUERY,
        database=db.name,
        user=db.user,
        password=db.password,
        host=db.host,
        port=db.port,
        connect_timeout=3.0,
        read_timeout=3.0,
        pool_size=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def mapping(db: TestDatabase) -> Iterator[SqlMapping]:
    m = SqlMapping(config(db), 0)
    yield m
    m.close()


class Sessions:
    """One connection of the test user that counts and kills the user's other sessions.

    A user sees and may kill its own sessions without extra rights; one
    long-lived watcher connection keeps its own comings and goings out of
    the counts.
    """

    def __init__(self, db: TestDatabase) -> None:
        self.user = db.user
        self.conn = db.connect()

    def ids(self, condition: str = "TRUE") -> list[int]:
        cur = self.conn.cursor()
        cur.execute(
            "SELECT ID FROM information_schema.PROCESSLIST"
            f" WHERE ID <> CONNECTION_ID() AND USER = %s AND ({condition})",
            (self.user,),
        )
        ids = [int(row[0]) for row in cur.fetchall()]  # type: ignore[arg-type, index]
        cur.close()
        return ids

    def sleeping_queries(self) -> int:
        return len(self.ids("COMMAND = 'Query' AND INFO LIKE '%SLEEP%'"))

    def kill_all(self) -> int:
        """Kill the other sessions, as a restarting server would."""
        ids = self.ids()
        for cid in ids:
            self.conn.cmd_query(f"KILL CONNECTION {cid}")
        return len(ids)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def sessions(db: TestDatabase) -> Iterator[Sessions]:
    watcher = Sessions(db)
    yield watcher
    watcher.close()


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


def test_name_never_contains_password(db: TestDatabase, mapping: SqlMapping) -> None:
    assert mapping.name == f"sql:{db.user}@{db.host}:{db.port}/{db.name}"
    assert db.password not in mapping.name
    assert db.password not in repr(mapping.config)


def test_lookup_hit_and_miss(mapping: SqlMapping) -> None:
    assert mapping.lookup("alice@example.org") == Route.single("mx1.example.net", 25, True)
    assert mapping.lookup("bob@example.org") == Route.single("mx2.example.net", 2525, False)
    assert mapping.lookup("null@example.org") == Route.single("2001:db8::25", 587, True)
    assert mapping.lookup("nobody@example.org") is None
    assert mapping.lookup("ünïcode@exämple.org") == Route.single("mx-utf8.example.net", 25, True)
    # A key full of quoting tricks is a parameter, not SQL.
    assert mapping.lookup("x' OR '1'='1") is None


def test_percent_s_query(db: TestDatabase) -> None:
    m = SqlMapping(config(db, query="SELECT server, tls_verify FROM routes WHERE pattern = %s"), 0)
    try:
        assert m.lookup("bob@example.org") == Route.single("mx2.example.net", 2525, False)
        assert m.lookup("nobody@example.org") is None
    finally:
        m.close()


def test_question_mark_inside_literal_is_not_a_placeholder(db: TestDatabase) -> None:
    query = "SELECT server, 'really?' AS note FROM routes WHERE pattern = ?"
    m = SqlMapping(config(db, query=query), 0)
    try:
        assert m.lookup("alice@example.org") == Route.single("mx1.example.net", 25, True)
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
def test_tls_verify_column_types(db: TestDatabase, column: str, expected: bool) -> None:
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


def test_bad_tls_verify_value_is_a_mapping_error(db: TestDatabase) -> None:
    m = SqlMapping(config(db, query="SELECT server, 'maybe' AS tls_verify FROM routes WHERE pattern = ?"), 0)
    try:
        with pytest.raises(MappingError, match=r"alice@example\.org.*maybe"):
            m.lookup("alice@example.org")
    finally:
        m.close()


def test_null_server_is_a_mapping_error(db: TestDatabase) -> None:
    m = SqlMapping(config(db, query="SELECT NULL AS server FROM routes WHERE pattern = ?"), 0)
    try:
        with pytest.raises(MappingError, match="NULL"):
            m.lookup("alice@example.org")
    finally:
        m.close()


def test_changes_are_seen_by_pooled_connections(db: TestDatabase, mapping: SqlMapping) -> None:
    """Autocommit: a pooled connection must not keep an old snapshot."""
    assert mapping.lookup("new@example.org") is None
    try:
        db.execute("INSERT INTO routes VALUES ('new@example.org', 'fresh.example.net', NULL)")
        assert mapping.lookup("new@example.org") == Route.single("fresh.example.net")
    finally:
        db.execute("DELETE FROM routes WHERE pattern = 'new@example.org'")


def test_check_reports_success(db: TestDatabase, mapping: SqlMapping) -> None:
    summary = mapping.check()
    assert mapping.name in summary
    assert PROBE_KEY in summary
    assert "\n" not in summary
    assert db.password not in summary


def test_set_change_listener_is_accepted(mapping: SqlMapping) -> None:
    mapping.set_change_listener(lambda: None)
    assert mapping.lookup("alice@example.org") is not None


# -- errors -------------------------------------------------------------------


def test_wrong_password(db: TestDatabase) -> None:
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


def test_password_file(db: TestDatabase, tmp_path: Path) -> None:
    secret = tmp_path / "db.secret"
    secret.write_text(db.password + "\n", encoding="utf-8")
    m = SqlMapping(config(db, password="", password_file=secret), 0)
    try:
        assert m.lookup("alice@example.org") == Route.single("mx1.example.net")
    finally:
        m.close()


def test_unreadable_password_file(db: TestDatabase, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.secret"
    m = SqlMapping(config(db, password="", password_file=missing), 0)
    try:
        with pytest.raises(MappingError, match="password_file") as exc:
            m.lookup("alice@example.org")
        assert str(missing) in str(exc.value)
    finally:
        m.close()


def test_unknown_table(db: TestDatabase) -> None:
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


def test_missing_server_column(db: TestDatabase) -> None:
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


def test_unknown_database(db: TestDatabase) -> None:
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


def test_slow_query_times_out_and_connection_is_replaced(db: TestDatabase, sessions: Sessions) -> None:
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
        while sessions.sleeping_queries() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions.sleeping_queries() == 0
        # The timed-out connection was discarded; the only slot works again.
        assert m.lookup("alice@example.org") == Route.single("mx1.example.net")
    finally:
        m.close()


def test_waiting_for_a_connection_is_bounded(db: TestDatabase) -> None:
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


def test_closed_mapping_refuses(db: TestDatabase, sessions: Sessions) -> None:
    m = SqlMapping(config(db), 0)
    before = set(sessions.ids())  # earlier tests may leave sessions closing
    assert m.lookup("alice@example.org") is not None
    assert set(sessions.ids()) - before
    m.close()
    deadline = time.monotonic() + 2
    while set(sessions.ids()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(sessions.ids()) - before
    with pytest.raises(MappingError, match="closed"):
        m.lookup("alice@example.org")


# -- concurrency and recovery ------------------------------------------------


def test_many_threads_get_correct_answers(db: TestDatabase, sessions: Sessions) -> None:
    m = SqlMapping(config(db, pool_size=8), 0)
    expected = {f"user{i}@bulk.example": Route.single(f"mx{i}.bulk.example", 2500 + i) for i in range(50)}
    keys = [f"user{i % 50}@bulk.example" if i % 4 else f"miss{i}@bulk.example" for i in range(200)]
    results: dict[int, Route | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(keys))
    peak = [0]
    before = set(sessions.ids())  # sessions of earlier tests still closing

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for _ in range(3):
                results[n] = m.lookup(keys[n])
        except Exception as err:  # collected and asserted below
            errors.append(err)

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(set(sessions.ids()) - before))
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
    db: TestDatabase, sessions: Sessions, caplog: pytest.LogCaptureFixture
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
        assert sessions.kill_all() >= 1
        time.sleep(0.2)
        # Every pooled connection is dead now; each lookup still succeeds.
        for _ in range(5):
            assert m.lookup("bob@example.org") == Route.single("mx2.example.net", 2525, False)
        assert len(sessions.ids()) >= 1
        # The dead pooled connections were found and replaced, not just skipped.
        assert any("pooled connection lost" in r.getMessage() for r in caplog.records)
    finally:
        m.close()


def test_server_unreachable_after_pool_was_used(db: TestDatabase) -> None:
    """A retry never loops: if reconnecting fails too, the lookup fails once."""
    forwarder = TcpForwarder((db.host, db.port)).start()
    m = SqlMapping(config(db, port=forwarder.port), 0)
    try:
        assert m.lookup("alice@example.org") is not None
        forwarder.stop()  # cuts the pooled connection and refuses the reconnect
        started = time.monotonic()
        with pytest.raises(MappingError, match="cannot connect"):
            m.lookup("alice@example.org")
        assert time.monotonic() - started < 2.5
        forwarder.start()
        assert m.lookup("alice@example.org") is not None
    finally:
        m.close()
        forwarder.stop()


# -- TLS, against private servers -----------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_verified_tls_works_and_really_encrypts(tls_db: TestDatabase, pki: TestPKI, host: str) -> None:
    settings = {"host": host, "tls": True, "tls_ca": pki.ca_file, "tls_verify": True}
    m = SqlMapping(config(tls_db, **settings), 0)
    cipher = SqlMapping(config(tls_db, query=CIPHER_QUERY, **settings), 0)
    try:
        assert m.lookup("alice@example.org") == Route.single("mx1.example.net", 25, True)
        assert m.lookup("nobody@example.org") is None
        assert PROBE_KEY in m.check()
        route = cipher.lookup("alice@example.org")
        assert route is not None
        assert route.endpoint.endswith(".cipher.test:25")
        assert route.endpoint != f"{PLAINTEXT}:25", "the mapping's connection is not encrypted"
    finally:
        m.close()
        cipher.close()


@pytest.mark.parametrize("tls_verify", [True, False])
def test_without_tls_the_same_servers_talk_plaintext(
    tls_db: TestDatabase, plain_db: TestDatabase, tls_verify: bool
) -> None:
    """Both private servers accept plaintext logins.

    So a silent fallback to plaintext would succeed there, and the refusals
    below prove there is none; and CIPHER_QUERY can tell plaintext apart.
    """
    for db in (tls_db, plain_db):
        m = SqlMapping(config(db, query=CIPHER_QUERY, tls=False, tls_verify=tls_verify), 0)
        try:
            assert m.lookup("alice@example.org") == Route.single(PLAINTEXT, 25, True)
        finally:
            m.close()


def test_unverified_tls_still_encrypts(tls_db: TestDatabase, other_pki: TestPKI) -> None:
    """tls_verify = false drops the certificate check, never the encryption."""
    m = SqlMapping(config(tls_db, query=CIPHER_QUERY, tls=True, tls_ca=other_pki.ca_file, tls_verify=False), 0)
    try:
        route = m.lookup("alice@example.org")
        assert route is not None
        assert route.endpoint != f"{PLAINTEXT}:25"
    finally:
        m.close()


@pytest.mark.parametrize("trust", ["other CA", "system CAs"])
def test_untrusted_certificate_is_refused(tls_db: TestDatabase, other_pki: TestPKI, trust: str) -> None:
    """A certificate the configured CAs do not vouch for: no lookup at all, never a plaintext retry."""
    tls_ca = other_pki.ca_file if trust == "other CA" else None
    m = SqlMapping(config(tls_db, tls=True, tls_ca=tls_ca, tls_verify=True), 0)
    try:
        for call in (lambda: m.lookup("alice@example.org"), m.check):
            with pytest.raises(MappingError, match=r"cannot connect: .*certificate verify failed") as exc:
                call()
            assert tls_db.password not in str(exc.value)
    finally:
        m.close()


@pytest.mark.parametrize(
    ("tls_verify", "reason"),
    [
        (True, "SSL is required"),  # the connector refuses before logging in
        (False, "server does not offer TLS"),  # Willi refuses the connector's plaintext fallback
    ],
)
def test_tls_required_but_server_has_none(
    plain_db: TestDatabase, pki: TestPKI, tls_verify: bool, reason: str
) -> None:
    """Asking for TLS never silently falls back to plaintext."""
    m = SqlMapping(config(plain_db, tls=True, tls_ca=pki.ca_file, tls_verify=tls_verify), 0)
    try:
        for call in (lambda: m.lookup("alice@example.org"), m.check):
            with pytest.raises(MappingError, match=f"cannot connect: .*{reason}"):
                call()
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

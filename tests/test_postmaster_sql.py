"""Issue 10 point 9 for the `sql` mapping: a `tls` result column decides the route's TLS level.

Against the session's own database on the machine's MariaDB (mariadb_harness).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mariadb_harness import TestDatabase
from proxy_helpers import transaction, verbs, wait_sessions_closed

from willi.cli import main

pytestmark = pytest.mark.mysql

TABLE = "pm_tls_routes"


@pytest.fixture
def routes(system_mariadb: TestDatabase) -> Iterator[TestDatabase]:
    system_mariadb.execute(
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (pattern VARBINARY(255) PRIMARY KEY, server VARCHAR(255) NOT NULL,"
        " tls_verify VARCHAR(10) NULL, tls VARCHAR(10) NULL)",
    )
    try:
        yield system_mariadb
    finally:
        system_mariadb.execute(f"DROP TABLE IF EXISTS {TABLE}")


def add_route(db: TestDatabase, pattern: str, server: str, tls_verify: str | None, tls: str | None) -> None:
    conn = db.connect()
    try:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {TABLE} (pattern, server, tls_verify, tls) VALUES (%s, %s, %s, %s)",
                    (pattern, server, tls_verify, tls))
        conn.commit()
        cur.close()
    finally:
        conn.close()


def sql_mapping(db: TestDatabase) -> str:
    return (f'[[mappings]]\ntype = "sql"\nhost = "{db.host}"\nport = {db.port}\nuser = "{db.user}"\n'
            f'password = "{db.password}"\ndatabase = "{db.name}"\n'
            f'query = "SELECT pattern, server, tls_verify, tls FROM {TABLE} WHERE pattern = ?"\n'
            'connect_timeout = "2s"\nread_timeout = "2s"\n')


def test_sql_tls_column(routes, willi, fake_upstream, pki) -> None:
    plain = fake_upstream()
    tls_capable = fake_upstream(tls_context=pki.server_context())
    add_route(routes, "example.com", f"localhost:{plain.port}", "false", "encrypt")
    add_route(routes, "example.org", f"localhost:{tls_capable.port}", "true", "none")
    add_route(routes, "example.net", f"localhost:{tls_capable.port}", "false", "verify")
    add_route(routes, "example.edu", f"localhost:{plain.port}", "true", None)
    w = willi(mappings=sql_mapping(routes), extra=f'upstream_tls_ca = "{pki.ca_file}"')
    client = w.raw()
    try:
        client.ehlo()
        replies, _ = transaction(client, "a@sender.example", ["b@example.com"])
        assert replies[1][0] == 451 and replies[1][1][0].startswith("4.7.5"), replies
        for recipient in ("b@example.org", "b@example.net", "b@example.edu"):
            replies, final = transaction(client, "a@sender.example", [recipient])
            assert final is not None and final[0] == 250, (recipient, replies, final)
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(plain)
    wait_sessions_closed(tls_capable)
    assert [s.tls for s in tls_capable.sessions] == [False, True]  # none, then verify
    assert "STARTTLS" not in verbs(tls_capable.sessions[0])
    assert len(plain.completed_transactions) == 1  # only example.edu (absent: tls_verify, plaintext is fine)


def test_sql_tls_column_in_lookup(routes, capsys, tmp_path) -> None:
    add_route(routes, "example.com", "mx.example.net", "false", "encrypt")
    add_route(routes, "example.edu", "mx.example.net", "true", None)
    config = tmp_path / "sql.toml"
    config.write_text(sql_mapping(routes))
    assert main(["-c", str(config), "--lookup", "x@example.com", "x@example.edu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tls=encrypt (from the mapping)" in lines[1], lines
    assert "tls=opportunistic (upstream_starttls=always, certificate verified when used)" in lines[3], lines


def test_sql_bad_tls_value_is_a_lookup_failure(routes, willi, fake_upstream) -> None:
    upstream = fake_upstream()
    add_route(routes, "example.com", f"127.0.0.1:{upstream.port}", "false", "sometimes")
    w = willi(mappings=sql_mapping(routes))
    client = w.raw()
    try:
        client.ehlo()
        replies, _ = transaction(client, "a@sender.example", ["b@example.com"])
        assert replies[1][0] == 451 and replies[1][1][0].startswith("4.3.0"), replies
    finally:
        client.close()
    assert upstream.sessions == []

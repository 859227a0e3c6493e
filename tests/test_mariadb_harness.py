"""The MariaDB harness itself: how it logs in and how it starts private servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from mariadb_harness import GRANTS, PrivateMariaDB, ServerTLS, TestDatabase, admin_candidates


def test_admin_login_prefers_the_socket_and_tcp_root_is_only_a_fallback() -> None:
    socket_login, tcp_login = admin_candidates("/run/mysqld/mysqld.sock", "127.0.0.1", 3306)
    assert socket_login.connect_args == {"unix_socket": "/run/mysqld/mysqld.sock", "user": "root"}
    assert tcp_login.connect_args == {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


@pytest.mark.parametrize("tls", [None, ServerTLS(Path("/c.crt"), Path("/c.key"), Path("/ca.crt"))])
def test_private_server_command(tmp_path: Path, tls: ServerTLS | None) -> None:
    command = PrivateMariaDB(tmp_path, port=40123, tls=tls).server_command()
    assert command[1] == "--no-defaults", "the machine's /etc/mysql must not leak in"
    for option in (f"--datadir={tmp_path / 'data'}", f"--socket={tmp_path / 'mysqld.sock'}",
                   f"--pid-file={tmp_path / 'mysqld.pid'}", "--port=40123", "--bind-address=127.0.0.1"):
        assert option in command
    ssl = [option for option in command if option.startswith("--ssl")]
    if tls is None:
        assert "--skip-ssl" in command and not ssl
    else:
        assert "--skip-ssl" not in command
        assert ssl == [f"--ssl-cert={tmp_path / 'server.crt'}", f"--ssl-key={tmp_path / 'server.key'}",
                       f"--ssl-ca={tmp_path / 'ca.crt'}"]
    assert not any("require-secure-transport" in option for option in command), (
        "plaintext logins must stay possible, or a client's silent fallback could not be seen"
    )


def test_test_user_has_rights_on_its_database_only(system_mariadb: TestDatabase) -> None:
    conn = system_mariadb.connect()
    try:
        cur = conn.cursor()
        cur.execute("SHOW GRANTS")
        grants = [str(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()
    assert system_mariadb.user.startswith("willi_test_") and system_mariadb.name.startswith("willi_test_")
    on_database = [grant for grant in grants if f" ON `{system_mariadb.name}`.* TO " in grant]
    assert [grant.split(" ON ")[0] for grant in on_database] == [f"GRANT {GRANTS}"], grants
    global_rights = [grant.split(" ON ")[0] for grant in grants if grant not in on_database]
    assert global_rights == ["GRANT USAGE"], f"no rights beyond its own database: {grants}"

"""The command line: --check, --lookup, -V, and config errors, as an operator sees them."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mariadb_harness import TestDatabase

from willi import __version__
from willi.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "willi.toml.example"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_version() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "willi.py"), "-V"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"willi {__version__}"


def test_check_example_configuration(capsys) -> None:
    status, out, err = run(capsys, "-c", str(EXAMPLE), "--check")
    assert status == 0, err
    assert "routes.csv.example: 3 entries" in out
    assert "listen 127.0.0.1:2525" in out
    assert out.splitlines()[-1] == "check passed"


def test_check_reports_a_broken_csv_with_its_line(capsys, tmp_path) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text("pattern;server;tls_verify\nexample.com;mail.example.com:99999;true\n")
    config = tmp_path / "willi.toml"
    config.write_text(f'[[mappings]]\ntype = "csv"\nfile = "{csv}"\n')
    status, _, err = run(capsys, "-c", str(config), "--check")
    assert status == 1
    assert f"{csv}:2" in err and "bad port" in err


def test_config_error_names_file_and_key(capsys, tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('max_recipients = "lots"\n[[mappings]]\ntype = "static"\nserver = "x"\n')
    status, _, err = run(capsys, "-c", str(config), "--check")
    assert status == 1
    assert err.strip() == f"willi: config error in {config}: key 'max_recipients': expected a number, got str 'lots'"


def test_missing_config_file(capsys, tmp_path) -> None:
    status, _, err = run(capsys, "-c", str(tmp_path / "nope.toml"), "--check")
    assert status == 1 and "nope.toml" in err and "cannot read file" in err


def test_lookup_shows_keys_mapping_and_cache(capsys) -> None:
    status, out, _ = run(capsys, "-c", str(EXAMPLE), "--lookup", "Bob+news@Example.COM", "carol@example.com")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == ("Bob+news@Example.COM: keys tried in order: bob+news@example.com, bob@example.com, "
                        "example.com, .com")
    assert "key=example.com server=127.0.0.1:2526 tls_verify=false" in lines[1]
    assert "tls=opportunistic (upstream_starttls=always, certificate not verified when used)" in lines[1]
    assert lines[1].endswith("xclient=on cached=no")
    assert "key=example.com" in lines[3] and lines[3].endswith("cached=yes")


def test_lookup_unmapped_exits_1(capsys) -> None:
    status, out, _ = run(capsys, "-c", str(EXAMPLE), "--lookup", "x@nowhere.test")
    assert status == 1 and "554 5.7.1" in out


def test_lookup_failure_exits_2(capsys, tmp_path) -> None:
    config = tmp_path / "willi.toml"
    config.write_text(f'[[mappings]]\ntype = "csv"\nfile = "{tmp_path / "missing.csv"}"\n'
                      '[[mappings]]\ntype = "static"\nserver = "fallback.example"\n')
    status, out, err = run(capsys, "-c", str(config), "--lookup", "a@example.com")
    assert status == 2 and "missing.csv" in err and "fallback" not in out


@pytest.fixture
def database(system_mariadb: TestDatabase) -> Iterator[TestDatabase]:
    """The session's database (user with a password, never root) with a routes and a wrong table."""
    system_mariadb.execute(
        "DROP TABLE IF EXISTS cli_routes, cli_wrong",
        "CREATE TABLE cli_routes (pattern VARCHAR(255) PRIMARY KEY, server VARCHAR(255))",
        "CREATE TABLE cli_wrong (pattern VARCHAR(255) PRIMARY KEY, host VARCHAR(255))",
        "INSERT INTO cli_routes VALUES ('example.com', 'mx.example.com:2525')",
    )
    try:
        yield system_mariadb
    finally:
        system_mariadb.execute("DROP TABLE IF EXISTS cli_routes, cli_wrong")


def sql_config(tmp_path: Path, database: TestDatabase, *, password: str | None = None,
               query: str = "SELECT server FROM cli_routes WHERE pattern = ?") -> Path:
    config = tmp_path / "willi.toml"
    config.write_text(f'[[mappings]]\ntype = "sql"\nhost = "{database.host}"\nport = {database.port}\n'
                      f'user = "{database.user}"\npassword = "{password or database.password}"\n'
                      f'database = "{database.name}"\n'
                      f'query = "{query}"\nconnect_timeout = "2s"\nread_timeout = "2s"\n')
    return config


@pytest.mark.mysql
def test_check_sql_ok_and_lookup_shows_cache(capsys, tmp_path, database) -> None:
    config = sql_config(tmp_path, database)
    status, out, err = run(capsys, "-c", str(config), "--check")
    assert status == 0, err
    assert "query ok" in out and database.password not in out + err
    status, out, _ = run(capsys, "-c", str(config), "--lookup", "a@example.com", "b@Example.com")
    assert status == 0
    assert "key=example.com server=mx.example.com:2525" in out
    assert out.splitlines()[-1].endswith("cached=yes")


@pytest.mark.mysql
@pytest.mark.parametrize(("case", "fragment"), [
    ("wrong password", "Access denied"),
    ("unknown table", "doesn't exist"),
    ("missing server column", "server"),
])
def test_check_sql_errors_are_clear_and_secret_free(capsys, tmp_path, database, case, fragment) -> None:
    wrong_password = f"Wrong-{secrets.token_hex(6)}"
    if case == "wrong password":
        config = sql_config(tmp_path, database, password=wrong_password)
    elif case == "unknown table":
        config = sql_config(tmp_path, database, query="SELECT server FROM no_such_table WHERE pattern = ?")
    else:
        config = sql_config(tmp_path, database, query="SELECT host FROM cli_wrong WHERE pattern = ?")
    status, out, err = run(capsys, "-c", str(config), "--check")
    assert status == 1
    assert fragment in err, err
    assert "mappings[0]" in err
    for secret in (database.password, wrong_password):
        assert secret not in out + err

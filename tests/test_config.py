"""Configuration: units, validation, and error messages that name file and key."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path

import pytest

from willi.config import (
    Config,
    ConfigError,
    CsvMappingConfig,
    ListenAddress,
    SqlMappingConfig,
    StaticMappingConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from willi.mappings.csv import parse_csv
from willi.route import Route

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "willi.toml.example"

STATIC = '\n[[mappings]]\ntype = "static"\nserver = "mx.example.com"\n'
SQL_OK = 'database = "mail"\nuser = "willi"\n'


def config_error(text: str, directory: Path) -> ConfigError:
    path = str(directory / "willi.toml")
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, base=directory)
    error = info.value
    assert error.path == path
    assert str(error).startswith(f"config error in {path}: ")
    return error


# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("500ms", 0.5), ("1.5s", 1.5),
        ("2.5m", 150.0), (" 30 s ", 30.0), ("45", 45.0), (10, 10.0), (2.5, 2.5), ("1ms", 0.001),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "5x", "5 minutes", "-1s", "-1", "0", "0s", "0ms", 0, 0.0, -5, "1.5.2m", "s", "1 h 30 m", "1S",
     True, False, None, [1], {"s": 1}],
)
def test_parse_duration_invalid(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("20MiB", 20 * 1024**2), ("512k", 512 * 1024), ("512KiB", 512 * 1024), ("10MB", 10 * 1024**2),
        ("1G", 1024**3), ("1GiB", 1024**3), ("100", 100), (100, 100), ("100b", 100), ("100B", 100),
        ("1Ki", 1024), ("2 MiB", 2 * 1024**2), ("1kb", 1024),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value",
    ["", "1.5MiB", "-1", "0", 0, -1, "20 parsecs", "1TiB", "MiB", "1 2", True, False, 1.5, None, ["1"]],
)
def test_parse_size_invalid(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "host", "port", "family", "shown"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25, socket.AF_INET, "127.0.0.1:25"),
        ("0.0.0.0:2525", "0.0.0.0", 2525, socket.AF_INET, "0.0.0.0:2525"),
        (":25", "0.0.0.0", 25, socket.AF_INET, "0.0.0.0:25"),
        ("[::1]:25", "::1", 25, socket.AF_INET6, "[::1]:25"),
        ("[::]:2525", "::", 2525, socket.AF_INET6, "[::]:2525"),
        ("[2001:db8::5]:587", "2001:db8::5", 587, socket.AF_INET6, "[2001:db8::5]:587"),
        (" 127.0.0.1:25 ", "127.0.0.1", 25, socket.AF_INET, "127.0.0.1:25"),
        ("localhost:2525", "localhost", 2525, socket.AF_INET, "localhost:2525"),
        ("127.0.0.1:0", "127.0.0.1", 0, socket.AF_INET, "127.0.0.1:0"),
        ("127.0.0.1:65535", "127.0.0.1", 65535, socket.AF_INET, "127.0.0.1:65535"),
    ],
)
def test_parse_listen(value: str, host: str, port: int, family: socket.AddressFamily, shown: str) -> None:
    address = parse_listen(value)
    assert address == ListenAddress(host, port)
    assert address.family == family
    assert str(address) == shown


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", "", "::1:25", "::1", "[::1]", "[::1]:", "[::1]25", "[nothost]:25", "[127.0.0.1]:25",
     "host:port", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:", "[::1]:99999", "127.0.0.1:2 5"],
)
def test_parse_listen_invalid(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


# ---------------------------------------------------------------- errors name file and key

ERRORS = [
    # wrong types
    pytest.param('max_recipients = "100"' + STATIC, "max_recipients", "expected a number", id="str-for-int"),
    pytest.param("max_recipients = true" + STATIC, "max_recipients", "boolean", id="bool-for-int"),
    pytest.param("max_recipients = 0" + STATIC, "max_recipients", "positive", id="zero-int"),
    pytest.param("max_errors = -3" + STATIC, "max_errors", "positive", id="negative-int"),
    pytest.param('smtputf8 = "yes"' + STATIC, "smtputf8", "true or false", id="str-for-bool"),
    pytest.param("xclient = 1" + STATIC, "xclient", "true or false", id="int-for-bool"),
    pytest.param("loglevel = 3" + STATIC, "loglevel", "a string", id="int-for-str"),
    pytest.param('loglevel = "verbose"' + STATIC, "loglevel", "'debug'", id="bad-choice"),
    pytest.param('bare_newline = "fix"' + STATIC, "bare_newline", "'normalize'", id="bad-bare-newline"),
    pytest.param('upstream_starttls = "yes"' + STATIC, "upstream_starttls", "'always'", id="bad-starttls"),
    pytest.param('syslog_facility = "local9"' + STATIC, "syslog_facility", "'mail'", id="bad-facility"),
    pytest.param('domain = "mx example"' + STATIC, "domain", "host name", id="bad-domain"),
    pytest.param("max_command_line = 100" + STATIC, "max_command_line", "512", id="command-line-too-small"),
    pytest.param('recipient_delimiter = "@"' + STATIC, "recipient_delimiter", "delimiter", id="bad-delimiter"),
    pytest.param('pidfile = 5' + STATIC, "pidfile", "a string", id="int-for-path"),
    # unknown keys
    pytest.param("max_recipient = 100" + STATIC, "max_recipient", "unknown key", id="typo"),
    pytest.param("readtimeout = \"5m\"" + STATIC, "readtimeout", "unknown key", id="typo-2"),
    pytest.param("[cache]\nttl = 3" + STATIC, "cache", "unknown key", id="unknown-table"),
    pytest.param(STATIC + "tls_verfy = false\n", "mappings[0].tls_verfy", "unknown key", id="typo-in-mapping"),
    pytest.param(STATIC + STATIC + "sever = \"x\"\n", "mappings[1].sever", "unknown key", id="typo-in-second-mapping"),
    # durations
    pytest.param('read_timeout = "5 minutes"' + STATIC, "read_timeout", "duration", id="bad-duration"),
    pytest.param("read_timeout = 0" + STATIC, "read_timeout", "positive", id="zero-duration"),
    pytest.param('cache_positive_ttl = "-1s"' + STATIC, "cache_positive_ttl", "duration", id="negative-duration"),
    pytest.param("upstream_connect_timeout = true" + STATIC, "upstream_connect_timeout", "boolean",
                 id="bool-duration"),
    pytest.param('shutdown_timeout = "30x"' + STATIC, "shutdown_timeout", "duration", id="bad-unit"),
    # sizes
    pytest.param('max_message_bytes = "20 parsecs"' + STATIC, "max_message_bytes", "size", id="bad-size"),
    pytest.param("max_message_bytes = 0" + STATIC, "max_message_bytes", "positive", id="zero-size"),
    pytest.param("max_message_bytes = 1.5" + STATIC, "max_message_bytes", "size", id="float-size"),
    pytest.param('max_message_bytes = "1.5MiB"' + STATIC, "max_message_bytes", "size", id="fraction-size"),
    # listen
    pytest.param('listen = "localhost"' + STATIC, "listen", "address:port", id="listen-no-port"),
    pytest.param('listen = "::1:25"' + STATIC, "listen", "[address]:port", id="listen-v6-unbracketed"),
    pytest.param('listen = "127.0.0.1:70000"' + STATIC, "listen", "port", id="listen-bad-port"),
    pytest.param('listen = "[::1]25"' + STATIC, "listen", "[address]:port", id="listen-v6-no-colon"),
    pytest.param('listen = ["127.0.0.1:25", "nope"]' + STATIC, "listen[1]", "nope", id="listen-list-item"),
    pytest.param("listen = [25]" + STATIC, "listen[0]", "string", id="listen-int-item"),
    pytest.param("listen = []" + STATIC, "listen", "at least one", id="listen-empty"),
    pytest.param("listen = 25" + STATIC, "listen", "expected", id="listen-int"),
    # mappings
    pytest.param('loglevel = "info"\n', "mappings", "[[mappings]]", id="no-mappings"),
    pytest.param("mappings = []\n", "mappings", "[[mappings]]", id="empty-mappings"),
    pytest.param('[mappings]\ntype = "static"\nserver = "mx"\n', "mappings", "a list", id="single-bracket-table"),
    pytest.param("mappings = [1]\n", "mappings[0]", "table", id="mapping-not-table"),
    pytest.param('[[mappings]]\nserver = "mx"\n', "mappings[0].type", "missing", id="mapping-no-type"),
    pytest.param('[[mappings]]\ntype = "ldap"\n', "mappings[0].type", "'ldap'", id="mapping-unknown-type"),
    pytest.param("[[mappings]]\ntype = 1\n", "mappings[0].type", "string", id="mapping-type-int"),
    pytest.param(STATIC + 'keys = ["domains"]\n', "mappings[0].keys", "'full'", id="keys-unknown-kind"),
    pytest.param(STATIC + "keys = []\n", "mappings[0].keys", "non-empty", id="keys-empty"),
    pytest.param(STATIC + 'keys = ["full", "full"]\n', "mappings[0].keys", "distinct", id="keys-repeated"),
    pytest.param(STATIC + 'keys = "domain"\n', "mappings[0].keys", "a list", id="keys-not-a-list"),
    pytest.param(STATIC + '[[mappings]]\ntype = "nosql"\n', "mappings[1].type", "'nosql'", id="second-mapping"),
    # static
    pytest.param('[[mappings]]\ntype = "static"\n', "mappings[0].server", "missing", id="static-no-server"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = ""\n', "mappings[0].server", "missing",
                 id="static-empty-server"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "mx:99999"\n', "mappings[0].server", "port",
                 id="static-bad-port"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "mx:smtp"\n', "mappings[0].server", "port",
                 id="static-named-port"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "::1"\n', "mappings[0].server", "[addr]",
                 id="static-v6-unbracketed"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "[::1"\n', "mappings[0].server", "unclosed",
                 id="static-unclosed-bracket"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "[mx]:25"\n', "mappings[0].server", "IPv6",
                 id="static-bracketed-name"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "mx host"\n', "mappings[0].server", "host",
                 id="static-space"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = 25\n', "mappings[0].server", "string",
                 id="static-server-int"),
    pytest.param('[[mappings]]\ntype = "static"\nserver = "mx"\ntls_verify = "no"\n', "mappings[0].tls_verify",
                 "true or false", id="static-tls-verify-str"),
    # csv
    pytest.param('[[mappings]]\ntype = "csv"\n', "mappings[0].file", "missing", id="csv-no-file"),
    pytest.param('[[mappings]]\ntype = "csv"\nfile = ""\n', "mappings[0].file", "missing", id="csv-empty-file"),
    pytest.param('[[mappings]]\ntype = "csv"\nfile = "r.csv"\nreload_interval = "often"\n',
                 "mappings[0].reload_interval", "duration", id="csv-bad-interval"),
    pytest.param('[[mappings]]\ntype = "csv"\nfile = "r.csv"\nserver = "mx"\n', "mappings[0].server",
                 "unknown key", id="csv-with-server"),
    # sql
    pytest.param('[[mappings]]\ntype = "sql"\n' + SQL_OK, "mappings[0].query", "missing", id="sql-no-query"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM routes WHERE pattern = ? OR x = ?"\n'
                 + SQL_OK, "mappings[0].query", "found 2", id="sql-two-placeholders"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM routes WHERE pattern = %s AND p = ?"\n'
                 + SQL_OK, "mappings[0].query", "found 2", id="sql-mixed-placeholders"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM routes"\n' + SQL_OK,
                 "mappings[0].query", "found 0", id="sql-no-placeholder"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM routes WHERE note = \'why?\'"\n' + SQL_OK,
                 "mappings[0].query", "found 0", id="sql-question-mark-in-literal"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\nuser = "w"\n',
                 "mappings[0].database", "missing", id="sql-no-database"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\ndatabase = "m"\n',
                 "mappings[0].user", "missing", id="sql-no-user"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + "port = 70000\n", "mappings[0].port", "port", id="sql-bad-port"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + 'password = "x"\npassword_file = "pw"\n', "mappings[0].password_file", "not both",
                 id="sql-two-passwords"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + "pool_size = 0\n", "mappings[0].pool_size", "positive", id="sql-pool-zero"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + 'tls_ca = "missing-ca.pem"\n', "mappings[0].tls_ca", "not found", id="sql-tls-ca-missing"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + 'connect_timeout = "soon"\n', "mappings[0].connect_timeout", "duration", id="sql-bad-timeout"),
    pytest.param('[[mappings]]\ntype = "sql"\nquery = "SELECT server FROM r WHERE p = ?"\n' + SQL_OK
                 + "pasword = \"x\"\n", "mappings[0].pasword", "unknown key", id="sql-typo"),
    # TLS files
    pytest.param('tls_cert = "cert.pem"' + STATIC, "tls_key", "together", id="cert-without-key"),
    pytest.param('tls_key = "key.pem"' + STATIC, "tls_cert", "together", id="key-without-cert"),
    pytest.param('tls_cert = "missing-cert.pem"\ntls_key = "key.pem"' + STATIC, "tls_cert", "not found",
                 id="cert-file-missing"),
    pytest.param('tls_cert = "cert.pem"\ntls_key = "missing-key.pem"' + STATIC, "tls_key", "not found",
                 id="key-file-missing"),
    pytest.param('upstream_tls_ca = "missing-ca.pem"' + STATIC, "upstream_tls_ca", "not found",
                 id="upstream-ca-missing"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), ERRORS)
def test_config_error_names_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    (tmp_path / "cert.pem").write_text("not checked here\n")
    (tmp_path / "key.pem").write_text("not checked here\n")
    error = config_error(text, tmp_path)
    assert error.key == key
    assert f"key '{key}'" in str(error)
    assert fragment in str(error)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('loglevel = "info"\nread_timeout = "5m"\nmax_errors = = 3\n' + STATIC, 3),
        ('loglevel = "info\n' + STATIC, 1),
        ('loglevel = "info"\n\n# comment\nlisten = 127.0.0.1:25\n' + STATIC, 4),
        (STATIC + "server = \"twice\"\n", 5),
    ],
)
def test_config_toml_syntax_error_names_line(tmp_path: Path, text: str, line: int) -> None:
    error = config_error(text, tmp_path)
    assert error.key == ""
    assert "TOML syntax error" in str(error)
    assert f"line {line}" in str(error)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "willi.toml"
    path.write_text("max_recipent = 3\n" + STATIC)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "max_recipent" in str(info.value)


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8\n"])
def test_load_config_unreadable(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "willi.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- valid configurations


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    config = parse_config(STATIC, str(tmp_path / "w.toml"), base=tmp_path)
    assert config.mappings == (StaticMappingConfig(Route.single("mx.example.com", 25, True)),)
    for field in dataclasses.fields(Config):
        if field.name in ("path", "mappings", "domain", "workers"):
            continue
        assert getattr(config, field.name) == field.default, field.name
    assert config.domain == socket.getfqdn()
    assert config.workers == 2 * len(os.sched_getaffinity(0))  # "auto": two per usable CPU


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    (tmp_path / "ca.pem").write_text("x")
    text = """
loglevel = "debug"
listen = ["127.0.0.1:25", "[::1]:25", ":2525"]
domain = "mx.example.com"
read_timeout = "10m"
write_timeout = 60
max_message_bytes = "50MiB"
max_recipients = 500
recipient_delimiter = "+-"
local_part_case_sensitive = true
tls_cert = "cert.pem"
tls_key = "key.pem"
smtputf8 = false
bare_newline = "reject"
upstream_starttls = "client"
upstream_tls_ca = "ca.pem"
upstream_connect_timeout = "500ms"
cache_negative_ttl = "1h"

[[mappings]]
type = "sql"
query = "SELECT server, tls_verify FROM routes WHERE pattern = %s"
database = "mail"
user = "willi"
password = "secret"
tls_ca = "ca.pem"
pool_size = 2

[[mappings]]
type = "csv"
file = "routes.csv"
reload_interval = "1s"
keys = ["domain", "full"]

[[mappings]]
type = "static"
server = "[2001:db8::25]:2525"
tls_verify = false
"""
    config = parse_config(text, "w.toml", base=tmp_path)
    assert config.loglevel == "debug"
    assert config.listen == (ListenAddress("127.0.0.1", 25), ListenAddress("::1", 25), ListenAddress("0.0.0.0", 2525))
    assert config.read_timeout == 600.0 and config.write_timeout == 60.0
    assert config.max_message_bytes == 50 * 1024**2
    assert config.recipient_delimiter == "+-" and config.local_part_case_sensitive is True
    assert config.tls_cert == tmp_path / "cert.pem" and config.tls_key == tmp_path / "key.pem"
    assert config.upstream_tls_ca == tmp_path / "ca.pem"
    assert config.upstream_connect_timeout == 0.5 and config.cache_negative_ttl == 3600.0
    sql, csv, static = config.mappings
    assert isinstance(sql, SqlMappingConfig)
    assert sql.password == "secret" and sql.tls is True and sql.tls_ca == tmp_path / "ca.pem" and sql.pool_size == 2
    assert "secret" not in repr(sql)
    assert csv == CsvMappingConfig(file=tmp_path / "routes.csv", reload_interval=1.0, keys=("full", "domain"))
    assert sql.keys == ("full", "base", "domain", "parent")
    assert static == StaticMappingConfig(Route.single("2001:db8::25", 2525, False))


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(STATIC, "w.toml", base=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_recipients = 5  # type: ignore[misc]


# ---------------------------------------------------------------- willi.toml.example


def test_example_config_parses() -> None:
    config = load_config(EXAMPLE)
    assert config.path == str(EXAMPLE)
    assert len(config.mappings) >= 1
    csv = config.mappings[0]
    assert isinstance(csv, CsvMappingConfig)
    assert csv.file.is_file(), "the example's CSV file ships beside it"
    assert parse_csv(csv.file.read_text(encoding="utf-8"))


def test_example_config_shows_the_defaults() -> None:
    """The example says 'every key is shown with its default value': the active lines must agree."""
    config = load_config(EXAMPLE)
    for field in dataclasses.fields(Config):
        if field.name in ("path", "mappings", "domain", "workers"):
            continue
        assert getattr(config, field.name) == field.default, f"{field.name} in willi.toml.example is not the default"
    assert config.workers == Config.__dataclass_fields__["workers"].default_factory()  # "auto"


def _mentioned(text: str, key: str) -> bool:
    return re.search(rf"(?m)^[#\s]*(?:.*\s)?{re.escape(key)}\s*=", text) is not None


@pytest.mark.parametrize(
    "key",
    [f.name for f in dataclasses.fields(Config)
     if f.name not in ("path", "mappings")
     and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)],
)
def test_example_config_documents_key(key: str) -> None:
    assert _mentioned(EXAMPLE.read_text(encoding="utf-8"), key), f"{key} is not documented in willi.toml.example"


MAPPING_KEYS = sorted(
    {f.name for cls in (SqlMappingConfig, CsvMappingConfig, StaticMappingConfig) for f in dataclasses.fields(cls)}
    - {"route"} | {"server", "tls_verify"}
)


@pytest.mark.parametrize("key", MAPPING_KEYS)
def test_example_config_documents_mapping_key(key: str) -> None:
    assert _mentioned(EXAMPLE.read_text(encoding="utf-8"), key), f"{key} is not documented in willi.toml.example"


def test_example_sql_and_static_blocks_parse_when_uncommented(tmp_path: Path) -> None:
    """The commented-out mapping examples are valid TOML for Willi once uncommented."""
    text = EXAMPLE.read_text(encoding="utf-8")
    blocks = re.findall(r"(?ms)^# \[\[mappings\]\]\n((?:^# [^\n]*\n?)+)", text)
    assert len(blocks) >= 2
    for block in blocks:
        body = "\n".join(line[2:] for line in block.splitlines())
        body = re.sub(r"(?m)^tls_ca = .*$", "", body)  # names a file that need not exist here
        config = parse_config("[[mappings]]\n" + body, "example", base=tmp_path)
        assert config.mappings[0].type in ("sql", "static")

"""TOML configuration -> validated, frozen dataclasses.

Every error names the file, the key and what is wrong, so a postmaster can
fix a typo without reading code. Unknown keys are errors too: a misspelt
limit silently falling back to its default is worse than a refusal.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import toml

from willi.address import KEY_KINDS
from willi.route import Route, RouteSyntaxError, make_route, parse_tls_level
from willi.sqlquery import placeholder_count

LOGLEVELS = ("debug", "info", "warning", "error")
STARTTLS_POLICIES = ("always", "client", "never")
BARE_NEWLINE_POLICIES = ("normalize", "reject")
MAPPING_TYPES = ("static", "csv", "sql")
#: Keys whose values are never shown, whatever their type (design.md, Logging).
SECRET_KEYS = frozenset({"password"})
#: The PROXY header timeout may not be shorter than this (HAProxy's doc/proxy-protocol.txt asks for 3 s).
MIN_PROXY_TIMEOUT = 3.0


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        where = f"key '{key}': " if key else ""
        super().__init__(f"config error in {path}: {where}{problem}")


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StaticMappingConfig:
    route: Route
    keys: tuple[str, ...] = KEY_KINDS
    xclient: str | None = None
    type: str = "static"


@dataclass(frozen=True)
class CsvMappingConfig:
    file: Path
    reload_interval: float = 5.0
    keys: tuple[str, ...] = KEY_KINDS
    xclient: str | None = None
    type: str = "csv"


@dataclass(frozen=True)
class SqlMappingConfig:
    """Connection settings and query of one `type = "sql"` mapping."""

    query: str
    database: str
    user: str
    host: str = "127.0.0.1"
    port: int = 3306
    unix_socket: str = ""
    password: str = field(default="", repr=False)
    password_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_verify: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 5.0
    pool_size: int = 8
    keys: tuple[str, ...] = KEY_KINDS
    xclient: str | None = None
    type: str = "sql"


MappingConfig = Union[StaticMappingConfig, CsvMappingConfig, SqlMappingConfig]


@dataclass(frozen=True)
class Config:
    """Everything Willi needs to run; built only by `load_config`."""

    path: str
    mappings: tuple[MappingConfig, ...]
    loglevel: str = "info"
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2525),)
    domain: str = field(default_factory=socket.getfqdn)
    read_timeout: float = 300.0
    write_timeout: float = 300.0
    max_message_bytes: int = 20 * 1024 * 1024
    max_recipients: int = 100
    recipient_delimiter: str = "+"
    local_part_case_sensitive: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    smtputf8: bool = True
    bare_newline: str = "normalize"
    max_connections: int = 500
    max_connections_per_ip: int = 20
    max_errors: int = 10
    max_command_line: int = 2048
    upstream_starttls: str = "always"
    upstream_tls_ca: Path | None = None
    upstream_connect_timeout: float = 15.0
    upstream_command_timeout: float = 30.0
    upstream_data_timeout: float = 300.0
    upstream_reuse: bool = True
    upstream_idle_timeout: float = 30.0
    upstream_max_transactions: int = 100
    upstream_down_time: float = 30.0
    upstream_address_limit: int = 5
    recipient_timeout: float = 240.0
    xclient: str = "on"
    client_name_lookup: bool = True
    allow_untrusted_routing: bool = False
    stress_read_timeout: float = 10.0
    min_data_rate: int = 500
    max_junk_commands: int = 100
    workers: int = field(default_factory=lambda: auto_workers())  # "auto"
    listen_backlog: int = 4096
    proxy_protocol_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    proxy_protocol_timeout: float = 5.0
    metrics_listen: ListenAddress | None = None
    cache_positive_ttl: float = 300.0
    cache_negative_ttl: float = 60.0
    cache_max_entries: int = 10000
    pidfile: Path = Path("/run/willi/willi.pid")
    user: str = ""
    group: str = ""
    logfile: Path | None = None
    syslog_facility: str = "mail"
    shutdown_timeout: float = 30.0


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")


def parse_duration(value: object) -> float:
    """`"30s"`, `"5m"`, `"1h"`, `"500ms"` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"30s\" or \"5m\", not a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like \"30s\", \"5m\" or \"1h\", not {value!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, not {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """`"20MiB"`, `"512k"`, `"10MB"` or a number of bytes -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like \"20MiB\", not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "b")[0].lower()
        size = int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    else:
        raise ValueError(f"expected a size like \"20MiB\" or \"512KiB\", not {value!r}")
    if size <= 0:
        raise ValueError(f"a size must be positive, not {value!r}")
    return size


def parse_listen(value: str) -> ListenAddress:
    """`host:port`, `[v6]:port`, `:port` (all IPv4) or `[::]:port`."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [address]:port, not {value!r}")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected address:port, not {value!r}")
        host = host or "0.0.0.0"
        if ":" in host:
            raise ValueError(f"write IPv6 addresses as [address]:port, not {value!r}")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return ListenAddress(host, int(port))


class _Reader:
    """Pops typed values out of one TOML table, naming keys in errors."""

    def __init__(self, path: str, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, dict(table), prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.table:
            return default
        value = self.table.pop(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(name, f"expected {_kind_name(kind)}, got {_describe(name, value)}")
        return value

    def convert(self, name: str, parser: Callable[[Any], Any], default: Any) -> Any:
        if name not in self.table:
            return default
        raw = self.table.pop(name)
        try:
            return parser(raw)
        except (ValueError, RouteSyntaxError) as exc:
            raise self.fail(name, str(exc)) from None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(name, str, default)
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value

    def positive_int(self, name: str, default: int) -> int:
        value = self.take(name, int, default)
        if value <= 0:
            raise self.fail(name, f"must be a positive number, not {value}")
        return value

    def filepath(self, name: str, base: Path, default: Path | None = None) -> Path | None:
        value = self.take(name, str, None)
        if value is None:
            return default
        if not value:
            return None
        candidate = Path(value)
        return candidate if candidate.is_absolute() else base / candidate

    def finish(self) -> None:
        if self.table:
            name = sorted(self.table)[0]
            raise self.fail(name, "unknown key (check the spelling against willi.toml.example)")


def _describe(name: str, value: object) -> str:
    """How a wrong value is shown in an error: its type and value, never a secret's value."""
    if name in SECRET_KEYS:
        return f"{type(value).__name__} (the value of a secret is not shown)"
    return f"{type(value).__name__} {value!r}"


def _safe_toml_message(message: str) -> str:
    """The TOML parser's message without the file's text, which may be a password.

    Its messages embed what they found after ": " (`Invalid escape sequence: <4-8
    characters of the string>`, `invalid literal for int() with base 0: '<value>'`),
    in quotes, or as a dump of the table parsed so far (`What? x already exists?{...}`,
    unquoted numbers included); only the part before the first of those is kept.
    """
    return re.split(r": |['\"{\[]", message, maxsplit=1)[0].rstrip() or "invalid TOML"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; raise ConfigError naming file and key."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(shown, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, "", f"not UTF-8 text: {exc}") from None
    return parse_config(text, shown, base=Path(path).resolve().parent)


def parse_config(text: str, path: str = "<string>", base: Path | None = None) -> Config:
    """Validate TOML text; relative file names resolve against `base`."""
    base = base or Path.cwd()
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error at line {exc.lineno}, column {exc.colno}: "
                                    f"{_safe_toml_message(exc.msg)}") from None
    r = _Reader(path, data)
    values: dict[str, Any] = {}
    values["loglevel"] = r.choice("loglevel", LOGLEVELS, "info")
    listen = r.take("listen", (str, list), None)
    if listen is not None:
        items = [listen] if isinstance(listen, str) else listen
        if not items:
            raise r.fail("listen", "needs at least one address")
        parsed = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ConfigError(path, f"listen[{i}]", f"expected a string like \"127.0.0.1:25\", got {item!r}")
            try:
                parsed.append(parse_listen(item))
            except ValueError as exc:
                raise ConfigError(path, f"listen[{i}]" if isinstance(listen, list) else "listen", str(exc)) from None
        values["listen"] = tuple(parsed)
    domain = r.take("domain", str, None)
    if domain is not None:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", domain):
            raise r.fail("domain", f"not a host name: {domain!r}")
        values["domain"] = domain
    for name in ("read_timeout", "write_timeout", "upstream_connect_timeout", "upstream_command_timeout",
                 "upstream_data_timeout", "cache_positive_ttl", "cache_negative_ttl", "shutdown_timeout",
                 "stress_read_timeout", "upstream_idle_timeout", "upstream_down_time", "proxy_protocol_timeout",
                 "recipient_timeout"):
        values[name] = r.convert(name, parse_duration, Config.__dataclass_fields__[name].default)
    if values["proxy_protocol_timeout"] < MIN_PROXY_TIMEOUT:
        raise r.fail("proxy_protocol_timeout", f"must be at least {MIN_PROXY_TIMEOUT:g}s (HAProxy's specification)")
    values["max_message_bytes"] = r.convert("max_message_bytes", parse_size, Config.max_message_bytes)
    for name in ("max_recipients", "max_connections", "max_connections_per_ip", "max_errors", "cache_max_entries",
                 "min_data_rate", "max_junk_commands", "upstream_max_transactions", "upstream_address_limit",
                 "listen_backlog"):
        values[name] = r.positive_int(name, Config.__dataclass_fields__[name].default)
    values["workers"] = _parse_workers(r)
    values["proxy_protocol_hosts"] = _parse_networks(r, "proxy_protocol_hosts")
    metrics = r.take("metrics_listen", str, "")
    if metrics:
        try:
            values["metrics_listen"] = parse_listen(metrics)
        except ValueError as exc:
            raise r.fail("metrics_listen", str(exc)) from None
    values["max_command_line"] = r.positive_int("max_command_line", Config.max_command_line)
    if values["max_command_line"] < 512:
        raise r.fail("max_command_line", "must be at least 512 (RFC 5321 4.5.3.1.4)")
    delimiter = r.take("recipient_delimiter", str, "+")
    if any(c in delimiter for c in "@\"<> \t\\"):
        raise r.fail("recipient_delimiter", f"characters not allowed as delimiters: {delimiter!r}")
    values["recipient_delimiter"] = delimiter
    for name in ("local_part_case_sensitive", "smtputf8", "client_name_lookup", "allow_untrusted_routing",
                 "upstream_reuse"):
        values[name] = r.take(name, bool, Config.__dataclass_fields__[name].default)
    values["xclient"] = _parse_xclient(r) or Config.xclient
    values["tls_cert"] = r.filepath("tls_cert", base)
    values["tls_key"] = r.filepath("tls_key", base)
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        missing = "tls_key" if values["tls_cert"] else "tls_cert"
        raise ConfigError(path, missing, "tls_cert and tls_key must be set together")
    for name in ("tls_cert", "tls_key"):
        if values[name] is not None and not values[name].is_file():
            raise ConfigError(path, name, f"file not found: {values[name]}")
    values["bare_newline"] = r.choice("bare_newline", BARE_NEWLINE_POLICIES, "normalize")
    values["upstream_starttls"] = r.choice("upstream_starttls", STARTTLS_POLICIES, "always")
    values["upstream_tls_ca"] = r.filepath("upstream_tls_ca", base)
    if values["upstream_tls_ca"] is not None and not values["upstream_tls_ca"].is_file():
        raise ConfigError(path, "upstream_tls_ca", f"file not found: {values['upstream_tls_ca']}")
    values["pidfile"] = r.filepath("pidfile", base, Config.pidfile) or Config.pidfile
    values["user"] = r.take("user", str, "")
    values["group"] = r.take("group", str, "")
    values["logfile"] = r.filepath("logfile", base)
    values["syslog_facility"] = r.choice(
        "syslog_facility", ("mail", "daemon", "user", *(f"local{i}" for i in range(8))), "mail"
    )
    raw_mappings = r.take("mappings", list, None)
    if not raw_mappings:
        raise r.fail("mappings", "at least one [[mappings]] table is needed, or no recipient can be routed")
    values["mappings"] = tuple(_parse_mapping(path, i, m, base) for i, m in enumerate(raw_mappings))
    r.finish()
    return Config(path=path, **values)


def _parse_mapping(path: str, index: int, table: object, base: Path) -> MappingConfig:
    prefix = f"mappings[{index}]."
    if not isinstance(table, dict):
        raise ConfigError(path, f"mappings[{index}]", "expected a [[mappings]] table")
    r = _Reader(path, table, prefix)
    kind = r.take("type", str, None)
    if kind is None:
        raise r.fail("type", f"missing; one of {', '.join(MAPPING_TYPES)}")
    if kind not in MAPPING_TYPES:
        raise r.fail("type", f"must be one of {', '.join(repr(t) for t in MAPPING_TYPES)}, not {kind!r}")
    keys = _parse_keys(r)
    xclient = _parse_xclient(r)
    result: MappingConfig
    if kind == "static":
        server = r.take("server", str, None)
        if not server:
            raise r.fail("server", "missing; a static mapping needs server = \"host[:port]\"")
        tls_verify = r.take("tls_verify", bool, True)
        tls = r.take("tls", str, None)
        try:
            parse_tls_level(tls)
        except RouteSyntaxError as exc:
            raise r.fail("tls", str(exc)) from None
        try:
            result = StaticMappingConfig(route=make_route(server, tls_verify, tls, xclient))
        except RouteSyntaxError as exc:
            raise r.fail("server", str(exc)) from None
    elif kind == "csv":
        file = r.filepath("file", base)
        if file is None:
            raise r.fail("file", "missing; a csv mapping needs file = \"routes.csv\"")
        interval = r.convert("reload_interval", parse_duration, CsvMappingConfig.reload_interval)
        result = CsvMappingConfig(file=file, reload_interval=interval)
    else:
        result = _parse_sql(r, base)
    r.finish()
    return dataclasses.replace(result, keys=keys, xclient=xclient)


def _parse_xclient(r: _Reader) -> str | None:
    """`xclient = true | false | "required"` -> "on" | "off" | "required"; None when absent."""
    value = r.take("xclient", (bool, str), None)
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if value != "required":
        raise r.fail("xclient", f"must be true, false or \"required\", not {value!r}")
    return value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: taskset, a cgroup cpuset): what workers = "auto" means."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Worker processes per usable CPU for workers = "auto". Not one: the threads of one Python process queue
#: for its GIL, and on the 2-core test machine bench/throughput.py measured 10 concurrent clients at 0.21 of
#: direct with 2 workers and 0.26-0.27 with 3, 4 or 6 (README, Process model).
WORKERS_PER_CPU = 2


def auto_workers() -> int:
    """What workers = "auto" means: WORKERS_PER_CPU per CPU this process may run on."""
    return WORKERS_PER_CPU * usable_cpus()


def _parse_workers(r: _Reader) -> int:
    """`workers = N` or "auto" (two per CPU this process may run on)."""
    value = r.take("workers", (int, str), "auto")
    if value == "auto":
        return auto_workers()
    if isinstance(value, str) or value <= 0:
        raise r.fail("workers", f"must be a positive number or \"auto\", not {value!r}")
    return value


def _parse_networks(r: _Reader, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses and CIDR networks, IPv4 or IPv6: `["10.0.0.0/8", "127.0.0.1", "::1"]`."""
    items = r.take(name, list, [])
    networks = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(r.path, f"{r.key(name)}[{i}]", f"expected an address or network, got {item!r}")
        try:
            networks.append(ipaddress.ip_network(item.strip().strip("[]"), strict=False))
        except ValueError as exc:
            raise ConfigError(r.path, f"{r.key(name)}[{i}]", str(exc)) from None
    return tuple(networks)


def domain_warning(config: Config) -> str | None:
    """A warning when Willi would greet and EHLO as a name that is not a dotted host name."""
    if "." in config.domain.strip(".") and not config.domain.startswith("localhost"):
        return None
    return (f"the effective domain is {config.domain!r}, not a fully qualified name: Willi greets clients and "
            f"says EHLO to upstreams with it, and both distrust such names; set domain = \"mx.example.com\" "
            f"in {config.path}")


def _parse_keys(r: _Reader) -> tuple[str, ...]:
    """Which lookup keys a mapping is asked, in the fixed order full, base, domain."""
    keys = r.take("keys", list, None)
    if keys is None:
        return KEY_KINDS
    if not keys or any(k not in KEY_KINDS for k in keys) or len(set(keys)) != len(keys):
        raise r.fail("keys", f"must be a non-empty list of distinct values from {list(KEY_KINDS)}, not {keys!r}")
    return tuple(k for k in KEY_KINDS if k in keys)


def _parse_sql(r: _Reader, base: Path) -> SqlMappingConfig:
    query = r.take("query", str, None)
    if not query:
        raise r.fail("query", "missing; e.g. \"SELECT server, tls_verify FROM routes WHERE pattern = ?\"")
    placeholders = placeholder_count(query)
    if placeholders != 1:
        raise r.fail("query", f"needs exactly one placeholder (? or %s) for the lookup key, found {placeholders}")
    database = r.take("database", str, None)
    if not database:
        raise r.fail("database", "missing")
    user = r.take("user", str, None)
    if not user:
        raise r.fail("user", "missing")
    password = r.take("password", str, "")
    password_file = r.filepath("password_file", base)
    if password and password_file:
        raise r.fail("password_file", "set either password or password_file, not both")
    port = r.take("port", int, 3306)
    if not 0 < port < 65536:
        raise r.fail("port", f"not a TCP port: {port}")
    tls_ca = r.filepath("tls_ca", base)
    if tls_ca is not None and not tls_ca.is_file():
        raise r.fail("tls_ca", f"file not found: {tls_ca}")
    return SqlMappingConfig(
        query=query,
        database=database,
        user=user,
        host=r.take("host", str, "127.0.0.1"),
        port=port,
        unix_socket=r.take("unix_socket", str, ""),
        password=password,
        password_file=password_file,
        tls=r.take("tls", bool, False) or tls_ca is not None,
        tls_ca=tls_ca,
        tls_verify=r.take("tls_verify", bool, True),
        connect_timeout=r.convert("connect_timeout", parse_duration, SqlMappingConfig.connect_timeout),
        read_timeout=r.convert("read_timeout", parse_duration, SqlMappingConfig.read_timeout),
        pool_size=r.positive_int("pool_size", SqlMappingConfig.pool_size),
    )

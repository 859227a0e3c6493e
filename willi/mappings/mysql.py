"""The `type = "sql"` mapping: ask a MySQL/MariaDB query which upstream serves a key.

Pool: a bounded pool written here rather than `mysql.connector.pooling`,
because that pool fails at once with "pool exhausted" instead of waiting
(Willi's client threads outnumber connections, so they must queue, but only
for a bounded time), caps `pool_size` at 32 and resets the session on every
return (an extra round trip per lookup). Here a semaphore with `pool_size`
slots bounds the connections; a thread holding a slot takes an idle
connection or opens a new one (lazily), uses it alone, and gives it back.
Waiting for a slot is bounded by `connect_timeout + read_timeout`, the
longest one healthy lookup holds its slot.

Timeouts: `connect_timeout` bounds each socket operation while connecting
and authenticating; `read_timeout` (the connector wants whole seconds, so
it is rounded up) bounds waiting for each answer and each write. The
pure-Python connector (`use_pure=True`) is used because it enforces both.
The server is also told to abort statements after `read_timeout`
(MariaDB `max_statement_time`, MySQL `max_execution_time`): a client that
gave up would otherwise leave the query running, and a slow database would
pile up abandoned queries as every lookup reconnects.

Broken connections (timeouts, lost connections, unexpected errors) are
discarded, never given back. A lost connection on a connection taken from
the pool (the database restarted or killed it while idle) is retried once,
on a freshly opened connection, within the same lookup; nothing is retried
more than once and timeouts are not retried at all.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mysql.connector import errors as dberrors
from mysql.connector.connection import MySQLConnection
from mysql.connector.cursor import MySQLCursor
from mysql.connector.network import MySQLSocket, MySQLTCPSocket

from willi.address import PatternError, pattern_key
from willi.config import SqlMappingConfig
from willi.dns import DNS, DnsError
from willi.mappings.base import MappingError
from willi.route import Route, RouteSyntaxError, make_route
from willi.sqlquery import convert_placeholder

log = logging.getLogger(__name__)

#: The key `check` looks up: valid syntax, never a real recipient (RFC 2606).
PROBE_KEY = "willi-check.invalid"
#: Rows looked at per lookup (a pattern column may rule out the first ones).
MAX_ROWS = 16

# Errors the server reports about the statement itself; the connection
# stays usable after them (unknown table, bad syntax, wrong parameter count).
_STATEMENT_ERRORS = (
    dberrors.ProgrammingError,
    dberrors.DataError,
    dberrors.IntegrityError,
    dberrors.NotSupportedError,
)
# MariaDB max_statement_time / MySQL max_execution_time exceeded.
_SERVER_TIMEOUT_ERRNOS = (1969, 3024)
_TIMEOUT_ERRORS = (
    dberrors.ReadTimeoutError,
    dberrors.WriteTimeoutError,
    dberrors.ConnectionTimeoutError,
)


class _ConnectDeadline:
    """One deadline for the whole connect: name resolution, TCP, the server's handshake, TLS, login.

    The connector's `connection_timeout` bounds each socket operation on its
    own, so a server (or anything in between) that dribbles its handshake a
    byte at a time held one lookup for 53 s against connect_timeout = 2s. A
    timer breaks the socket being opened when the deadline passes; a connect
    that finished first cancels it. (One short-lived thread per connect; the
    pool's slots bound how many run at once.)
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._socket: MySQLSocket | None = None
        self._done = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: MySQLSocket) -> None:
        with self._lock:
            self._socket = sock
            if self.expired:
                self._break()

    def _expire(self) -> None:
        with self._lock:
            if not self._done:
                self.expired = True
                self._break()

    def _break(self) -> None:
        raw = self._socket.sock if self._socket is not None else None
        if raw is not None:
            try:
                socket.socket.shutdown(raw, socket.SHUT_RDWR)  # wakes the reader; for TLS sockets too
            except OSError:
                pass

    def __enter__(self) -> None:
        try:
            self._timer.start()
        except RuntimeError:
            pass  # no thread to spare right now: each socket operation is still bounded

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


class _BoundedTCPSocket(MySQLTCPSocket):
    """The connector's TCP socket, with the host name resolved by Willi's bounded DNS.

    The connector calls getaddrinfo itself, which no timeout bounds (a slow
    resolver took 6 s against a 2 s connect_timeout, again for every
    recipient). Here the name is resolved within what is left of the
    connect's deadline and the connection is made to the address; the name
    stays the server's name for TLS (SNI and host name verification).
    """

    deadline: _ConnectDeadline | None = None

    def open_connection(self) -> None:
        deadline = self.deadline or _ConnectDeadline(self._connection_timeout or 5.0)
        try:
            addresses = DNS.resolve(self.server_host, self.server_port, max(deadline.remaining(), 0.0))
        except DnsError as exc:
            raise dberrors.InterfaceError(errno=2005, msg=f"cannot resolve {self.server_host}: {exc}") from None
        family, sockaddr = next(((f, a) for f, a in addresses if f == socket.AF_INET6), addresses[0]) \
            if self.force_ipv6 else next(((f, a) for f, a in addresses if f == socket.AF_INET), addresses[0])
        self._family = family
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise TimeoutError("no time left")
            sock.settimeout(min(remaining, self._connection_timeout or remaining))
            sock.connect(sockaddr)
        except TimeoutError:
            sock.close()
            raise dberrors.ConnectionTimeoutError(
                errno=2003, msg=f"Can't connect to MySQL server on '{self.server_host}:{self.server_port}' "
                                "(timed out)") from None
        except OSError as exc:
            sock.close()
            raise dberrors.InterfaceError(
                errno=2003, msg=f"Can't connect to MySQL server on '{self.server_host}:{self.server_port}' "
                                f"({exc.strerror or exc})") from None
        self.sock = sock
        deadline.watch(self)


class _BoundedConnection(MySQLConnection):
    """MySQLConnection that opens TCP through `_BoundedTCPSocket`, within one `_ConnectDeadline`."""

    willi_deadline: _ConnectDeadline | None = None

    def _get_connection(self) -> MySQLSocket:
        if self._unix_socket:
            return super()._get_connection()
        conn = _BoundedTCPSocket(host=self.server_host, port=self.server_port, force_ipv6=self._force_ipv6)
        conn.deadline = self.willi_deadline
        conn.set_connection_timeout(self._connection_timeout)
        return conn


def describe(config: SqlMappingConfig) -> str:
    """`sql:user@host:port/database`: names the mapping in logs, never the password."""
    if config.unix_socket:
        where = f"unix:{config.unix_socket}"
    elif ":" in config.host:
        where = f"[{config.host}]:{config.port}"
    else:
        where = f"{config.host}:{config.port}"
    return f"sql:{config.user}@{where}/{config.database}"


@dataclass
class _Session:
    """One connection and its reusable cursor (creating a cursor costs a ping)."""

    conn: MySQLConnection
    cursor: MySQLCursor

    def discard(self) -> None:
        """Drop a connection in an unknown state without waiting on the server."""
        _shutdown(self.conn)

    def close(self) -> None:
        """Say goodbye politely (QUIT), bounded by the write timeout."""
        try:
            self.conn.close()
        except (dberrors.Error, OSError):
            self.discard()


class SqlMapping:
    """A Mapping backed by one SQL query run with the key as its parameter."""

    def __init__(self, config: SqlMappingConfig, index: int, *, case_sensitive_local: bool = False) -> None:
        self.config = config
        self.index = index
        self.case_sensitive_local = case_sensitive_local
        self._warned_inexact = False
        self.name = describe(config)
        self._query = convert_placeholder(config.query)
        self._read_timeout = max(1, math.ceil(config.read_timeout))
        self._slot_wait = config.connect_timeout + config.read_timeout
        self._slots = threading.BoundedSemaphore(config.pool_size)
        self._lock = threading.Lock()
        self._idle: list[_Session] = []
        self._closed = False
        self._server_version = ""
        self._secret = config.password  # last password used, blanked out of messages
        self._listener: Callable[[], None] | None = None

    # -- Mapping protocol -------------------------------------------------

    def lookup(self, key: str) -> Route | None:
        """Run the query for `key`; the first row's `server` is the answer."""
        return self._lookup(key, fresh=False)

    def check(self) -> str:
        """Connect anew and run the query once, so credentials, table and columns are proven."""
        route = self._lookup(PROBE_KEY, fresh=True)
        answer = route.endpoint if route else "no route"
        return (
            f"{self.name}: connected to {self._server_version or 'server'}, "
            f"query ok ({PROBE_KEY} -> {answer})"
        )

    def refresh(self) -> None:
        """SQL data has no change notification; the cache TTLs bound staleness."""

    def set_change_listener(self, listener: Callable[[], None]) -> None:
        """Kept for the protocol: a database sends no change notifications."""
        self._listener = listener

    def close(self) -> None:
        """Close idle connections; busy ones are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

    # -- pool ---------------------------------------------------------------

    def _lookup(self, key: str, fresh: bool) -> Route | None:
        if self._closed:
            raise MappingError(f"{self.name}: mapping is closed")
        if not self._slots.acquire(timeout=self._slot_wait):
            raise MappingError(
                f"{self.name}: no free database connection within {self._slot_wait:g}s "
                f"(pool_size {self.config.pool_size})"
            )
        try:
            columns, rows = self._query_with_retry(key, fresh)
        finally:
            self._slots.release()
        return self._route(key, columns, rows)

    def _query_with_retry(self, key: str, fresh: bool) -> tuple[tuple[str, ...], list[tuple[object, ...]]]:
        """Run the query; retry once on a new connection if a pooled one was dead."""
        session = None if fresh else self._take_idle()
        reused = session is not None
        if session is None:
            session = self._connect()
        try:
            return self._execute(session, key)
        except Exception as err:  # any failure becomes a MappingError, never a crash
            if not (reused and _connection_lost(err)):
                raise self._query_error(key, err) from None
            log.info("%s: pooled connection lost (%s); reconnecting", self.name, _message(err, self._secret))
        session = self._connect()
        try:
            return self._execute(session, key)
        except Exception as err:
            raise self._query_error(key, err) from None

    def _execute(self, session: _Session, key: str) -> tuple[tuple[str, ...], list[tuple[object, ...]]]:
        """Run the query on a session we own; give it back or discard it."""
        try:
            session.cursor.execute(self._query, (key,))
            rows = session.cursor.fetchmany(MAX_ROWS)
            columns = tuple(session.cursor.column_names)
        except _STATEMENT_ERRORS:
            self._give_back(session)
            raise
        except BaseException:
            session.discard()
            raise
        self._give_back(session)
        return columns, rows

    def _take_idle(self) -> _Session | None:
        with self._lock:
            if self._closed:
                raise MappingError(f"{self.name}: mapping is closed")
            # Most recently used first: it is the most likely to be alive.
            return self._idle.pop() if self._idle else None

    def _give_back(self, session: _Session) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(session)
                return
        session.close()

    def _connect(self) -> _Session:
        """Open a connection with the configured timeouts and TLS policy."""
        password = self._secret = self._password()
        conn: MySQLConnection | None = None
        deadline = _ConnectDeadline(self.config.connect_timeout)
        try:
            with deadline:
                conn = _BoundedConnection()
                conn.willi_deadline = deadline
                conn.connect(**self._connect_args(password))
            if self.config.tls and not conn.is_secure:
                # Without certificate verification the connector quietly falls
                # back to plaintext when the server offers no TLS; refuse that.
                _shutdown(conn)
                raise MappingError(
                    f"{self.name}: cannot connect: tls is on but the server does not offer TLS"
                )
            # The connector fetches sql_mode lazily inside the first execute and
            # reports a failure there as a ProgrammingError; fetch it now.
            _ = conn.sql_mode
            self._server_version = _server_version(conn)
            self._limit_statement_time(conn)
            cursor = conn.cursor(buffered=True)
        except MappingError:
            raise
        except dberrors.ConnectionTimeoutError:
            _shutdown(conn)
            raise MappingError(
                f"{self.name}: cannot connect: timed out after {self.config.connect_timeout:g}s"
            ) from None
        except Exception as err:  # driver, ssl and OS errors alike
            _shutdown(conn)
            if deadline.expired:
                raise MappingError(
                    f"{self.name}: cannot connect: timed out after {self.config.connect_timeout:g}s "
                    f"(connect, handshake and login together)") from None
            raise MappingError(f"{self.name}: cannot connect: {_message(err, password)}") from None
        return _Session(conn, cursor)

    def _limit_statement_time(self, conn: MySQLConnection) -> None:
        """Best effort: servers without the variable just lack the server-side limit."""
        seconds = self.config.read_timeout
        if "mariadb" in self._server_version.lower():
            statement = f"SET SESSION max_statement_time = {seconds:.3f}"
        else:
            statement = f"SET SESSION max_execution_time = {math.ceil(seconds * 1000)}"
        try:
            conn.cmd_query(statement)
        except _STATEMENT_ERRORS as err:
            log.debug("%s: no server-side statement timeout: %s", self.name, _message(err, ""))

    def _connect_args(self, password: str) -> dict[str, object]:
        c = self.config
        args: dict[str, object] = {
            "user": c.user,
            "password": password,
            "database": c.database,
            "connection_timeout": c.connect_timeout,
            "read_timeout": self._read_timeout,
            "write_timeout": self._read_timeout,
            "use_pure": True,
            # Without autocommit the first SELECT opens a transaction whose
            # snapshot a pooled connection would keep seeing forever.
            "autocommit": True,
            "charset": "utf8mb4",
        }
        if c.unix_socket:
            args["unix_socket"] = c.unix_socket
        else:
            args["host"], args["port"] = c.host, c.port
        if c.tls:
            args["ssl_disabled"] = False
            args["ssl_verify_cert"] = c.tls_verify
            args["ssl_verify_identity"] = c.tls_verify
            if c.tls_ca is not None:
                args["ssl_ca"] = str(c.tls_ca)
        else:
            args["ssl_disabled"] = True
        return args

    def _password(self) -> str:
        """`password`, or `password_file` read at each connect so rotation needs no restart."""
        if self.config.password_file is None:
            return self.config.password
        try:
            text = self.config.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise MappingError(
                f"{self.name}: cannot read password_file {self.config.password_file}: {reason}"
            ) from None
        return text.rstrip("\r\n")

    # -- results and errors -------------------------------------------------

    def _route(self, key: str, columns: tuple[str, ...], rows: list[tuple[object, ...]]) -> Route | None:
        """Turn the answer into a Route; a missing column is an error even without rows.

        When the query also returns the `pattern` column, a row counts only
        if that pattern, normalized as Willi normalizes keys, is the key
        itself: a case-, accent- or width-insensitive collation
        (utf8mb4_general_ci matches `exämple` with `example`) then cannot
        route a recipient by a row that is not its own.
        """
        lowered = [name.lower() for name in columns]
        if "server" not in lowered:
            raise MappingError(
                f"{self.name}: the query returns no 'server' column "
                f"(it returns: {', '.join(columns) or 'nothing'}); use e.g. SELECT host AS server"
            )
        row = self._matching_row(key, lowered, rows)
        if row is None:
            return None
        server = row[lowered.index("server")]
        tls_verify = row[lowered.index("tls_verify")] if "tls_verify" in lowered else None
        tls = row[lowered.index("tls")] if "tls" in lowered else None
        try:
            if server is None:
                raise RouteSyntaxError("server is NULL")
            if isinstance(server, (bytes, bytearray)):
                server = bytes(server).decode("utf-8")
            return make_route(str(server), tls_verify, tls)
        except (RouteSyntaxError, UnicodeDecodeError) as err:
            raise MappingError(f"{self.name}: bad row for key {key!r}: {err}") from None

    def _matching_row(self, key: str, lowered: list[str], rows: list[tuple[object, ...]]) -> tuple[object, ...] | None:
        if not rows:
            return None
        if "pattern" not in lowered:
            return rows[0]
        where = lowered.index("pattern")
        for row in rows:
            pattern = row[where]
            if isinstance(pattern, (bytes, bytearray)):
                pattern = bytes(pattern).decode("utf-8", "replace")
            try:
                if pattern_key(str(pattern), case_sensitive_local=self.case_sensitive_local) == key:
                    return row
            except PatternError:
                continue
        if not self._warned_inexact:
            self._warned_inexact = True
            log.warning("%s: the database returned pattern %r for key %r, which is not the key: its comparison is "
                        "not exact (collation); the row is ignored. Compare keys exactly, e.g. with a VARBINARY "
                        "pattern column (README, MySQL mappings)", self.name, rows[0][where], key)
        return None

    def _query_error(self, key: str, err: BaseException) -> MappingError:
        if isinstance(err, MappingError):
            return err
        if isinstance(err, dberrors.ReadTimeoutError):
            return MappingError(f"{self.name}: query for key {key!r} timed out after {self._read_timeout}s")
        if isinstance(err, dberrors.DatabaseError) and err.errno in _SERVER_TIMEOUT_ERRNOS:
            return MappingError(
                f"{self.name}: query for key {key!r} timed out after {self.config.read_timeout:g}s "
                "(aborted by the server)"
            )
        if isinstance(err, dberrors.WriteTimeoutError):
            return MappingError(f"{self.name}: sending query for key {key!r} timed out after {self._read_timeout}s")
        return MappingError(
            f"{self.name}: query failed for key {key!r}: {_message(err, self._secret)}"
        )


def _connection_lost(err: BaseException) -> bool:
    """Worth one retry on a new connection: the old one died, the query was not at fault."""
    if isinstance(err, _TIMEOUT_ERRORS):
        return False  # retrying would double the wait the timeout promised
    return isinstance(err, (dberrors.InterfaceError, dberrors.OperationalError))


def _message(err: BaseException, password: str) -> str:
    """One line for the log: the driver's text and errno, with the password blanked."""
    if isinstance(err, dberrors.Error):
        text = err.msg or type(err).__name__
        if err.errno and err.errno > 0:
            text = f"{text} (error {err.errno})"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    if password and password in text:
        text = text.replace(password, "***")
    return text


def _server_version(conn: MySQLConnection) -> str:
    """MariaDB reports `5.5.5-10.11.6-MariaDB` for old clients; keep the real part."""
    info = conn.server_info or ""
    return info.removeprefix("5.5.5-")


def _shutdown(conn: MySQLConnection | None) -> None:
    """Close the socket without a QUIT; the connector promises this never raises."""
    if conn is not None:
        conn.shutdown()

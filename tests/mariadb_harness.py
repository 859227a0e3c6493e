"""MariaDB for the tests, without changing the machine's server.

Two kinds of server:

* The machine's own MariaDB (127.0.0.1:3306). The session logs in as
  MariaDB's root over the unix socket (unix_socket authentication as the OS
  root user), or, only if that is impossible, as root over TCP with an
  empty password; creates a database and a user ``willi_test_<random>``
  (@'127.0.0.1' and @'localhost', random password, rights on that database
  only) and drops both at the end. Tests get only that user and connect
  over TCP; root is never handed to a test.
* Private servers (``private_mariadb``): Debian's ``mariadbd`` run in a
  temporary directory with its own datadir, socket, pid file and error log,
  on a free high port on 127.0.0.1, one offering TLS with a certificate made
  by the test run, one with TLS switched off. They exist so the TLS paths of
  the ``sql`` mapping are tested whatever the machine's server offers.

Override the machine's server with WILLI_TEST_MYSQL_HOST / _PORT (where the
tests connect) and WILLI_TEST_MYSQL_SOCKET (where the harness logs in).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mysql.connector
from mysql.connector.connection import MySQLConnection

SYSTEM_HOST = os.environ.get("WILLI_TEST_MYSQL_HOST", "127.0.0.1")
SYSTEM_PORT = int(os.environ.get("WILLI_TEST_MYSQL_PORT", "3306"))
SYSTEM_SOCKET = os.environ.get("WILLI_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"

#: What the test user may do in its own database: read routes (the mapping),
#: and create, fill and drop the tables the tests set up. Nothing else.
GRANTS = "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP"
#: A TCP login from 127.0.0.1 matches '127.0.0.1', or 'localhost' when the
#: server resolves names; the user exists for both with the same password.
ACCOUNT_HOSTS = ("127.0.0.1", "localhost")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class MariaDBUnavailable(RuntimeError):
    """No server or no way to log in as its administrator; the tests skip (fail in CI)."""


class MariaDBError(RuntimeError):
    """A private server did not install, start or stop; the message carries its log."""


@dataclass(frozen=True)
class AdminLogin:
    """How the harness itself logs in to create and drop; never handed to a test."""

    connect_args: dict[str, object] = field(repr=False)
    description: str

    def connect(self, timeout: float = 5.0) -> MySQLConnection:
        return MySQLConnection(
            **self.connect_args, autocommit=True, use_pure=True, connection_timeout=timeout
        )


@dataclass(frozen=True)
class TestDatabase:
    """A database of its own and the password-protected user that may use only it."""

    __test__ = False  # not a pytest test class, despite the name

    host: str
    port: int
    name: str
    user: str
    password: str = field(repr=False)

    def connect(self, **kwargs: object) -> MySQLConnection:
        """A connection as the test user, over TCP, in its database."""
        args: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.name,
            "autocommit": True,
            "use_pure": True,
            "connection_timeout": 5,
            "ssl_disabled": True,
        }
        args.update(kwargs)
        return MySQLConnection(**args)

    def execute(self, *statements: str) -> None:
        """Run setup statements as the test user."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            for statement in statements:
                cur.execute(statement)
            cur.close()
        finally:
            conn.close()


# -- the machine's server ----------------------------------------------------------


def admin_candidates(socket_path: str, host: str, port: int) -> list[AdminLogin]:
    """Root over the unix socket first; root over TCP without password only as a fallback."""
    return [
        AdminLogin({"unix_socket": socket_path, "user": "root"}, f"root via {socket_path}"),
        AdminLogin({"host": host, "port": port, "user": "root", "password": ""},
                   f"root over TCP {host}:{port} with an empty password"),
    ]


def system_admin() -> AdminLogin:
    """The first administrator login that works on the machine's server."""
    failures = []
    for login in admin_candidates(SYSTEM_SOCKET, SYSTEM_HOST, SYSTEM_PORT):
        try:
            login.connect(timeout=3).close()
        except (mysql.connector.Error, OSError) as err:
            failures.append(f"{login.description}: {err}")
            continue
        return login
    raise MariaDBUnavailable(
        "cannot log in to the MariaDB server as its administrator to create the test database ("
        + "; ".join(failures) + "); ./run-tests.sh as root installs and starts MariaDB"
    )


def new_test_names() -> tuple[str, str, str]:
    """Database, user and password, random so parallel or leftover runs never collide."""
    token = secrets.token_hex(4)
    return f"willi_test_{token}", f"willi_test_{token}", f"Pw-{secrets.token_hex(12)}"


def create_test_database(admin: AdminLogin, db: TestDatabase) -> None:
    """The database, and the user on every account host with rights on it only."""
    conn = admin.connect()
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE DATABASE `{db.name}` CHARACTER SET utf8mb4")
        for account_host in ACCOUNT_HOSTS:
            cur.execute(f"CREATE USER '{db.user}'@'{account_host}' IDENTIFIED BY '{db.password}'")
            cur.execute(f"GRANT {GRANTS} ON `{db.name}`.* TO '{db.user}'@'{account_host}'")
    finally:
        conn.close()


def drop_test_database(admin: AdminLogin, db: TestDatabase) -> None:
    """End the user's leftover sessions (so nothing waits on them), drop user and database."""
    conn = admin.connect()
    try:
        cur = conn.cursor()
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (db.user,))
        for (session_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL CONNECTION {int(session_id)}")  # type: ignore[call-overload]
            except mysql.connector.Error:
                pass  # it ended by itself meanwhile
        cur.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
        for account_host in ACCOUNT_HOSTS:
            cur.execute(f"DROP USER IF EXISTS '{db.user}'@'{account_host}'")
    finally:
        conn.close()


@contextmanager
def test_database(admin: AdminLogin, host: str, port: int) -> Iterator[TestDatabase]:
    """Create the database and user, yield them, drop both even after failures."""
    name, user, password = new_test_names()
    db = TestDatabase(host=host, port=port, name=name, user=user, password=password)
    try:
        create_test_database(admin, db)
        yield db
    finally:
        drop_test_database(admin, db)


test_database.__test__ = False  # type: ignore[attr-defined]  # a context manager, not a test


# -- private servers ---------------------------------------------------------------


def mariadb_unavailable() -> str | None:
    """Say why a private MariaDB cannot run here, or None when it can."""
    for program in (MARIADBD, INSTALL_DB):
        if not Path(program).is_file():
            return f"{program} is not installed (apt-get install mariadb-server)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mysql")
        except KeyError:
            return "the 'mysql' user does not exist (it comes with mariadb-server)"
    return None


def free_port() -> int:
    """An unused TCP port on 127.0.0.1; mariadbd cannot report a port it chose itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """The certificate, key and CA a private server presents."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class PrivateMariaDB:
    """One mariadbd living entirely inside `directory`; the system server is never touched.

    mariadbd refuses to run as root, so as root it runs as the ``mysql``
    user (`--user=mysql`) and everything it reads or writes is chowned to
    it; `directory` must therefore not sit under a 0700 parent (pytest's
    tmp_path does, ``tempfile.mkdtemp()`` does not). The administrator is
    the OS user running the tests, logged in by unix_socket over the
    private socket: no password exists anywhere. TCP listens only on
    127.0.0.1 and, with `tls`, accepts plaintext logins too, so a client
    that silently fell back to plaintext would be noticed, not refused.
    """

    def __init__(self, directory: Path, *, port: int, tls: ServerTLS | None) -> None:
        self.directory = Path(directory).absolute()
        self.port = port
        self.tls = tls
        self.datadir = self.directory / "data"
        self.socket = self.directory / "mysqld.sock"
        self.pid_file = self.directory / "mysqld.pid"
        self.error_log = self.directory / "error.log"
        self.run_as = "mysql" if os.geteuid() == 0 else None
        self.os_user = pwd.getpwuid(os.geteuid()).pw_name  # whom unix_socket sees
        self.admin = AdminLogin(
            {"unix_socket": str(self.socket), "user": self.os_user}, f"{self.os_user} via {self.socket}"
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def common_options(self) -> list[str]:
        """Options for both install and server; --no-defaults keeps /etc/mysql out."""
        options = ["--no-defaults", f"--datadir={self.datadir}", "--innodb-buffer-pool-size=16M",
                   "--innodb-log-file-size=8M"]
        if self.run_as:
            options.append(f"--user={self.run_as}")
        return options

    def server_command(self) -> list[str]:
        command = [MARIADBD, *self.common_options(), f"--socket={self.socket}", f"--pid-file={self.pid_file}",
                   f"--log-error={self.error_log}", f"--port={self.port}", "--bind-address=127.0.0.1",
                   "--skip-name-resolve", "--skip-log-bin", "--max-connections=100"]
        if self.tls is None:
            command.append("--skip-ssl")
        else:
            command += [f"--ssl-cert={self.directory / 'server.crt'}", f"--ssl-key={self.directory / 'server.key'}",
                        f"--ssl-ca={self.directory / 'ca.crt'}"]
        return command

    def _prepare(self) -> None:
        """Copy the TLS files in and hand the directory to the server's user."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            for source, name in ((self.tls.cert_file, "server.crt"), (self.tls.key_file, "server.key"),
                                 (self.tls.ca_file, "ca.crt")):
                shutil.copyfile(source, self.directory / name)
            (self.directory / "server.key").chmod(0o600)
        if self.run_as:
            for path in (self.directory, *self.directory.rglob("*")):
                shutil.chown(path, user=self.run_as, group=self.run_as)

    def _install(self) -> None:
        command = [INSTALL_DB, *self.common_options(), "--auth-root-authentication-method=socket",
                   f"--auth-root-socket-user={self.os_user}", "--skip-test-db", "--skip-name-resolve"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.directory)
        except subprocess.TimeoutExpired as err:
            raise MariaDBError(f"{INSTALL_DB} did not finish within {err.timeout:g}s") from None
        if result.returncode != 0:
            raise MariaDBError(
                f"{' '.join(command)} failed with status {result.returncode}:\n"
                f"{_tail(result.stdout + result.stderr)}"
            )

    def start(self, timeout: float = START_TIMEOUT) -> PrivateMariaDB:
        """Install the datadir, start mariadbd, wait until the administrator can log in."""
        self._prepare()
        self._install()
        with open(self.directory / "mariadbd.out", "wb") as out:
            self._process = subprocess.Popen(
                self.server_command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            status = self._process.poll()
            if status is not None:
                raise MariaDBError(
                    f"mariadbd (pid {self._process.pid}) exited with status {status} before it was ready\n"
                    f"{self.log_tail()}"
                )
            try:
                self.admin.connect(timeout=1).close()
                return self
            except (mysql.connector.Error, OSError) as err:
                last_error = err
            time.sleep(0.1)
        pid = self._process.pid
        self.stop()
        raise MariaDBError(
            f"mariadbd (pid {pid}) on 127.0.0.1:{self.port} was not ready within {timeout:g}s "
            f"({last_error})\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server we started (by its PID), SIGKILL it if it does not finish in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise MariaDBError(f"mariadbd (pid {process.pid}) ignored SIGTERM for {timeout:g}s\n"
                               f"{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the error log and of the server's own output, for error messages."""
        parts = []
        for path in (self.error_log, self.directory / "mariadbd.out"):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {path} ---\n{_tail(text, lines)}")
        return "\n".join(parts) or f"(no log in {self.directory})"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextmanager
def private_mariadb(tls: ServerTLS | None) -> Iterator[PrivateMariaDB]:
    """A started private server in a fresh temporary directory; stopped and removed afterwards."""
    reason = mariadb_unavailable()
    if reason is not None:
        raise MariaDBUnavailable(reason)
    directory = Path(tempfile.mkdtemp(prefix="willi-mariadb-"))
    server = PrivateMariaDB(directory, port=free_port(), tls=tls)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

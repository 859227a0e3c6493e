"""A private, real Postfix instance used as the upstream in interop tests.

Willi's upstream client is only proven against the real thing: a Postfix
that advertises STARTTLS and XCLIENT and writes its own Received: header.
Each ``PostfixInstance`` lives entirely inside one directory (config, queue,
data, maildir, log), listens on 127.0.0.1 on a high port and is started and
stopped by the tests; the system instance in /etc/postfix is never read,
changed or started.

Postfix needs root (the master drops privileges to ``mail_owner``), and the
virtual delivery agent writes the maildir as the ``postfix`` user, so the
directory's parents must be searchable by that user: pytest's ``tmp_path``
(under a 0700 ``/tmp/pytest-of-root``) is not; ``tempfile.mkdtemp()`` is.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

POSTFIX = "/usr/sbin/postfix"
DAEMON_DIRECTORY = Path("/usr/lib/postfix/sbin")
DEFAULT_DOMAINS = ("example.test", "example.com", "example.net")


class PostfixError(RuntimeError):
    """Postfix did not start, stop or deliver; the message carries its log."""


def free_port() -> int:
    """Return a currently unused TCP port on 127.0.0.1.

    Postfix cannot listen on port 0 and report the port back, so the test
    picks one; the small race with other processes is acceptable in tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postfix_unavailable() -> str | None:
    """Say why a private Postfix cannot run here, or None when it can."""
    if not Path(POSTFIX).is_file() or not (DAEMON_DIRECTORY / "master").is_file():
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the 'postfix' user does not exist"
    return None


def require_postfix() -> None:
    """Skip without Postfix, but fail under CI so interop is never lost."""
    reason = postfix_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


class PostfixInstance:
    """One Postfix instance with its own config, queue, data and maildir.

    Mail for ``domains`` is accepted and delivered by virtual(8) into one
    catch-all maildir, which ``delivered()`` reads; ``reject@<domain>`` gets
    550 and ``defer@<domain>`` 450 at RCPT, so tests can watch a real
    upstream refuse. Nothing is ever relayed: other domains are refused and
    every non-virtual transport is ``error:``. ``postfix_sender`` turns an
    instance into a sender instead, which relays everything to its relayhost.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int,
        cert_file: Path,
        key_file: Path,
        xclient_hosts: str = "127.0.0.0/8, [::1]/128",
        domains: tuple[str, ...] = DEFAULT_DOMAINS,
        hostname: str = "postfix.willi.test",
        listen_ipv6: bool = False,
        extra_main_cf: dict[str, str] | None = None,
        extra_master_cf: str = "",
    ) -> None:
        """Only record the settings; nothing touches the disk before start().

        `extra_main_cf` overrides main.cf parameters; `extra_master_cf` adds
        services (a sender needs `smtp`, see `sender_settings`).
        """
        self.directory = Path(directory).absolute()
        self.port = port
        self.cert_file = Path(cert_file).absolute()
        self.key_file = Path(key_file).absolute()
        self.xclient_hosts = xclient_hosts
        self.domains = domains
        self.hostname = hostname
        self.listen_ipv6 = listen_ipv6
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_master_cf = extra_master_cf
        self.config_directory = self.directory / "etc"
        self.queue_directory = self.directory / "queue"
        self.data_directory = self.directory / "data"
        self.mailbox_base = self.directory / "mail"
        self.maildir = self.mailbox_base / "catchall"
        self.maillog = self.directory / "maillog"

    # -- configuration -------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters; everything that matters is explicit.

        Nothing is inherited from /etc/postfix, so the package's debconf
        choice ("No configuration", "Internet Site", ...) does not matter.
        """
        postfix = pwd.getpwnam("postfix")
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_directory),
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-willi-test",
            # Debian logs via syslog, which may not run; postlogd writes this
            # file, and only paths under maillog_file_prefixes are accepted.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": self.hostname,
            "mydomain": "willi.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            # "all" even when listening on IPv4 only: with "ipv4" smtpd
            # refuses XCLIENT ADDR=IPV6:... as "501 5.5.4 Bad ADDR syntax".
            "inet_protocols": "all",
            "mynetworks": "127.0.0.0/8, [::1]/128",
            "smtpd_authorized_xclient_hosts": self.xclient_hosts,
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtpd_error_sleep_time": "0",
            "smtpd_banner": "$myhostname ESMTP willi-test-postfix",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": (f"check_recipient_access regexp:{self.config_directory}/recipient_access"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(self.cert_file),
            "smtpd_tls_key_file": str(self.key_file),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_session_cache_database": "",
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": str(self.mailbox_base),
            "virtual_mailbox_maps": "static:catchall/",
            "virtual_uid_maps": f"static:{postfix.pw_uid}",
            "virtual_gid_maps": f"static:{postfix.pw_gid}",
            "virtual_minimum_uid": str(min(100, postfix.pw_uid)),
            "local_transport": "error:local delivery is disabled in the test instance",
            "default_transport": "error:relaying is disabled in the test instance",
            "relay_transport": "error:relaying is disabled in the test instance",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        params.update(self.extra_main_cf)
        return params

    def master_cf(self) -> str:
        """master.cf without chroot (its jail would lack our paths)."""
        listeners = [f"127.0.0.1:{self.port} inet n - n - - smtpd\n"]
        if self.listen_ipv6:
            listeners.append(f"[::1]:{self.port} inet n - n - - smtpd\n")
        return "".join(listeners) + (
            "cleanup   unix  n - n -     0 cleanup\n"
            "qmgr      unix  n - n 300   1 qmgr\n"
            "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"
            "rewrite   unix  - - n -     - trivial-rewrite\n"
            "bounce    unix  - - n -     0 bounce\n"
            "defer     unix  - - n -     0 bounce\n"
            "trace     unix  - - n -     0 bounce\n"
            "verify    unix  - - n -     1 verify\n"
            "flush     unix  n - n 1000? 0 flush\n"
            "proxymap  unix  - - n -     - proxymap\n"
            "proxywrite unix - - n -     1 proxymap\n"
            "showq     unix  n - n -     - showq\n"
            "error     unix  - - n -     - error\n"
            "retry     unix  - - n -     - error\n"
            "discard   unix  - - n -     - discard\n"
            "virtual   unix  - n n -     - virtual\n"
            "anvil     unix  - - n -     1 anvil\n"
            "scache    unix  - - n -     1 scache\n"
            "postlog   unix-dgram n - n - 1 postlogd\n"
        ) + self.extra_master_cf

    def _write_config(self) -> None:
        """Lay out the instance directory, owned by root as Postfix checks."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        self._check_searchable()
        for path in (self.config_directory, self.queue_directory, self.mailbox_base):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
        # data_directory is created by "post-install create-missing" with the
        # right owner; the maildir belongs to the virtual(8) delivery user.
        postfix = pwd.getpwnam("postfix")
        os.chown(self.mailbox_base, postfix.pw_uid, postfix.pw_gid)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_directory / "main.cf").write_text(main)
        (self.config_directory / "master.cf").write_text(self.master_cf())
        (self.config_directory / "recipient_access").write_text(
            "/^reject@/ 550 5.1.1 Recipient rejected by the test upstream\n"
            "/^defer@/ 450 4.2.1 Recipient deferred by the test upstream\n"
        )
        # Postfix re-reads main.cf in 0.3 s steps until its mtime is a
        # couple of seconds old (a file still being edited); backdating it
        # saves ~1.5 s per start.
        past = time.time() - 60
        for path in self.config_directory.iterdir():
            os.utime(path, (past, past))

    def _check_searchable(self) -> None:
        """Fail early and clearly if the postfix user cannot reach directory."""
        for parent in self.directory.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise PostfixError(
                    f"{parent} is not searchable by other users, so the postfix "
                    f"user cannot deliver under {self.directory}; give a directory "
                    "whose parents are, e.g. tempfile.mkdtemp() (pytest's tmp_path is not)"
                )

    # -- life cycle ------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run the postfix(1) command for this instance only (-c)."""
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 20.0) -> None:
        """Write the config, start the master and wait for a 220 greeting."""
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise PostfixError(
                f"postfix start failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- maillog ---\n{self.log_tail()}"
            )
        try:
            self._wait_for_greeting(timeout)
        except PostfixError:
            self.stop()
            raise

    def _wait_for_greeting(self, timeout: float) -> None:
        """Poll until smtpd answers 220 on every listener, so tests never race the startup."""
        deadline = time.monotonic() + timeout
        for host in ("127.0.0.1", "::1") if self.listen_ipv6 else ("127.0.0.1",):
            self._wait_for_greeting_on(host, deadline)

    def _wait_for_greeting_on(self, host: str, deadline: float) -> None:
        """Poll one listener until its greeting is a 220."""
        last_error = "no attempt"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, self.port), timeout=2) as sock:
                    greeting = sock.recv(512)
                    sock.sendall(b"QUIT\r\n")
                if greeting.startswith(b"220"):
                    return
                last_error = f"unexpected greeting {greeting!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise PostfixError(
            f"Postfix did not greet on [{host}]:{self.port} in time ({last_error})\n--- maillog ---\n{self.log_tail()}"
        )

    def master_pid(self) -> int | None:
        """The master's PID from this instance's pid file, if there is one."""
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        """Whether this instance's master holds its lock (``master -t``)."""
        if self.master_pid() is None:
            return False
        result = subprocess.run(
            [str(DAEMON_DIRECTORY / "master"), "-t", "-c", str(self.config_directory)],
            capture_output=True,
            check=False,
        )
        return result.returncode != 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this instance only, by the PID in its own pid file.

        This is what ``postfix stop`` does (SIGTERM to the master, which
        takes its process group down), but ``postfix stop`` polls once a
        second, and this returns as soon as the processes are gone.
        """
        pid = self.master_pid()
        if pid is None or not self.running():
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.running():
            self._postfix("abort")
            _kill_group(pid, signal.SIGKILL)
            time.sleep(0.1)
            if self.running():
                raise PostfixError(f"Postfix master {pid} did not stop\n{self.log_tail()}")
        # The master is gone; wait (briefly) for smtpd & co. that still hold
        # the listening socket or files in the directory.
        deadline = time.monotonic() + 2.0
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- observation -----------------------------------------------------

    def delivered(self, timeout: float = 20.0, count: int = 1) -> list[bytes]:
        """Wait for ``count`` new deliveries and return them, oldest first.

        Returned messages are moved from ``new/`` to ``cur/``, so the next
        call sees only later mail and one instance can serve several tests.
        Each message is the raw file virtual(8) wrote: Return-Path and
        Delivered-To first, then Postfix's Received: headers.
        """
        new = self.maildir / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.glob("*"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if new.is_dir() else []
            if len(files) >= count:
                break
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{len(files)} of {count} messages delivered within {timeout}s\n--- maillog ---\n{self.log_tail()}"
                )
            time.sleep(0.05)
        messages = []
        cur = self.maildir / "cur"
        for path in files:
            messages.append(path.read_bytes())
            path.rename(cur / f"{path.name}:2,")
        return messages

    def queue(self) -> str:
        """What ``postqueue -p`` lists for this instance (deferred mail with its reason)."""
        result = subprocess.run(["postqueue", "-c", str(self.config_directory), "-p"], capture_output=True,
                                text=True, timeout=30, check=False)
        return result.stdout + result.stderr

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of this instance's maillog, for assertion messages."""
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError as exc:
            return f"(no maillog: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _kill_group(pgid: int, sig: int) -> None:
    """Signal the master's process group (the master is its leader)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group pgid.

    Zombies are ignored: when pytest runs as PID 1 in a container nothing
    reaps them, and they hold no sockets or files.
    """
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


#: The delivery agent a sending instance needs beyond the upstream's services.
SENDER_MASTER_CF = "smtp      unix  - - n -     - smtp\n"


def sender_settings(relayhost: str) -> dict[str, str]:
    """main.cf overrides that make an instance a *sender*: it takes mail from loopback clients over
    SMTP and relays all of it to `relayhost` (Postfix 3.5+: a list, tried in order).

    Retry timing is Postfix's default (queue_run_delay and minimal_backoff_time
    300s), unlike the upstream instance's 1s: what a deferred recipient costs
    is the point of a sender test.
    """
    return {
        "relayhost": relayhost,
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "virtual_mailbox_domains": "",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject",
        "smtp_tls_security_level": "none",
        "queue_run_delay": "300s",
        "minimal_backoff_time": "300s",
        "maximal_backoff_time": "4000s",
    }


@contextmanager
def postfix_sender(cert_file: Path, key_file: Path, relayhost: str, **kwargs: Any) -> Iterator[PostfixInstance]:
    """A started instance that relays everything to `relayhost` (see `sender_settings`)."""
    extra = {**sender_settings(relayhost), **kwargs.pop("extra_main_cf", {})}
    with postfix_upstream(cert_file, key_file, domains=(), hostname="sender.willi.test", extra_main_cf=extra,
                          extra_master_cf=SENDER_MASTER_CF + kwargs.pop("extra_master_cf", ""), **kwargs) as instance:
        yield instance


@contextmanager
def postfix_upstream(cert_file: Path, key_file: Path, **kwargs: Any) -> Iterator[PostfixInstance]:
    """A started instance in a fresh directory, stopped and removed after.

    Skips (fails under CI) when Postfix cannot run here. The directory comes
    from tempfile.mkdtemp(), not pytest's tmp_path, because the postfix user
    must be able to reach the maildir (see the module docstring).
    """
    require_postfix()
    directory = Path(tempfile.mkdtemp(prefix="willi-postfix-"))
    instance = PostfixInstance(directory, port=free_port(), cert_file=cert_file, key_file=key_file, **kwargs)
    try:
        for attempt in range(3):
            try:
                instance.start()
                break
            except PostfixError as exc:
                # free_port() can race with another process; pick again.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                instance.port = free_port()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)

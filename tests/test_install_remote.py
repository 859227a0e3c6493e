"""`make install TARGET_HOST=...`: the release installed on a host over ssh.

The host is this machine: the test runs its own OpenSSH server on
127.0.0.1, on a free port, with a host key and a client key it generates
and its own sshd_config in a temporary directory; it stops that sshd by its
PID. It installs with --prefix under /tmp as a throw-away user, both removed
at teardown. Needs root (sshd, useradd) and Debian's openssh-server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
HOST = "127.0.0.1"
VERSION = (ROOT / "willi" / "__init__.py").read_text().split('__version__ = "')[1].split('"')[0]

pytestmark = pytest.mark.slow


def unavailable(message: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Sshd:
    port: int
    client_key: Path
    log: Path

    @property
    def ssh_opts(self) -> str:
        return (f"-F /dev/null -i {self.client_key} -o IdentitiesOnly=yes -o BatchMode=yes "
                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")


def sshd_config(directory: Path, port: int) -> str:
    return "\n".join([
        f"ListenAddress {HOST}",
        f"Port {port}",
        f"HostKey {directory}/host_key",
        f"PidFile {directory}/sshd.pid",
        f"AuthorizedKeysFile {directory}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "",
    ])


def wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"sshd on port {port} did not answer within {timeout}s: {log.read_text()}")


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    if os.geteuid() != 0:
        unavailable("the remote-install test runs sshd and creates users: it needs root")
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("make")):
        if not tool or not Path(tool).exists():
            unavailable(f"{tool or 'ssh/ssh-keygen/make'} is missing (Debian: apt-get install openssh-server "
                        "openssh-client make)")
    directory = Path(tempfile.mkdtemp(prefix="willi-sshd-", dir="/tmp"))
    created_privsep = not PRIVSEP_DIR.exists()
    proc: subprocess.Popen[bytes] | None = None
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"willi-test-{key}",
                            "-f", str(directory / key)], check=True, capture_output=True, timeout=30)
        shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(sshd_config(directory, port))
        if created_privsep:
            PRIVSEP_DIR.mkdir(mode=0o755)
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        log = directory / "sshd.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=stderr, stderr=stderr)
        wait_for_banner(port, proc, log)
        yield Sshd(port, directory / "client_key", log)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if created_privsep:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def base() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="willi-remote-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    name = f"wri{os.getpid() % 100000}"

    def remove() -> None:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)

    remove()
    yield name
    remove()


def make_install(sshd: Sshd, dist: Path, install_args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    variables = {"TARGET_HOST": HOST, "SSH_PORT": str(sshd.port), "SSH_OPTS": sshd.ssh_opts,
                 "INSTALL_ARGS": install_args, **overrides}
    command = ["make", "-C", str(ROOT), "--no-print-directory", "install", f"DIST={dist}",
               f"PYTHON={sys.executable}", *(f"{key}={value}" for key, value in variables.items())]
    return subprocess.run(command, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL)


def remote_temp_dirs(output: str) -> list[Path]:
    """The temporary directories the remote side says it unpacked into."""
    return [Path(p) for p in re.findall(rf"^{re.escape(HOST)}: install-remote: unpacked \S+ in (\S+)$", output,
                                        re.MULTILINE)]


def test_make_install_installs_on_the_target_host(sshd: Sshd, base: Path, throwaway_user: str) -> None:
    prefix = base / "opt"
    args = f"--prefix {prefix} --no-systemd --user {throwaway_user} --python /usr/bin/python3"

    result = make_install(sshd, base / "dist", args)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output + sshd.log.read_text()
    assert (base / "dist" / f"willi-{VERSION}.tar.gz").is_file()
    # install.sh's own lines, each prefixed with the host
    assert f"{HOST}: install.sh: installing willi {VERSION} into {prefix}" in result.stdout, output
    assert f"{HOST}: install.sh: created system user {throwaway_user}" in result.stdout, output
    assert f"{HOST}: install.sh: {throwaway_user} can run /usr/bin/python3" in result.stdout, output
    assert f"{HOST}: install.sh: Willi {VERSION} is installed but NOT started" in result.stdout, output
    assert f"install-remote: installed willi-{VERSION} on {HOST}" in result.stdout
    # the temporary directory on the host is gone
    temp_dirs = remote_temp_dirs(result.stdout)
    assert len(temp_dirs) == 1, output
    assert f"{HOST}: install-remote: removed {temp_dirs[0]}" in result.stdout
    assert not temp_dirs[0].exists()
    # the installation works
    version = subprocess.run([str(prefix / "bin" / "willi"), "-V"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and VERSION in version.stdout + version.stderr, version
    config = prefix / "etc" / "willi.toml"
    assert config.is_file()
    assert f'pidfile = "{prefix}/run/willi.pid"' in config.read_text()


def test_a_failing_install_sh_fails_make_install_and_cleans_up(sshd: Sshd, base: Path) -> None:
    result = make_install(sshd, base / "dist", "--no-such-option")

    assert result.returncode != 0
    assert f"{HOST}: install.sh: error: unknown option --no-such-option" in result.stdout, result.stdout
    assert f"install-remote: error: install.sh on {HOST} failed (exit 1)" in result.stderr, result.stderr
    temp_dirs = remote_temp_dirs(result.stdout)
    assert len(temp_dirs) == 1 and not temp_dirs[0].exists(), result.stdout


def test_an_unreachable_host_fails_with_the_reason(base: Path) -> None:
    """ssh's own failure (here: nobody listens) is reported; no release build needed for that."""
    if not shutil.which("ssh"):
        unavailable("ssh is missing (Debian: apt-get install openssh-client)")
    dist = base / "dist"
    dist.mkdir()
    (dist / f"willi-{VERSION}.tar.gz").write_bytes(b"never read")
    port = free_port()
    env = {**os.environ, "TARGET_HOST": HOST, "SSH_PORT": str(port),
           "SSH_OPTS": "-F /dev/null -o BatchMode=yes -o ConnectTimeout=5"}
    result = subprocess.run(["sh", str(ROOT / "packaging" / "install-remote.sh"), str(dist)], capture_output=True,
                            text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 255, result.stdout + result.stderr
    assert f"{HOST}: ssh: connect to host {HOST} port {port}: Connection refused" in result.stdout
    assert f"install-remote: error: ssh to root@{HOST} (port {port}) failed" in result.stderr


def test_make_install_without_target_host_says_what_is_missing() -> None:
    if not shutil.which("make"):
        unavailable("make is missing (Debian: apt-get install make)")
    env = {k: v for k, v in os.environ.items() if k != "TARGET_HOST"}
    result = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "install"], capture_output=True,
                            text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "make install: set TARGET_HOST" in result.stderr
    assert "make install TARGET_HOST=" in result.stderr
    assert "release:" not in result.stdout, "nothing is built before the check"

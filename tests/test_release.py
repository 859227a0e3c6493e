"""The release tarball: `make release`, then install.sh without network, then the installed daemon.

Runs as root (install.sh creates a system user). The throw-away user this
test creates is removed at teardown. The installation goes under a
world-traversable directory in /tmp (pytest's tmp_path is private to root),
so that the unprivileged daemon can read its configuration.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Reaper, WilliDaemon, free_port, wait_exit

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def require_root() -> None:
    if os.geteuid() != 0:
        message = "the release test installs system users and needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def world_readable(path: Path) -> bool:
    """Every directory on the way is o+x and the file o+r."""
    path = path.resolve()
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def venv_python() -> tuple[str, bool]:
    """A Python for the installed venv, and whether an unprivileged user can run it.

    pyenv's interpreters live under /root (mode 0700): after dropping root
    the daemon could not import its standard library. Debian's python3 can.
    """
    for candidate in ("/usr/bin/python3", sys.executable):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [candidate, "-c", "import ensurepip, os, sys, venv; print(os.__file__); "
             "sys.exit(sys.version_info < (3, 10))"],
            capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and world_readable(Path(probe.stdout.strip())):
            return candidate, True
    return sys.executable, False


def offline_prefix() -> list[str]:
    """`unshare -n`: run install.sh in a network namespace with no network at all, when possible."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.fixture
def base() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="willi-release-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    require_root()
    name = f"wrt{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, timeout=30)
    yield name
    subprocess.run(["userdel", name], capture_output=True, timeout=30)
    subprocess.run(["groupdel", name], capture_output=True, timeout=30)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.cleanup()


def build_release(dist: Path) -> Path:
    if shutil.which("make"):
        command = ["make", "-C", str(ROOT), "release", f"DIST={dist}", f"PYTHON={sys.executable}"]
    else:  # what `make release` runs
        command = ["env", f"PYTHON={sys.executable}", "sh", str(ROOT / "packaging" / "release.sh"), str(dist)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    version = (ROOT / "willi" / "__init__.py").read_text().split('__version__ = "')[1].split('"')[0]
    tarball = dist / f"willi-{version}.tar.gz"
    assert tarball.is_file(), result.stdout
    return tarball


def install(unpacked: Path, prefix: Path, user: str, python: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(unpacked / "wheels"),
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    command = [*offline_prefix(), "sh", str(unpacked / "install.sh"), "--prefix", str(prefix), "--no-systemd",
               "--user", user, "--python", python]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_release_tarball_installs_offline_and_runs(base: Path, throwaway_user: str, reaper: Reaper,
                                                   fake_upstream) -> None:
    tarball = build_release(base / "dist")
    name = tarball.name.removesuffix(".tar.gz")
    with tarfile.open(tarball) as tar:
        members = set(tar.getnames())
        tar.extractall(base / "unpacked", filter="tar")
    for member in ("install.sh", "willi.toml.example", "routes.csv.example", "packaging/willi.service",
                   "README.md", "VERSION"):
        assert f"{name}/{member}" in members, sorted(members)
    assert {m.split("/")[0] for m in members} == {name}
    wheels = sorted(m.rsplit("/", 1)[1] for m in members if m.endswith(".whl"))
    for dist in ("willi-", "toml-", "mysql_connector_python-", "python_daemon-", "lockfile-"):
        assert any(w.startswith(dist) for w in wheels), wheels
    unpacked = base / "unpacked" / name

    prefix = base / "opt"
    python, can_drop = venv_python()
    first = install(unpacked, prefix, throwaway_user, python)
    assert f"created system user {throwaway_user}" in first.stdout
    assert "NOT started" in first.stdout, first.stdout
    user = pwd.getpwnam(throwaway_user)
    etc = prefix / "etc"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750 and etc.stat().st_gid == user.pw_gid
    for file in ("willi.toml", "routes.csv", "willi.toml.example", "routes.csv.example"):
        st = (etc / file).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, user.pw_gid), file
    config = etc / "willi.toml"
    installed = config.read_text()
    assert f'user = "{throwaway_user}"' in installed
    assert 'pidfile = "/run/willi/willi.pid"' in installed
    assert f'file = "{etc}/routes.csv"' in installed
    willi = prefix / "bin" / "willi"
    assert subprocess.run([str(willi), "-c", str(config), "--check"], capture_output=True,
                          timeout=30).returncode == 0

    # configure it: a test port, pidfile and log under base, a route to the fake upstream
    upstream = fake_upstream()
    port = free_port()
    run_dir, log_dir = base / "run", base / "log"
    log_dir.mkdir()
    text = installed.replace('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace('pidfile = "/run/willi/willi.pid"', f'pidfile = "{run_dir}/willi.pid"')
    text = text.replace('# logfile = "/var/log/willi.log"', f'logfile = "{log_dir}/willi.log"')
    text = text.replace("client_name_lookup = true", "client_name_lookup = false")
    if not can_drop:
        text = text.replace(f'user = "{throwaway_user}"', "").replace(f'group = "{throwaway_user}"', "")
    assert text.count(str(port)) == 1 and str(run_dir) in text and str(log_dir) in text
    config.write_text(text)
    (etc / "routes.csv").write_text(f"pattern;server;tls_verify\nexample.com;127.0.0.1:{upstream.port};false\n")

    d = WilliDaemon([str(willi)], config, run_dir / "willi.pid", log_dir / "willi.log", port, reaper)
    pid = d.start()
    assert d.pidfile.read_text() == f"{pid}\n"
    status = Path(f"/proc/{pid}/status").read_text()
    if can_drop:
        assert f"Uid:\t{user.pw_uid}\t{user.pw_uid}\t{user.pw_uid}\t{user.pw_uid}" in status, status
        assert f"Gid:\t{user.pw_gid}\t{user.pw_gid}\t{user.pw_gid}\t{user.pw_gid}" in status, status
    assert str(prefix / "venvs") in os.readlink(f"/proc/{pid}/exe") or str(prefix) in Path(
        f"/proc/{pid}/cmdline").read_text()
    code, reply = d.send()
    assert code == 250 and b"queued as" in reply
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)
    d.wait_log("result=accepted")
    refused = d.run()
    assert refused.returncode != 0 and str(d.pidfile) in refused.stderr
    d.signal(signal.SIGTERM)
    assert wait_exit(pid) in (0, None)
    assert not d.pidfile.exists()

    # an upgrade (same tarball again) keeps the edited configuration byte for byte
    edited = config.read_bytes()
    venv_before = os.readlink(prefix / "venv")
    second = install(unpacked, prefix, throwaway_user, python)
    assert config.read_bytes() == edited
    assert f"kept {config}" in second.stdout and "kept" in second.stdout
    assert "NOT started" not in second.stdout
    assert "willi --check accepts" in second.stdout, second.stdout
    assert os.readlink(prefix / "venv") != venv_before
    assert (prefix / venv_before).is_dir(), "the previous environment is kept for a rollback"
    assert subprocess.run([str(willi), "-V"], capture_output=True, timeout=30).returncode == 0
    pid = d.start()
    assert d.send()[0] == 250
    assert d.stop() in (0, None)
    assert not d.pidfile.exists()

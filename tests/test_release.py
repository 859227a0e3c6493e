"""The release tarball: `make release`, then install.sh without network, then the installed daemon.

Runs as root (install.sh creates a system user). The throw-away user these
tests create is removed at teardown. The installation goes under a
world-traversable directory in /tmp (pytest's tmp_path is private to root),
so that the unprivileged daemon can read its configuration. Also: install.sh
refuses a Python the service user cannot run, and the systemd unit it writes
(`--print-unit`) follows the prefix and the configured pidfile.
"""

from __future__ import annotations

import os
import pwd
import re
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


def venv_python() -> str:
    """A Python for the installed venv that an unprivileged user can run.

    pyenv's interpreters live under /root (mode 0700): install.sh refuses
    them, since the daemon could not import its standard library after
    dropping root. Debian's python3 is fine.
    """
    for candidate in ("/usr/bin/python3", sys.executable):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [candidate, "-c", "import ensurepip, os, sys, venv; print(os.__file__); "
             "sys.exit(sys.version_info < (3, 11))"],
            capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and world_readable(Path(probe.stdout.strip())) \
                and world_readable(Path(candidate)):
            return candidate
    message = "no Python 3.11 that every user can run (Debian: apt-get install python3 python3-venv)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


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
    remove_user(name)
    yield name
    remove_user(name)


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, timeout=30)
    subprocess.run(["groupdel", name], capture_output=True, timeout=30)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


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


def run_install(unpacked: Path, prefix: Path, user: str, python: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(unpacked / "wheels"),
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    command = [*offline_prefix(), "sh", str(unpacked / "install.sh"), "--prefix", str(prefix), "--no-systemd",
               "--user", user, "--python", python]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def install(unpacked: Path, prefix: Path, user: str, python: str) -> subprocess.CompletedProcess[str]:
    result = run_install(unpacked, prefix, user, python)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def unpack(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="tar")
    return into / tarball.name.removesuffix(".tar.gz")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One release tarball for the tests that only need to unpack it."""
    return build_release(tmp_path_factory.mktemp("dist"))


LOCAL_MAN_LINK = Path("/usr/local/share/man/man8/willi.8")


@pytest.mark.slow
def test_release_tarball_installs_offline_and_runs(release: Path, base: Path, throwaway_user: str,
                                                   reaper: Reaper, fake_upstream) -> None:
    name = release.name.removesuffix(".tar.gz")
    with tarfile.open(release) as tar:
        members = set(tar.getnames())
    for member in ("install.sh", "willi.toml.example", "routes.csv.example", "packaging/willi.service",
                   "packaging/willi.8", "packaging/haproxy.cfg.example", "README.md", "VERSION"):
        assert f"{name}/{member}" in members, sorted(members)
    assert {m.split("/")[0] for m in members} == {name}
    wheels = sorted(m.rsplit("/", 1)[1] for m in members if m.endswith(".whl"))
    for dist in ("willi-", "toml-", "mysql_connector_python-", "python_daemon-", "lockfile-",
                 "prometheus_client-"):
        assert any(w.startswith(dist) for w in wheels), wheels
    assert all(w.endswith("-none-any.whl") for w in wheels), wheels
    unpacked = unpack(release, base / "unpacked")
    version = name.removeprefix("willi-")
    assert f'.TH WILLI 8 "" "Willi {version}"' in (unpacked / "packaging" / "willi.8").read_text()

    prefix = base / "opt"
    python = venv_python()
    man_link_before = os.path.lexists(LOCAL_MAN_LINK)
    first = install(unpacked, prefix, throwaway_user, python)
    assert f"created system user {throwaway_user}" in first.stdout
    assert f"{throwaway_user} can run " in first.stdout, first.stdout
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
    assert f'file = "{etc}/routes.csv"' in installed
    # another prefix, another pidfile: under the prefix, in a directory of the user's
    run_dir = prefix / "run"
    assert f'pidfile = "{run_dir}/willi.pid"' in installed
    st = run_dir.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, user.pw_uid, user.pw_gid)
    assert f"kill -TERM $(cat {run_dir}/willi.pid)" not in first.stdout  # not configured: not started
    # the manual page, and nothing outside the prefix
    page = prefix / "share" / "man" / "man8" / "willi.8"
    assert page.read_bytes() == (unpacked / "packaging" / "willi.8").read_bytes()
    assert stat.S_IMODE(page.stat().st_mode) == 0o644
    assert os.path.lexists(LOCAL_MAN_LINK) == man_link_before
    # the metrics extra came from the tarball
    venv_py = prefix / "venv" / "bin" / "python"
    assert subprocess.run([str(venv_py), "-c", "import prometheus_client"], capture_output=True,
                          timeout=30).returncode == 0
    willi = prefix / "bin" / "willi"
    assert subprocess.run([str(willi), "-c", str(config), "--check"], capture_output=True,
                          timeout=30).returncode == 0

    # configure it: a test port, a log under base, a route to the fake upstream; the pidfile stays
    upstream = fake_upstream()
    port = free_port()
    log_dir = base / "log"
    log_dir.mkdir()
    text = installed.replace('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace('# logfile = "/var/log/willi.log"', f'logfile = "{log_dir}/willi.log"')
    text = text.replace("client_name_lookup = true", "client_name_lookup = false")
    assert text.count(str(port)) == 1 and str(log_dir) in text
    config.write_text(text)
    (etc / "routes.csv").write_text(f"pattern;server;tls_verify\nexample.com;127.0.0.1:{upstream.port};false\n")

    d = WilliDaemon([str(willi)], config, run_dir / "willi.pid", log_dir / "willi.log", port, reaper)
    pid = d.start()
    assert d.pidfile.read_text() == f"{pid}\n"
    status = Path(f"/proc/{pid}/status").read_text()
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
    assert f"kill -TERM $(cat {run_dir}/willi.pid)" in second.stdout, second.stdout
    assert os.readlink(prefix / "venv") != venv_before
    assert (prefix / venv_before).is_dir(), "the previous environment is kept for a rollback"
    assert subprocess.run([str(willi), "-V"], capture_output=True, timeout=30).returncode == 0
    pid = d.start()
    assert d.send()[0] == 250
    assert d.stop() in (0, None)
    assert not d.pidfile.exists()


@pytest.mark.slow
@pytest.mark.parametrize("user_existed", [False, True], ids=["new-user", "existing-user"])
def test_install_refuses_a_python_the_service_user_cannot_run(release: Path, base: Path, throwaway_user: str,
                                                              user_existed: bool) -> None:
    """A Python under a 0700 directory (pyenv under /root) would break only after the start."""
    unpacked = unpack(release, base / "unpacked")
    private = base / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"
    shutil.copy2(venv_python(), python)
    assert subprocess.run([str(python), "-c", "import venv"], capture_output=True, timeout=30).returncode == 0
    if user_existed:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        throwaway_user], check=True, capture_output=True, timeout=30)
    groups_before = Path("/etc/group").read_text()
    passwd_before = Path("/etc/passwd").read_text()
    prefix = base / "opt"

    result = run_install(unpacked, prefix, throwaway_user, str(python))

    assert result.returncode == 1, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("install.sh: error: "), result.stderr
    assert f"the service user {throwaway_user} cannot run {python}" in error
    assert "Permission denied" in error
    assert "--python /usr/bin/python3" in error and "Nothing was changed" in error
    # nothing changed: no prefix, and a user created for this run is gone again
    assert not prefix.exists()
    assert user_exists(throwaway_user) == user_existed
    assert Path("/etc/passwd").read_text() == passwd_before
    assert Path("/etc/group").read_text() == groups_before
    if not user_existed:
        assert f"removed the user {throwaway_user} created above" in result.stdout, result.stdout


def print_unit(unpacked: Path, *args: str) -> str:
    result = subprocess.run(["sh", str(unpacked / "install.sh"), "--print-unit", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize(("prefix", "config_pidfile", "pidfile", "runtime_dir"), [
    ("/opt/willi", None, "/run/willi/willi.pid", True),
    (None, None, "{prefix}/run/willi.pid", False),
    (None, "/run/willi/willi.pid", "/run/willi/willi.pid", True),   # an upgrade keeps the configured one
    (None, "run/other.pid", "{prefix}/etc/run/other.pid", False),    # relative to willi.toml's directory
], ids=["default-prefix", "other-prefix", "kept-config-in-run-willi", "kept-config-relative"])
def test_the_unit_follows_the_prefix_and_the_configured_pidfile(
        base: Path, prefix: str | None, config_pidfile: str | None, pidfile: str, runtime_dir: bool) -> None:
    """What `install.sh --print-unit` shows is what install.sh installs under systemd."""
    unpacked = base / "src"
    (unpacked / "packaging").mkdir(parents=True)
    shutil.copy2(ROOT / "install.sh", unpacked)
    shutil.copy2(ROOT / "packaging" / "willi.service", unpacked / "packaging")
    prefix = prefix or str(base / "opt")
    if config_pidfile is not None:
        (Path(prefix) / "etc").mkdir(parents=True)
        (Path(prefix) / "etc" / "willi.toml").write_text(f'loglevel = "info"\npidfile = "{config_pidfile}"\n')

    unit = unit_settings(print_unit(unpacked, "--prefix", prefix, "--python", sys.executable))

    expected = pidfile.format(prefix=prefix)
    assert unit["PIDFile"] == [expected]
    assert unit["ExecStart"] == [f"{prefix}/bin/willi -c {prefix}/etc/willi.toml"]
    if runtime_dir:
        assert unit["RuntimeDirectory"] == ["willi"] and "ReadWritePaths" not in unit
    else:
        assert "RuntimeDirectory" not in unit and "RuntimeDirectoryMode" not in unit
        assert unit["ReadWritePaths"] == ["-" + expected.rsplit("/", 1)[0]]
    assert "Type" in unit and unit["Type"] == ["forking"]


MAN_PAGE = ROOT / "packaging" / "willi.8"


def roff_text(source: str) -> str:
    """The words of a roff source: escaped hyphens as '-', font changes dropped."""
    text = re.sub(r"\\f(?:\[[A-Z]*\]|[BIRP])", "", source)
    return text.replace("\\-", "-").replace("\\&", "")


def man_section(source: str, name: str) -> str:
    match = re.search(rf'^\.SH "?{name}"?$(.*?)(?=^\.SH )', source, re.MULTILINE | re.DOTALL)
    assert match, f"no section {name}"
    return roff_text(match.group(1))


def long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", help_text))


@pytest.mark.parametrize(("source", "expected"), [
    (r".B \-\-check", ".B --check"),
    (r".BR \-c \fI\-\-config\fR FILE\&", ".BR -c --config FILE"),
    (r"\f[B]\-V\f[]", "-V"),
])
def test_roff_text(source: str, expected: str) -> None:
    assert roff_text(source) == expected


def test_long_options_are_read_from_help() -> None:
    assert long_options("  -c FILE, --config FILE\n  --lookup ADDRESS [ADDRESS ...]\n  a--b -- --dry-run.") == {
        "--config", "--lookup", "--dry-run"}


def test_the_man_page_renders_without_warnings() -> None:
    groff = shutil.which("groff")
    if groff is None:
        message = "groff is missing (Debian: apt-get install groff-base)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([groff, "-man", "-ww", "-z", "-t", str(MAN_PAGE)], capture_output=True, text=True,
                            timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
    rendered = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(MAN_PAGE)], capture_output=True, text=True,
                              timeout=30)
    assert rendered.returncode == 0 and rendered.stderr == ""
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "PROCESS MODEL", "FILES",
                    "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{heading}$", re.sub(r".\x08", "", rendered.stdout), re.MULTILINE), heading


def test_the_man_page_documents_every_option_of_help() -> None:
    help_text = subprocess.run([sys.executable, str(ROOT / "willi.py"), "--help"], capture_output=True, text=True,
                               timeout=30, check=True, cwd=ROOT).stdout
    options = long_options(help_text)
    assert {"--config", "--check", "--lookup", "--version"} <= options, help_text
    source = MAN_PAGE.read_text()
    documented = long_options(man_section(source, "OPTIONS"))
    assert options - documented == set(), "willi --help has options the man page does not document"
    assert {"--probe", "--from"} <= documented
    assert {"--check", "--lookup", "--probe", "--from"} <= long_options(man_section(source, "SYNOPSIS"))
    tags = " ".join(re.findall(r"^\.TP\n(.*)$", man_section(source, "SIGNALS"), re.MULTILINE))
    assert {"TERM", "INT", "HUP", "USR1"} <= set(re.findall(r"\b[A-Z0-9]+\b", tags)), tags

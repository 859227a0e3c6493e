"""Shared fixtures (throw-away PKIs, fake upstreams, MariaDB) and the CI skip policy.

With `CI` set, every skip becomes a failure here, in one place, whatever
raised it: `pytest.skip()` in a test or fixture, a `skip`/`skipif` mark,
`pytest.importorskip`, at run time or at collection. So a test whose
service is missing may skip on a laptop (with its reason) but can never
vanish from a CI run. A skip at collection (e.g. a module-level
`importorskip`) becomes a collection error, which stops the CI run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Union

import mariadb_harness
import pytest
from certs import TestPKI, make_pki
from daemon_helpers import Reaper
from fakeupstream import FakeUpstream
from mariadb_harness import MariaDBUnavailable, ServerTLS, TestDatabase
from support import RunningWilli, willi_config

from willi.config import Config
from willi.server import WilliService


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """The CA that clients trust, with a certificate for the loopback names."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """An unrelated CA nobody trusts, for verification-failure tests."""
    return make_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def fake_upstream() -> Iterator[Callable[..., FakeUpstream]]:
    """Factory: `fake_upstream(**kwargs)` starts a FakeUpstream; all stop at teardown."""
    started: list[FakeUpstream] = []

    def factory(**kwargs: Any) -> FakeUpstream:
        server = FakeUpstream(**kwargs).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def willi(tmp_path: Path) -> Iterator[Callable[..., RunningWilli]]:
    """Factory: `willi(upstream_port=..., mappings=..., extra=...)` starts Willi in-process."""
    started: list[RunningWilli] = []

    def factory(config: Config | None = None, **kwargs: Any) -> RunningWilli:
        cfg = config or willi_config(directory=tmp_path, **kwargs)
        running = RunningWilli(WilliService(cfg).start(), cfg)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


# -- MariaDB ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def system_mariadb() -> Iterator[TestDatabase]:
    """A database and user of their own on the machine's MariaDB; both dropped at the end."""
    try:
        admin = mariadb_harness.system_admin()
    except MariaDBUnavailable as err:
        pytest.skip(str(err))
    with mariadb_harness.test_database(admin, mariadb_harness.SYSTEM_HOST, mariadb_harness.SYSTEM_PORT) as db:
        yield db


@pytest.fixture(scope="session")
def tls_mariadb(pki: TestPKI) -> Iterator[TestDatabase]:
    """A private MariaDB offering TLS with `pki`'s certificate for 127.0.0.1 and localhost."""
    yield from _private_database(ServerTLS(pki.cert_file, pki.key_file, pki.ca_file))


@pytest.fixture(scope="session")
def plain_mariadb() -> Iterator[TestDatabase]:
    """A private MariaDB with TLS switched off (`--skip-ssl`)."""
    yield from _private_database(None)


def _private_database(tls: ServerTLS | None) -> Iterator[TestDatabase]:
    try:
        with mariadb_harness.private_mariadb(tls) as server, \
                mariadb_harness.test_database(server.admin, "127.0.0.1", server.port) as db:
            yield db
    except MariaDBUnavailable as err:
        pytest.skip(str(err))


# -- no skip in CI -----------------------------------------------------------------

#: Skips CI still accepts: node-id glob -> why the skip cannot be avoided there.
#: Keep it empty; every entry is a test CI does not run.
CI_SKIP_ALLOWED: dict[str, str] = {}

Report = Union[pytest.TestReport, pytest.CollectReport]


def skip_reason(report: Report) -> str:
    """The reason a skip report gives, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


def ci_forbids_skip(report: Report) -> bool:
    """A real skip (not an xfail), with CI set, not on the allow-list."""
    if not (report.skipped and os.environ.get("CI")) or hasattr(report, "wasxfail"):
        return False
    return not any(fnmatchcase(report.nodeid, pattern) for pattern in CI_SKIP_ALLOWED)


def fail_instead_of_skip(node: pytest.Item | pytest.Collector, report: Report) -> None:
    """Turn the skip report into a failure that still says why it would have skipped."""
    try:
        pytest.fail(f"skipped in CI: {skip_reason(report)}", pytrace=False)
    except pytest.fail.Exception:
        excinfo = pytest.ExceptionInfo.from_current()
    report.outcome = "failed"
    report.longrepr = node.repr_failure(excinfo)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Skips in setup (marks, fixtures) and in the test itself."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if ci_forbids_skip(report):
        fail_instead_of_skip(item, report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Skips while collecting: module-level `importorskip` or `pytest.skip(allow_module_level=True)`."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if ci_forbids_skip(report):
        fail_instead_of_skip(collector, report)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Daemons a test started (tests/daemon_helpers.py); the survivors are stopped at teardown."""
    r = Reaper()
    yield r
    r.cleanup()

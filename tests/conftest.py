"""Shared fixtures: throw-away PKIs and fake upstream servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI, make_pki
from fakeupstream import FakeUpstream
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

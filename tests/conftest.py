"""Shared fixtures: throw-away PKIs and fake upstream servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from certs import TestPKI, make_pki
from fakeupstream import FakeUpstream


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

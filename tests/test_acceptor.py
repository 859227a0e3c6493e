"""The acceptor thread in-process: it keeps accepting when the kernel refuses EPOLLEXCLUSIVE.

The turn-taking of several workers is proven with real worker processes in
`test_workers.py::test_a_new_connection_wakes_one_worker_and_the_workers_take_turns`.
"""

from __future__ import annotations

import logging
import select
import socket

import pytest
from daemon_helpers import wait_until

from willi.server import Acceptor


class _Listener:
    """What the acceptor needs of a WilliServer: a non-blocking listening socket and accept_one."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.accepted: list[socket.socket] = []

    def accept_one(self) -> bool:
        conn, _ = self.socket.accept()
        self.accepted.append(conn)
        return True

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.socket.close()


@pytest.mark.skipif(not hasattr(select, "EPOLLEXCLUSIVE"), reason="Linux epoll without EPOLLEXCLUSIVE")
def test_an_acceptor_whose_kernel_refuses_epollexclusive_still_accepts(caplog: pytest.LogCaptureFixture) -> None:
    listener = _Listener()
    acceptor = Acceptor([listener], shared=True)  # type: ignore[list-item]
    # EPOLLONESHOT with EPOLLEXCLUSIVE is EINVAL: the same answer as a kernel older than 4.5.
    acceptor._exclusive = select.EPOLLEXCLUSIVE | select.EPOLLONESHOT
    with caplog.at_level(logging.WARNING, logger="willi.server"):
        acceptor.start()
        try:
            for count in range(1, 4):
                with socket.create_connection(listener.server_address, timeout=5):
                    wait_until(lambda n=count: len(listener.accepted) == n, 5.0, f"connection {count} to be accepted")
        finally:
            acceptor.stop()
            listener.close()
    assert "EPOLLEXCLUSIVE refused" in caplog.text
    assert acceptor._exclusive == 0

"""Helpers for the end-to-end proxy tests (test_upstream, test_routing, test_data).

`make_config` builds a Willi configuration from Python values (so a test can
override any default, including the ones `support.willi_config` fixes, such
as `listen` or `upstream_command_timeout`), and the small functions below
drive a `RawClient` through a transaction and read what a `FakeUpstream`
recorded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import toml
from fakeupstream import FakeUpstream, RecordedSession
from support import RawClient

from willi.config import Config, parse_config

BASE_SETTINGS: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "domain": "mx.willi.test",
    "client_name_lookup": False,
    "upstream_command_timeout": "5s",
    "upstream_connect_timeout": "3s",
    "read_timeout": "10s",
    # The upstream connection closes with the client's, so "the upstream session closed" marks the end
    # of a client connection; the pool has its own tests (test_pool.py).
    "upstream_reuse": False,
}

BODY = b"Subject: test\r\n\r\nHello.\r\n"


def make_config(directory: Path, mappings: list[dict[str, Any]], **settings: Any) -> Config:
    """A Willi configuration: BASE_SETTINGS overridden by `settings`, then `mappings`."""
    data = {**BASE_SETTINGS, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    data["mappings"] = mappings
    return parse_config(toml.dumps(data), "test.toml", base=directory)


def static_mapping(port: int, host: str = "127.0.0.1", tls_verify: bool = False) -> dict[str, Any]:
    server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"type": "static", "server": server, "tls_verify": tls_verify}


def csv_mapping(file: Path, reload_interval: str | None = None) -> dict[str, Any]:
    table: dict[str, Any] = {"type": "csv", "file": str(file)}
    if reload_interval is not None:
        table["reload_interval"] = reload_interval
    return table


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write a routing CSV atomically (new inode, so a reload always notices)."""
    text = "pattern;server;tls_verify\n" + "".join(f"{p};{s};false\n" for p, s in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def verb(command: str) -> str:
    return command.split(" ", 1)[0].upper()


def verbs(session: RecordedSession) -> list[str]:
    return [verb(c) for c in session.commands]


def transaction(client: RawClient, sender: str, recipients: list[str], body: bytes = BODY,
                ) -> tuple[list[tuple[int, list[str]]], tuple[int, list[str]] | None]:
    """MAIL, RCPT..., DATA (and the body when DATA got 354) after EHLO.

    Returns the replies to MAIL and each RCPT, and the final reply (to the
    dot, or to DATA when it was refused).
    """
    replies = [client.cmd(f"MAIL FROM:<{sender}>")]
    replies += [client.cmd(f"RCPT TO:<{r}>") for r in recipients]
    code, lines = client.cmd("DATA")
    if code != 354:
        return replies, (code, lines)
    client.send(body + b".\r\n")
    return replies, client.reply()


def wait_sessions_closed(upstream: FakeUpstream, count: int | None = None, timeout: float = 5.0) -> None:
    """Wait until the fake has `count` sessions (if given) and all are closed."""
    ok = upstream.wait_for(
        lambda: (count is None or len(upstream.sessions) >= count) and all(s.closed for s in upstream.sessions),
        timeout,
    )
    assert ok, f"upstream sessions not closed: {[(s.commands, s.closed) for s in upstream.sessions]}"


def settle(seconds: float = 0.3) -> None:
    """Give a connection that must NOT happen the time to happen."""
    time.sleep(seconds)

"""The rows of design.md "The dialog with the client" that issue 7 touched still answer with their codes.

Each scenario drives one row through a real Willi and returns the reply the
row is about; the table below says what design.md promises for it. A new
limit (deadlines, junk, overshoot, routing syntax, protocol errors) must not
have shifted a neighbouring row.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from proxy_helpers import static_mapping
from security_helpers import open_transaction, start
from support import RawClient

Scenario = Callable[[Path, Callable[..., FakeUpstream]], tuple[int, str]]
SCENARIOS: dict[str, tuple[Scenario, int, str]] = {}


def row(name: str, code: int, enhanced: str) -> Callable[[Scenario], Scenario]:
    def register(func: Scenario) -> Scenario:
        SCENARIOS[name] = (func, code, enhanced)
        return func
    return register


def reply_of(client: RawClient, line: str) -> tuple[int, str]:
    code, lines = client.cmd(line)
    return code, lines[0]


def rcpt_reply(tmp_path: Path, upstream_port: int, recipient: str = "b@example.com", utf8: bool = False,
               mappings: list[dict] | None = None, **settings: object) -> tuple[int, str]:
    w = start(tmp_path, mappings or [static_mapping(upstream_port)], **settings)
    try:
        client = open_transaction(w, utf8=utf8)
        try:
            return reply_of(client, f"RCPT TO:<{recipient}>")
        finally:
            client.close()
    finally:
        w.stop()


@row("connect", 220, "mx.willi.test ESMTP Willi")
def connect(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)])
    try:
        client = w.raw()
        try:
            code, lines = client.reply()
            return code, lines[0]
        finally:
            client.close()
    finally:
        w.stop()


def over_limit(tmp_path: Path, fake: Callable[..., FakeUpstream], **settings: object) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)], **settings)
    first = w.raw()
    try:
        first.expect(220)
        second = w.raw()
        try:
            code, lines = second.reply()
            assert second.closed(5)
            return code, lines[0]
        finally:
            second.close()
    finally:
        first.close()
        w.stop()


@row("over the global connection limit", 421, "4.3.2")
def global_limit(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return over_limit(tmp_path, fake, max_connections=1)


@row("over the per-IP connection limit", 421, "4.7.0")
def per_ip_limit(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return over_limit(tmp_path, fake, max_connections_per_ip=1)


@row("recipient with no mapping", 554, "5.7.1")
def no_mapping(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    csv = tmp_path / "routes.csv"
    csv.write_text("pattern;server;tls_verify\nexample.org;127.0.0.1:9;false\n")
    return rcpt_reply(tmp_path, 0, mappings=[{"type": "csv", "file": str(csv)}])


@row("recipient whose local part carries routing syntax", 554, "5.7.1")
def routing_syntax(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return rcpt_reply(tmp_path, fake().port, "victim%evil.test@example.com")


@row("bad recipient address (a domain with no stable form)", 553, "5.1.3")
def bad_recipient(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return rcpt_reply(tmp_path, fake().port, "victim@\uff45xample.com", utf8=True)


@row("mapping lookup failed", 451, "4.3.0")
def lookup_failed(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    mapping = {"type": "sql", "host": "127.0.0.1", "port": 9, "user": "u", "password": "p", "database": "d",
               "query": "SELECT server FROM r WHERE pattern = ?", "connect_timeout": "1s"}
    return rcpt_reply(tmp_path, 0, mappings=[mapping])


@row("more than max_recipients", 452, "4.5.3")
def too_many_recipients(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)], max_recipients=1)
    try:
        client = open_transaction(w)
        try:
            assert client.cmd("RCPT TO:<a@example.com>")[0] == 250
            return reply_of(client, "RCPT TO:<b@example.com>")
        finally:
            client.close()
    finally:
        w.stop()


@row("xclient = required, upstream without XCLIENT", 451, "4.7.0")
def xclient_required(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return rcpt_reply(tmp_path, fake().port, xclient="required")


@row("upstream unreachable", 451, "4.4.1")
def unreachable(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    return rcpt_reply(tmp_path, port)


@row("TLS with the upstream failed", 451, "4.7.5")
def tls_failed(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    upstream = fake(replies={"starttls": "454 4.7.0 TLS not available"}, extensions=("PIPELINING", "STARTTLS"))
    mapping = {"type": "static", "server": f"127.0.0.1:{upstream.port}", "tls": "encrypt"}
    return rcpt_reply(tmp_path, 0, mappings=[mapping])


@row("upstream closed", 451, "4.4.2")
def upstream_closed(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return rcpt_reply(tmp_path, fake(drop_at="rcpt").port)


@row("upstream protocol error (new in issue 7)", 451, "4.5.0")
def upstream_protocol_error(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    return rcpt_reply(tmp_path, fake(unsolicited={"rcpt": "250 again"}).port)


@row("any reply the upstream gives, verbatim", 550, "5.1.1 <b@example.com>: no such user here")
def verbatim(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    upstream = fake(rcpt_replies={"b@example.com": "550 5.1.1 <b@example.com>: no such user here"})
    return rcpt_reply(tmp_path, upstream.port)


@row("message larger than max_message_bytes", 552, "5.3.4")
def too_large(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    upstream = fake()
    w = start(tmp_path, [static_mapping(upstream.port)], max_message_bytes=1000)
    try:
        client = open_transaction(w)
        try:
            assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n")
            code, lines = client.reply()
            assert client.cmd("NOOP")[0] == 250  # read to the end: the dialog goes on
            return code, lines[0]
        finally:
            client.close()
    finally:
        w.stop()


@row("client idle past the timeout", 421, "4.4.2")
def idle(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)], read_timeout="1s")
    try:
        client = w.raw()
        try:
            client.expect(220)
            code, lines = client.reply()
            return code, lines[0]
        finally:
            client.close()
    finally:
        w.stop()


@row("too many errors in one connection", 421, "4.7.0")
def too_many_errors(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)], max_errors=3)
    try:
        client = w.raw()
        try:
            client.ehlo()
            client.send(b"BOGUS\r\nBOGUS\r\nBOGUS\r\n")
            for _ in range(3):
                code, lines = client.reply()
                assert code == 500
            code, lines = client.reply()
            assert client.closed(5)
            return code, lines[0]
        finally:
            client.close()
    finally:
        w.stop()


@row("too many junk commands (new in issue 7)", 421, "4.7.0")
def junk(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)], max_junk_commands=2)
    try:
        client = w.raw()
        try:
            client.ehlo()
            assert client.cmd("NOOP")[0] == 250 and client.cmd("NOOP")[0] == 250
            return reply_of(client, "NOOP")
        finally:
            client.close()
    finally:
        w.stop()


@row("command line over the limit", 500, "5.5.2")
def long_line(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)])
    try:
        client = w.raw()
        try:
            client.ehlo()
            return reply_of(client, "NOOP " + "x" * 5000)
        finally:
            client.close()
    finally:
        w.stop()


@row("NOOP", 250, "2.0.0")
def noop(tmp_path: Path, fake: Callable[..., FakeUpstream]) -> tuple[int, str]:
    w = start(tmp_path, [static_mapping(fake().port)])
    try:
        client = w.raw()
        try:
            client.ehlo()
            return reply_of(client, "NOOP")
        finally:
            client.close()
    finally:
        w.stop()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dialog_row_still_answers_with_its_code(name: str, tmp_path: Path,
                                                fake_upstream: Callable[..., FakeUpstream]) -> None:
    scenario, code, enhanced = SCENARIOS[name]
    got_code, text = scenario(tmp_path, fake_upstream)
    assert got_code == code and text.startswith(enhanced), (name, got_code, text)

"""End to end: Willi behind a load balancer that speaks the PROXY protocol (design.md, "Behind a load balancer").

A raw-socket client plays HAProxy from 127.0.0.1 (the trusted balancer),
sends a header built by tests/proxyproto_build.py, then SMTP. The fake
upstream offers XCLIENT, so what Willi believes about the client is visible
on the wire (ADDR, PORT, DESTADDR, DESTPORT), and the transaction log line
shows `client=` and `proxy=`. Clients bound to 127.0.0.2 are untrusted.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fakeupstream import FakeUpstream
from proxy_helpers import make_config, static_mapping, transaction, verb, wait_sessions_closed
from proxyproto_build import (
    COMMANDS,
    FAMILY_TCP4,
    TYPE_CRC32C,
    build_v1,
    build_v1_unknown,
    build_v2,
    build_v2_local,
    build_v2_raw,
)
from support import RawClient, RunningWilli

from willi.log import TRANSACTION_LOGGER
from willi.protocol import xtext_decode

BALANCER = "127.0.0.1"
UNTRUSTED = "127.0.0.2"
XCLIENT_ATTRS = "ADDR PORT NAME PROTO HELO DESTADDR DESTPORT"
HEADER_TIMEOUT = 3.0  # the smallest proxy_protocol_timeout Willi accepts
SILENCE = 0.3  # how long "nothing arrives" is watched for after each piece of a header

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt_fields(line: str) -> dict[str, str]:
    """`a=1 b="x y"` -> {"a": "1", "b": "x y"} (quotes removed, escapes kept)."""
    return {key: value[1:-1] if value.startswith('"') else value for key, value in _FIELD.findall(line)}


def xclient_of(upstream: FakeUpstream) -> dict[str, str]:
    """The attributes of every XCLIENT command of the only session, merged."""
    (session,) = upstream.sessions
    attributes: dict[str, str] = {}
    for command in session.commands:
        if verb(command) == "XCLIENT":
            for item in command.split()[1:]:
                name, _, value = item.partition("=")
                decoded = xtext_decode(value)
                assert decoded is not None, command
                attributes[name] = decoded
    return attributes


def transaction_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [logfmt_fields(r.getMessage()) for r in caplog.records if r.name == TRANSACTION_LOGGER]


def session_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "willi.session" and r.levelno >= logging.WARNING]


def connect(w: RunningWilli, source: str = BALANCER) -> RawClient:
    return RawClient(w.host, w.port, source=source)


def nothing_arrives(client: RawClient, seconds: float = SILENCE) -> bool:
    """True when Willi sends nothing (and does not close) within `seconds`."""
    client.sock.settimeout(seconds)
    try:
        data = client.sock.recv(1)
    except TimeoutError:
        return True
    assert data == b"", f"Willi spoke before the header was complete: {data!r}"
    return False


def read_to_eof(client: RawClient, timeout: float = 15.0) -> bytes:
    """Everything Willi sends until it closes; fails if it does not close within `timeout`."""
    client.sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = client.sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk


def deliver(client: RawClient, helo: str = "client.example", *, greeted: bool = False) -> None:
    """(The greeting,) EHLO, one accepted message, QUIT."""
    if not greeted:
        client.expect(220)
    client.send(f"EHLO {helo}\r\n")
    client.expect(250)
    replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
    assert [code for code, _ in replies] == [250, 250], replies
    assert final is not None and final[0] == 250, final
    client.cmd("QUIT")
    client.close()


@pytest.fixture
def upstream(fake_upstream: Callable[..., FakeUpstream]) -> FakeUpstream:
    return fake_upstream(xclient=XCLIENT_ATTRS)


@pytest.fixture
def proxied(willi, upstream, tmp_path) -> Callable[..., RunningWilli]:
    """Factory: Willi trusting 127.0.0.1 as its balancer; keyword arguments override settings."""

    def start(**settings: object) -> RunningWilli:
        values: dict[str, object] = {"proxy_protocol_hosts": [BALANCER], "proxy_protocol_timeout": "3s"}
        values.update(settings)
        return willi(config=make_config(tmp_path, [static_mapping(upstream.port)], **values))

    return start


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="willi"):
        yield caplog


# ---------------------------------------------------------------- the header's client is the client


@pytest.mark.parametrize(("version", "src", "dst", "xclient_addr", "client_field"), [
    ("v1", "203.0.113.5", "198.51.100.25", "203.0.113.5", "203.0.113.5:40312"),
    ("v2", "203.0.113.5", "198.51.100.25", "203.0.113.5", "203.0.113.5:40312"),
    ("v1", "2001:db8::5", "2001:db8::25", "IPV6:2001:db8::5", "[2001:db8::5]:40312"),
    ("v2", "2001:db8::5", "2001:db8::25", "IPV6:2001:db8::5", "[2001:db8::5]:40312"),
])
def test_header_client_reaches_xclient_and_log(proxied, upstream, logs, version, src, dst, xclient_addr,
                                               client_field) -> None:
    w = proxied()
    client = connect(w)
    balancer = f"{BALANCER}:{client.sock.getsockname()[1]}"
    header = (build_v1 if version == "v1" else build_v2)(src, dst, 40312, 2525)
    client.send(header)
    deliver(client)
    wait_sessions_closed(upstream, 1)
    attributes = xclient_of(upstream)
    assert attributes["ADDR"] == xclient_addr
    assert attributes["PORT"] == "40312"
    assert attributes["DESTADDR"] == (f"IPV6:{dst}" if ":" in dst else dst)
    assert attributes["DESTPORT"] == "2525"
    assert upstream.refused_commands == []
    (line,) = transaction_lines(logs)
    assert line["result"] == "accepted"
    assert line["client"] == client_field
    assert line["proxy"] == balancer


def test_header_with_crc_and_tlvs_and_smtp_in_the_same_write(proxied, upstream) -> None:
    """A header with a CRC TLV, followed at once by the client's first command: the command is not lost."""
    w = proxied()
    client = connect(w)
    client.send(build_v2("192.0.2.77", "198.51.100.25", 1234, 25, tlvs=[(0x05, b"unique-id")], crc=True)
                + b"EHLO early.example\r\n")
    client.expect(220)
    client.expect(250)
    replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
    assert final is not None and final[0] == 250, (replies, final)
    client.cmd("QUIT")
    wait_sessions_closed(upstream, 1)
    assert xclient_of(upstream)["ADDR"] == "192.0.2.77"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nothing_is_sent_before_the_whole_header(proxied, upstream, version) -> None:
    """The header in four writes with pauses: the 220 comes only after the last byte."""
    w = proxied()
    client = connect(w)
    header = (build_v1 if version == "v1" else build_v2)("203.0.113.9", "198.51.100.25", 5555, 25)
    cuts = [1, len(header) // 3, len(header) - 1, len(header)]
    start = 0
    for cut in cuts[:-1]:
        client.send(header[start:cut])
        start = cut
        assert nothing_arrives(client), f"Willi closed after {start} of {len(header)} header bytes"
    client.send(header[start:])
    client.sock.settimeout(5)
    deliver(client)
    wait_sessions_closed(upstream, 1)
    assert xclient_of(upstream)["ADDR"] == "203.0.113.9"


# ---------------------------------------------------------------- bad headers: silence and one log line


BAD_HEADERS = {
    "v1 bad address": b"PROXY TCP4 203.0.113.300 198.51.100.25 1 25\r\n",
    "v1 bad keyword": b"PROXY TCP5 203.0.113.3 198.51.100.25 1 25\r\n",
    "v1 over 107 octets": b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n",
    "plain SMTP from the balancer": b"EHLO client.example\r\n",
    "v2 bad version": build_v2_raw(0x31, FAMILY_TCP4, bytes(12)),
    "v2 bad crc": build_v2("203.0.113.3", "198.51.100.25", 1, 25, tlvs=[(TYPE_CRC32C, b"\0\0\0\0")]),
    "v2 length too short for addresses": build_v2_raw(COMMANDS["PROXY"], FAMILY_TCP4, bytes(12), length=4),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_header_closes_without_a_byte(proxied, upstream, logs, name) -> None:
    w = proxied()
    client = connect(w)
    peer = f"{BALANCER}:{client.sock.getsockname()[1]}"
    client.send(BAD_HEADERS[name])
    assert read_to_eof(client) == b""
    warnings = [m for m in session_warnings(logs) if peer in m]
    assert len(warnings) == 1, session_warnings(logs)
    assert upstream.sessions == []
    assert transaction_lines(logs) == []


def test_truncated_header_closes_without_a_byte(proxied, upstream, logs) -> None:
    """Half a header, then the balancer's side closes: nothing is said, one line is logged."""
    w = proxied()
    client = connect(w)
    peer = f"{BALANCER}:{client.sock.getsockname()[1]}"
    header = build_v2("203.0.113.3", "198.51.100.25", 1, 25)
    client.send(header[:20])
    client.sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""
    assert len([m for m in session_warnings(logs) if peer in m]) == 1, session_warnings(logs)
    assert upstream.sessions == []


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 203.0.113.3 ",
                                  build_v2("203.0.113.3", "198.51.100.25", 1, 25)[:15]])
def test_late_header_closes_after_the_timeout(proxied, upstream, logs, sent) -> None:
    """Nothing or part of a header: closed silently once proxy_protocol_timeout (3 s) is over, not before."""
    w = proxied()
    client = connect(w)
    peer = f"{BALANCER}:{client.sock.getsockname()[1]}"
    started = time.monotonic()
    if sent:
        client.send(sent)
    assert read_to_eof(client, timeout=HEADER_TIMEOUT + 10) == b""
    elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.5 <= elapsed < HEADER_TIMEOUT + 8, elapsed
    assert len([m for m in session_warnings(logs) if peer in m]) == 1, session_warnings(logs)


def test_late_headers_hold_no_thread_past_the_timeout(proxied, upstream) -> None:
    """Several silent balancer connections at once all end by the deadline, and Willi still serves."""
    w = proxied()
    silent = [connect(w) for _ in range(5)]
    started = time.monotonic()
    for client in silent:
        assert read_to_eof(client, timeout=HEADER_TIMEOUT + 10) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT + 8
    client = connect(w)
    client.send(build_v1("203.0.113.4", "198.51.100.25", 1, 25))
    deliver(client)


# ---------------------------------------------------------------- health checks: the balancer itself


@pytest.mark.parametrize("header", [build_v2_local(), build_v2_local(crc=True), build_v1_unknown(),
                                    build_v1_unknown(b"ffff::1 ffff::2 1 2")],
                         ids=["v2-local", "v2-local-crc", "v1-unknown", "v1-unknown-with-rest"])
def test_local_and_unknown_are_the_balancer_itself(proxied, upstream, logs, header) -> None:
    w = proxied()
    client = connect(w)
    port = client.sock.getsockname()[1]
    client.send(header)
    deliver(client)
    wait_sessions_closed(upstream, 1)
    attributes = xclient_of(upstream)
    assert attributes["ADDR"] == BALANCER
    assert attributes["PORT"] == str(port)
    (line,) = transaction_lines(logs)
    assert line["client"] == f"{BALANCER}:{port}"
    assert line.get("proxy", "") == ""


def test_smtp_health_check_with_local_header(proxied) -> None:
    """What HAProxy's `option smtpchk` with check-send-proxy does: LOCAL, then EHLO and QUIT."""
    w = proxied()
    client = connect(w)
    client.send(build_v2_local(crc=True))
    client.ehlo("localhost")
    assert client.cmd("QUIT")[0] == 221


# ---------------------------------------------------------------- untrusted peers


def test_proxy_line_from_untrusted_peer_is_an_unknown_command(proxied) -> None:
    w = proxied()
    client = connect(w, source=UNTRUSTED)
    client.expect(220)  # no header expected: greeted at once
    code, lines = client.cmd(build_v1("203.0.113.5", "198.51.100.25", 1, 25).decode().rstrip("\r\n"))
    assert code == 500 and lines[0].startswith("5.5.2"), (code, lines)


def test_untrusted_peer_cannot_change_its_identity(proxied, upstream, logs) -> None:
    """A v1 line sent before the greeting is read as a command; the client stays 127.0.0.2."""
    w = proxied()
    client = connect(w, source=UNTRUSTED)
    port = client.sock.getsockname()[1]
    client.send(build_v1("203.0.113.5", "198.51.100.25", 1, 25))
    client.expect(220)
    assert client.reply()[0] == 500
    deliver(client, greeted=True)
    wait_sessions_closed(upstream, 1)
    assert xclient_of(upstream)["ADDR"] == UNTRUSTED
    (line,) = transaction_lines(logs)
    assert line["client"] == f"{UNTRUSTED}:{port}"
    assert line.get("proxy", "") == ""


def test_untrusted_v2_header_ends_in_quit(proxied, upstream) -> None:
    """The v2 signature holds `QUIT\\n` precisely so that a server that does not expect it hangs up."""
    w = proxied()
    client = connect(w, source=UNTRUSTED)
    client.expect(220)
    client.send(build_v2("203.0.113.5", "198.51.100.25", 1, 25))
    data = read_to_eof(client)
    assert b"221 " in data, data
    assert upstream.sessions == []


def test_no_trusted_hosts_means_plain_smtp_for_everyone(willi, upstream, tmp_path) -> None:
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = connect(w)
    client.expect(220)
    assert client.cmd("PROXY UNKNOWN")[0] == 500


# ---------------------------------------------------------------- the per-IP limit counts the real client


def open_behind(w: RunningWilli, src: str, family: str = "v1") -> RawClient:
    client = connect(w)
    builder = build_v1 if family == "v1" else build_v2
    dst = "::ffff:198.51.100.25" if ":" in src else "198.51.100.25"
    client.send(builder(src, dst, 1000 + len(src), 25))
    return client


def admitted_within(w: RunningWilli, src: str, timeout: float) -> RawClient:
    """A connection for `src` that got its 220, retried while Willi still counts a closing one."""
    deadline = time.monotonic() + timeout
    while True:
        client = open_behind(w, src)
        code, lines = client.reply()
        if code == 220:
            return client
        client.close()
        assert time.monotonic() < deadline, f"still refused after {timeout}s: {code} {lines}"
        time.sleep(0.1)


def test_per_ip_limit_counts_each_client_behind_the_balancer(proxied, upstream) -> None:
    w = proxied(max_connections_per_ip=2)
    held = [open_behind(w, "203.0.113.1"), open_behind(w, "203.0.113.1", "v2"),
            open_behind(w, "203.0.113.2"), open_behind(w, "203.0.113.2", "v2")]
    for client in held:
        client.expect(220)  # four connections from the balancer's one address, two per real client
    third = open_behind(w, "203.0.113.1")
    code, lines = third.reply()
    assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
    assert third.closed()
    held.pop(0).close()  # one of 203.0.113.1's connections ends: its slot is free again
    again = admitted_within(w, "203.0.113.1", 10.0)
    for client in [*held, again]:
        client.close()


def test_balancer_itself_is_never_refused_by_the_per_ip_limit(proxied) -> None:
    w = proxied(max_connections_per_ip=2)
    checks = []
    for _ in range(5):
        client = connect(w)
        client.send(build_v2_local())
        checks.append(client)
    for client in checks:
        client.expect(220)
    behind = [open_behind(w, "203.0.113.1") for _ in range(2)]
    for client in behind:
        client.expect(220)
    for client in checks + behind:
        client.close()


def test_ipv4_mapped_header_counts_as_the_ipv4_client(proxied, upstream, logs) -> None:
    w = proxied(max_connections_per_ip=2)
    mapped = open_behind(w, "::ffff:203.0.113.7", "v2")
    mapped.expect(220)
    plain = open_behind(w, "203.0.113.7")
    plain.expect(220)
    third = open_behind(w, "::ffff:203.0.113.7")  # v1 TCP6 with the mapped form
    assert third.reply()[0] == 421
    plain.close()
    mapped.send("EHLO client.example\r\n")
    mapped.expect(250)
    replies, final = transaction(mapped, "alice@sender.example", ["bob@example.com"])
    assert final is not None and final[0] == 250, (replies, final)
    mapped.cmd("QUIT")
    wait_sessions_closed(upstream, 1)
    attributes = xclient_of(upstream)
    assert attributes["ADDR"] == "203.0.113.7"  # not IPV6:::ffff:...
    assert attributes["DESTADDR"] == "198.51.100.25"
    (line,) = transaction_lines(logs)
    assert line["client"] == "203.0.113.7:1018"


def test_per_ip_refusal_is_logged_with_client_and_balancer(proxied, logs) -> None:
    w = proxied(max_connections_per_ip=1)
    first = open_behind(w, "203.0.113.8")
    first.expect(220)
    second = open_behind(w, "203.0.113.8")
    assert second.reply()[0] == 421
    assert any("203.0.113.8" in m and BALANCER in m for m in session_warnings(logs)), session_warnings(logs)
    first.close()


def test_many_balancer_connections_in_parallel(proxied, upstream) -> None:
    """Eight clients through one balancer address at once, each with its own header: each keeps its own identity."""
    w = proxied()
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            client = connect(w)
            client.send(build_v1(f"203.0.113.{20 + index}", "198.51.100.25", 2000 + index, 25))
            deliver(client, helo=f"client{index}.example")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    wait_sessions_closed(upstream, 8)
    seen = set()
    for session in upstream.sessions:
        attributes: dict[str, str] = {}
        for command in session.commands:
            if verb(command) == "XCLIENT":
                for item in command.split()[1:]:
                    name, _, value = item.partition("=")
                    attributes[name] = xtext_decode(value) or ""
        seen.add((attributes["ADDR"], attributes["PORT"], attributes["HELO"]))
    assert seen == {(f"203.0.113.{20 + i}", str(2000 + i), f"client{i}.example") for i in range(8)}


def test_ipv6_balancer_trusted_by_network(willi, upstream, tmp_path, logs) -> None:
    """A balancer reaching Willi over IPv6, trusted as a CIDR network, passing on an IPv4 client."""
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], listen="[::1]:0",
                                 proxy_protocol_hosts=["::1/128", "10.0.0.0/8"]))
    client = RawClient("::1", w.port)
    balancer_port = client.sock.getsockname()[1]
    client.send(build_v2("192.0.2.44", "198.51.100.25", 4444, 25))
    deliver(client)
    wait_sessions_closed(upstream, 1)
    assert xclient_of(upstream)["ADDR"] == "192.0.2.44"
    (line,) = transaction_lines(logs)
    assert line["client"] == "192.0.2.44:4444"
    assert line["proxy"] == f"[::1]:{balancer_port}"

"""The dialog with the client: design.md's reply table, row by row, over real sockets.

Willi runs in-process (the `willi` fixture) in front of a FakeUpstream.
Clients are mostly `RawClient`, which sends exactly the bytes we give it
(pipelined batches, overlong lines, plaintext after STARTTLS) and returns
each reply as (code, [text of every line]).

Willi's own replies are checked by code and enhanced status code (the
table fixes those; texts may change), except where the table spells the
text out. Replies that come from the upstream are checked whole, line by
line: they must arrive verbatim.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import TestPKI
from fakeupstream import FakeUpstream
from support import RawClient, RunningWilli, printable_id, willi_config

from willi.session import SmtpSession
from willi.upstream.client import UpstreamConnection

DOMAIN = "mx.willi.test"  # support.willi_config's domain
SENDER = "a@sender.example"
MAIL = f"MAIL FROM:<{SENDER}>"
BOB = "bob@example.com"
MESSAGE = b"Subject: dialog test\r\n\r\nHello.\r\n"
BASE_EXTENSIONS = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
FORBIDDEN_EXTENSIONS = ("CHUNKING", "AUTH", "XCLIENT", "XFORWARD", "DSN")
ROUTES = ["example.com;127.0.0.1:{port};false"]  # csv: only example.com is mapped
UNMAPPED = "carol@elsewhere.example"

Reply = tuple[int, list[str]]


# ---------------------------------------------------------------- helpers


def check(reply: Reply, code: int, status: str) -> None:
    """`reply` has `code` and its (last) line starts with the enhanced `status`."""
    got_code, lines = reply
    assert got_code == code and lines[-1].split(" ", 1)[0] == status, f"expected {code} {status}, got {reply}"


def wire(text: str) -> Reply:
    """A reply as the fake upstream writes it ('550-a\\r\\n550 b') -> what RawClient.reply() returns."""
    lines = text.split("\r\n")
    return int(lines[0][:3]), [line[4:] for line in lines]


def csv_mappings(directory: Path, lines: list[str], name: str = "routes.csv") -> str:
    """Write a csv routing file; return the `[[mappings]]` TOML that uses it."""
    path = directory / name
    path.write_text("pattern;server;tls_verify\n" + "".join(f"{line}\n" for line in lines))
    return f'[[mappings]]\ntype = "csv"\nfile = "{path}"\n'


def static_mapping(port: int | str = "{port}", *, tls_verify: bool = False) -> str:
    """A static mapping to 127.0.0.1:`port` (the default placeholder is the proxy fixture's upstream)."""
    return f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{port}"\ntls_verify = {str(tls_verify).lower()}\n'


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_extra(pki: TestPKI) -> str:
    return f'tls_cert = "{pki.cert_file}"\ntls_key = "{pki.key_file}"'


def no_connection(up: FakeUpstream) -> bool:
    """True when the upstream has seen no connection at all.

    Willi connects synchronously, before it answers the command that needs
    the upstream, and the fake records a session before it sends its
    greeting; the short grace only covers a connect Willi would not wait on.
    """
    return not up.wait_for(lambda: bool(up.sessions), timeout=0.1)


def upstream_commands(up: FakeUpstream) -> list[str]:
    return [cmd for session in up.sessions for cmd in session.commands]


def assert_ehlo(lines: list[str], expected: list[str]) -> None:
    """EHLO reply: the domain first, then exactly `expected` (any order), nothing forbidden."""
    assert lines[0] == DOMAIN, lines
    keywords = [line.split(" ", 1)[0].upper() for line in lines[1:]]
    for word in FORBIDDEN_EXTENSIONS:
        assert word not in keywords, f"{word} advertised: {lines}"
    assert sorted(lines[1:]) == sorted(expected), lines
    assert len(set(lines[1:])) == len(lines) - 1, f"duplicate extension: {lines}"


def run_script(c: RawClient, script: list[tuple[str, int]]) -> None:
    """Send each command and check only the reply code."""
    for line, code in script:
        got = c.cmd(line)
        assert got[0] == code, f"{line!r}: expected {code}, got {got}"


def transaction(c: RawClient, *recipients: str, message: bytes = MESSAGE) -> Reply:
    """MAIL, RCPTs, DATA, message; returns the reply to the final dot."""
    check(c.cmd(MAIL), 250, "2.1.0")
    for rcpt in recipients or (BOB,):
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message + b".\r\n")
    return c.reply()


@dataclass
class Proxy:
    """A running Willi, its upstream, and clients that are closed at teardown."""

    w: RunningWilli
    up: FakeUpstream
    opened: list[RawClient]

    def client(self, source: str | None = None) -> RawClient:
        c = self.w.raw(source=source)
        self.opened.append(c)
        return c

    def greeted(self, name: str = "client.example") -> RawClient:
        """A client past the greeting and EHLO."""
        c = self.client()
        c.ehlo(name)
        return c


@pytest.fixture
def proxy(willi, fake_upstream, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Factory: `proxy(extra=..., routes=[csv lines] | mappings=toml, **FakeUpstream kwargs)`.

    By default Willi routes everything to one fresh FakeUpstream (static
    mapping). `routes` are csv lines and `mappings` raw TOML; in both,
    `{port}` stands for that upstream's port.
    """
    opened: list[RawClient] = []

    started: list[RunningWilli] = []

    def factory(*, extra: str = "", routes: list[str] | None = None, mappings: str | None = None,
                settings: dict[str, object] | None = None, **upstream_kwargs: object) -> Proxy:
        up = fake_upstream(**upstream_kwargs)
        if routes is not None:
            mappings = csv_mappings(tmp_path, [r.replace("{port}", str(up.port)) for r in routes])
        elif mappings is not None:
            mappings = mappings.replace("{port}", str(up.port))
        config = willi_config(upstream_port=up.port, extra=extra, mappings=mappings, directory=tmp_path)
        if settings:  # for keys support.willi_config already sets (TOML forbids a second one)
            config = dataclasses.replace(config, **settings)
        w = willi(config=config)
        started.append(w)
        return Proxy(w, up, opened)

    yield factory
    for c in opened:  # before the willi fixture stops the service, which waits for sessions
        c.close()


# ---------------------------------------------------------------- greeting, EHLO, HELO


def test_greeting(proxy) -> None:
    c = proxy().client()
    assert c.reply() == (220, [f"{DOMAIN} ESMTP Willi"])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", [*BASE_EXTENSIONS, "SIZE 20971520", "SMTPUTF8"]),
        ("max_message_bytes = 123456", [*BASE_EXTENSIONS, "SIZE 123456", "SMTPUTF8"]),
        ('max_message_bytes = "1MiB"\nsmtputf8 = false', [*BASE_EXTENSIONS, "SIZE 1048576"]),
        ("smtputf8 = true", [*BASE_EXTENSIONS, "SIZE 20971520", "SMTPUTF8"]),
    ],
    ids=["default", "size", "smtputf8-off", "smtputf8-on"],
)
def test_ehlo_lines(proxy, extra: str, expected: list[str]) -> None:
    c = proxy(extra=extra).client()
    assert_ehlo(c.ehlo(), expected)


def test_ehlo_offers_starttls_only_with_certificate_and_before_tls(proxy, pki: TestPKI) -> None:
    expected = [*BASE_EXTENSIONS, "SIZE 20971520", "SMTPUTF8"]
    c = proxy(extra=tls_extra(pki)).client()
    assert_ehlo(c.ehlo(), [*expected, "STARTTLS"])
    check(c.cmd("STARTTLS"), 220, "2.0.0")
    c.starttls(pki.client_context())
    c.send("EHLO client.example\r\n")
    assert_ehlo(c.expect(250), expected)


def test_ehlo_twice_and_lowercase_verb(proxy) -> None:
    c = proxy().greeted()
    code, lines = c.cmd("ehlo other.example")
    assert code == 250
    assert_ehlo(lines, [*BASE_EXTENSIONS, "SIZE 20971520", "SMTPUTF8"])


def test_helo(proxy) -> None:
    c = proxy().client()
    c.expect(220)
    assert c.cmd("HELO client.example") == (250, [DOMAIN])
    check(c.cmd(MAIL), 250, "2.1.0")


# ---------------------------------------------------------------- STARTTLS


def test_starttls_forgets_all_state(proxy, pki: TestPKI) -> None:
    p = proxy(extra=tls_extra(pki))
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    c.starttls(pki.client_context())
    check(c.cmd(MAIL), 503, "5.5.1")  # the EHLO from before TLS is forgotten
    c.send("EHLO client.example\r\n")
    c.expect(250)
    check(c.cmd(f"RCPT TO:<{BOB}>"), 503, "5.5.1")  # and so is the MAIL
    check(c.cmd("STARTTLS"), 503, "5.5.1")
    assert transaction(c)[0] == 250
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)
    assert p.up.completed_transactions[0].data == MESSAGE


def test_starttls_unavailable_without_certificate(proxy) -> None:
    c = proxy().greeted()
    check(c.cmd("STARTTLS"), 454, "4.7.0")
    check(c.cmd("NOOP"), 250, "2.0.0")
    check(c.cmd(MAIL), 250, "2.1.0")


def test_starttls_discards_pipelined_plaintext(proxy, pki: TestPKI) -> None:
    """RFC 3207 4.2: a command sent with STARTTLS in one write is never answered."""
    c = proxy(extra=tls_extra(pki)).greeted()
    c.send("STARTTLS\r\nNOOP\r\n")
    check(c.reply(), 220, "2.0.0")
    c.starttls(pki.client_context())  # asserts that nothing followed the 220 in plaintext
    c.send("EHLO client.example\r\n")
    code, lines = c.reply()
    assert code == 250 and lines[0] == DOMAIN and len(lines) > 1, f"not the EHLO reply: {code} {lines}"
    check(c.cmd("NOOP"), 250, "2.0.0")
    c.send("QUIT\r\n")
    check(c.reply(), 221, "2.0.0")
    assert c.closed()
    assert c.buf == b"", f"an extra reply arrived: {c.buf!r}"


# ---------------------------------------------------------------- sequence errors: 503


@pytest.mark.parametrize(
    ("script", "command"),
    [
        ([], MAIL),
        ([("EHLO client.example", 250), (MAIL, 250)], MAIL),
        ([("HELO client.example", 250), (MAIL, 250)], "MAIL FROM:<>"),
        ([("EHLO client.example", 250)], f"RCPT TO:<{BOB}>"),
        ([], f"RCPT TO:<{BOB}>"),
        ([("EHLO client.example", 250)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250), (f"RCPT TO:<{BOB}>", 250), ("RSET", 250)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250), (f"RCPT TO:<{UNMAPPED}>", 554)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250), ("RCPT TO:<nobody@example.com>", 550)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250), (f"RCPT TO:<{UNMAPPED}>", 554),
          ("RCPT TO:<nobody@example.com>", 550)], "DATA"),
        ([("EHLO client.example", 250), (MAIL, 250), (f"RCPT TO:<{BOB}>", 250), ("EHLO again.example", 250)],
         "DATA"),
    ],
    ids=["mail-before-ehlo", "nested-mail", "nested-mail-after-helo", "rcpt-before-mail", "rcpt-before-ehlo",
         "data-before-mail", "data-without-rcpt", "data-after-rset", "data-rcpt-refused-by-willi",
         "data-rcpt-refused-by-upstream", "data-all-rcpts-refused", "data-after-new-ehlo"],
)
def test_bad_sequence(proxy, script: list[tuple[str, int]], command: str) -> None:
    p = proxy(routes=ROUTES, rcpt_replies={"nobody@example.com": "550 5.1.1 <nobody@example.com>: no such user"})
    c = p.client()
    c.expect(220)
    run_script(c, script)
    check(c.cmd(command), 503, "5.5.1")
    # Only a recipient the upstream answered (250 or its 550) means Willi talked to it; where it did,
    # the refused DATA must not have reached it. An unmapped recipient never makes the connection.
    contacted = any(line.startswith("RCPT") and code in (250, 550) for line, code in script)
    assert bool(p.up.sessions) is contacted, (contacted, upstream_commands(p.up))
    assert not any(cmd.upper().startswith("DATA") for cmd in upstream_commands(p.up))
    check(c.cmd("NOOP"), 250, "2.0.0")


# ---------------------------------------------------------------- syntax: 501, 553, 555, 552

AFTER_EHLO = [("EHLO client.example", 250)]
AFTER_MAIL = [*AFTER_EHLO, (MAIL, 250)]
AFTER_RCPT = [*AFTER_MAIL, (f"RCPT TO:<{BOB}>", 250)]


@pytest.mark.parametrize(
    ("script", "command", "code", "status"),
    [
        # 501 5.5.4: the command itself is malformed
        (AFTER_EHLO, "MAIL", 501, "5.5.4"),
        (AFTER_EHLO, f"MAIL <{SENDER}>", 501, "5.5.4"),
        (AFTER_EHLO, f"MAIL TO:<{SENDER}>", 501, "5.5.4"),
        (AFTER_EHLO, f"MAIL FROM:{SENDER}", 501, "5.5.4"),
        (AFTER_EHLO, f"MAIL FROM:<{SENDER}", 501, "5.5.4"),
        (AFTER_EHLO, f"MAIL FROM:<{SENDER}> SIZE=lots", 501, "5.5.4"),
        (AFTER_MAIL, "RCPT", 501, "5.5.4"),
        (AFTER_MAIL, f"RCPT <{BOB}>", 501, "5.5.4"),
        (AFTER_MAIL, f"RCPT TO:{BOB}", 501, "5.5.4"),
        ([], "EHLO", 501, "5.5.4"),
        ([], "HELO", 501, "5.5.4"),
        (AFTER_RCPT, "DATA now", 501, "5.5.4"),
        # 553: the address is malformed
        (AFTER_EHLO, "MAIL FROM:<no-at-sign>", 553, "5.1.7"),
        (AFTER_EHLO, "MAIL FROM:<a@>", 553, "5.1.7"),
        (AFTER_EHLO, "MAIL FROM:<@sender.example>", 553, "5.1.7"),
        (AFTER_EHLO, "MAIL FROM:<a b@sender.example>", 553, "5.1.7"),
        (AFTER_EHLO, "MAIL FROM:<a@-bad-.example>", 553, "5.1.7"),
        (AFTER_EHLO, "MAIL FROM:<\u00fc@sender.example>", 553, "5.1.7"),  # UTF-8 without SMTPUTF8
        (AFTER_MAIL, "RCPT TO:<>", 553, "5.1.3"),
        (AFTER_MAIL, "RCPT TO:<bob>", 553, "5.1.3"),
        (AFTER_MAIL, "RCPT TO:<bob@>", 553, "5.1.3"),
        (AFTER_MAIL, "RCPT TO:<bob@exa..mple.com>", 553, "5.1.3"),
        # 555 5.5.4: a parameter Willi does not know (or does not carry through)
        (AFTER_EHLO, f"MAIL FROM:<{SENDER}> FOO=bar", 555, "5.5.4"),
        (AFTER_EHLO, f"MAIL FROM:<{SENDER}> RET=HDRS", 555, "5.5.4"),
        (AFTER_EHLO, f"MAIL FROM:<{SENDER}> AUTH=<>", 555, "5.5.4"),
        (AFTER_MAIL, f"RCPT TO:<{BOB}> NOTIFY=NEVER", 555, "5.5.4"),
        (AFTER_MAIL, f"RCPT TO:<{BOB}> FOO", 555, "5.5.4"),
    ],
    ids=lambda v: printable_id(v) if isinstance(v, str) else None,
)
def test_syntax_errors(proxy, script: list[tuple[str, int]], command: str, code: int, status: str) -> None:
    p = proxy()
    c = p.client()
    c.expect(220)
    run_script(c, script)
    check(c.cmd(command), code, status)
    check(c.cmd("NOOP"), 250, "2.0.0")
    if script is AFTER_RCPT:  # the upstream has the transaction open: the malformed DATA must not reach it
        assert p.up.sessions and not any(cmd.upper().startswith("DATA") for cmd in upstream_commands(p.up))


def test_refused_mail_leaves_no_transaction(proxy) -> None:
    c = proxy().greeted()
    check(c.cmd("MAIL FROM:<no-at-sign>"), 553, "5.1.7")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 503, "5.5.1")
    check(c.cmd(MAIL), 250, "2.1.0")


@pytest.mark.parametrize(
    ("params", "code", "status"),
    [
        ("SIZE=1001", 552, "5.3.4"),
        ("SIZE=99999999999999", 552, "5.3.4"),
        ("SIZE=1000", 250, "2.1.0"),
        ("SIZE=0", 250, "2.1.0"),
        ("size=999 BODY=8BITMIME SMTPUTF8", 250, "2.1.0"),
        ("BODY=7BIT", 250, "2.1.0"),
        ("SIZE=" + "9" * 20, 552, "5.3.4"),  # 20 digits: a number, too big
        ("SIZE=" + "9" * 21, 501, "5.5.4"),  # more than 20 digits: not a SIZE at all
        ("BODY", 501, "5.5.4"),
        ("BODY=9BIT", 501, "5.5.4"),
        ("SMTPUTF8=yes", 501, "5.5.4"),
    ],
)
def test_mail_size_parameter(proxy, params: str, code: int, status: str) -> None:
    p = proxy(extra="max_message_bytes = 1000")
    c = p.greeted()
    check(c.cmd(f"{MAIL} {params}"), code, status)
    if code != 250:  # no transaction was opened: the RCPT that would contact the upstream is out of sequence
        check(c.cmd(f"RCPT TO:<{BOB}>"), 503, "5.5.1")
        assert no_connection(p.up)
        return
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    [mail] = [cmd for cmd in upstream_commands(p.up) if cmd.upper().startswith("MAIL")]
    assert "SIZE=" not in mail.upper(), mail  # this upstream does not offer SIZE: dropped
    assert p.up.refused_commands == []


def test_mail_accepted_without_contacting_upstream(proxy) -> None:
    p = proxy()
    c = p.greeted()
    assert c.cmd(MAIL)[0] == 250
    check(c.cmd("RSET"), 250, "2.0.0")
    check(c.cmd("MAIL FROM:<>"), 250, "2.1.0")
    assert no_connection(p.up)
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250  # only now
    assert p.up.wait_for(lambda: len(p.up.sessions) == 1)


@pytest.mark.parametrize("written", ["postmaster", "Postmaster", "POSTMASTER"])
def test_rcpt_postmaster(proxy, written: str) -> None:
    p = proxy()
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{written}>") == (250, ["2.1.5 Ok"])  # the upstream's reply
    assert f"RCPT TO:<postmaster@{DOMAIN}>" in upstream_commands(p.up)
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250


# ---------------------------------------------------------------- routing replies


def test_unmapped_recipient_is_relay_denied(proxy) -> None:
    p = proxy(routes=ROUTES)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{UNMAPPED}>") == (554, [f"5.7.1 <{UNMAPPED}>: Relay access denied"])
    assert c.cmd("RCPT TO:<Dave@Elsewhere.Example>")[0] == 554
    assert no_connection(p.up)


def test_unmapped_recipient_never_reaches_upstream_of_mapped_one(proxy) -> None:
    p = proxy(routes=ROUTES)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{UNMAPPED}>") == (554, [f"5.7.1 <{UNMAPPED}>: Relay access denied"])
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)
    assert p.up.completed_transactions[0].rcpts == [f"RCPT TO:<{BOB}>"]
    assert not any("elsewhere" in cmd.lower() for cmd in upstream_commands(p.up))


def test_recipient_routed_elsewhere(proxy, fake_upstream) -> None:
    other = fake_upstream()
    p = proxy(routes=[*ROUTES, f"example.org;127.0.0.1:{other.port};false"])
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    check(c.cmd("RCPT TO:<eve@example.org>"), 452, "4.5.3")
    assert c.cmd("RCPT TO:<ann@example.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250
    assert no_connection(other)
    # the client retries the deferred recipient in its own transaction
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd("RCPT TO:<eve@example.org>")[0] == 250
    assert other.wait_for(lambda: len(other.sessions) == 1)


def test_max_recipients(proxy) -> None:
    p = proxy(extra="max_recipients = 2")
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd("RCPT TO:<r1@example.com>")[0] == 250
    assert c.cmd("RCPT TO:<r2@example.com>")[0] == 250
    check(c.cmd("RCPT TO:<r3@example.com>"), 452, "4.5.3")
    check(c.cmd("RCPT TO:<r4@example.com>"), 452, "4.5.3")
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)
    assert p.up.completed_transactions[0].rcpts == ["RCPT TO:<r1@example.com>", "RCPT TO:<r2@example.com>"]


def test_max_recipients_counts_only_accepted(proxy) -> None:
    p = proxy(extra="max_recipients = 1", rcpt_replies={"gone@example.com": "550 5.1.1 gone"})
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd("RCPT TO:<gone@example.com>")[0] == 550
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    check(c.cmd("RCPT TO:<r3@example.com>"), 452, "4.5.3")


def test_mapping_failure_is_temporary_and_stops_the_chain(proxy, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.csv"
    mappings = f'[[mappings]]\ntype = "csv"\nfile = "{missing}"\n\n' + static_mapping()
    p = proxy(mappings=mappings)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 451, "4.3.0")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 451, "4.3.0")  # errors are not cached as "no route"
    check(c.cmd("DATA"), 503, "5.5.1")
    assert no_connection(p.up)  # the later static mapping was not tried


def test_upstream_unreachable(proxy) -> None:
    p = proxy(mappings=static_mapping(closed_port()))
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 451, "4.4.1")
    check(c.cmd("DATA"), 503, "5.5.1")
    check(c.cmd("NOOP"), 250, "2.0.0")


@pytest.mark.parametrize("step", ["greeting", "ehlo", "mail", "rcpt"])
def test_upstream_closes_before_recipient_is_accepted(proxy, step: str) -> None:
    p = proxy(drop_at=step)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 451, "4.4.2")
    check(c.cmd("DATA"), 503, "5.5.1")


@pytest.mark.parametrize("step", ["data", "dot"])
def test_upstream_closes_during_data(proxy, step: str) -> None:
    p = proxy(drop_at=step)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    if step == "data":
        check(c.cmd("DATA"), 451, "4.4.2")
    else:
        assert c.cmd("DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        check(c.reply(), 451, "4.4.2")
    check(c.cmd("NOOP"), 250, "2.0.0")


def test_upstream_tls_failure(proxy, other_pki: TestPKI) -> None:
    p = proxy(mappings=static_mapping(tls_verify=True),
              tls_context=other_pki.server_context())
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 451, "4.7.5")
    assert p.up.wait_for(lambda: bool(p.up.sessions) and p.up.sessions[0].closed)
    assert not any(cmd.upper().startswith(("MAIL", "RCPT")) for cmd in upstream_commands(p.up))


# ---------------------------------------------------------------- upstream replies, verbatim

MULTI_550 = ("550-5.1.1 <bob@example.com>: Recipient address rejected\r\n"
             "550-5.1.1 second line of the reason\r\n550 5.1.1 third and last line")


@pytest.mark.parametrize(
    ("upstream", "at", "text"),
    [
        ({"rcpt_replies": {BOB: MULTI_550}}, "rcpt", MULTI_550),
        ({"rcpt_replies": {BOB: "450 4.2.0 <bob@example.com>: Greylisted, see https://x.example/g"}}, "rcpt",
         "450 4.2.0 <bob@example.com>: Greylisted, see https://x.example/g"),
        ({"rcpt_replies": {BOB: "250 2.1.5 Recipient <bob@example.com> fine by me"}}, "rcpt",
         "250 2.1.5 Recipient <bob@example.com> fine by me"),
        ({"greeting": "554 5.3.2 go away"}, "rcpt", "554 5.3.2 go away"),
        ({"greeting": "554-5.3.2 go away\r\n554 5.3.2 really, go away"}, "rcpt",
         "554-5.3.2 go away\r\n554 5.3.2 really, go away"),
        ({"replies": {"mail": "550 5.7.1 <a@sender.example>: Sender address rejected"}}, "rcpt",
         "550 5.7.1 <a@sender.example>: Sender address rejected"),
        ({"replies": {"mail": "451-4.7.1 Sender greylisted\r\n451 4.7.1 Come back in 5 minutes"}}, "rcpt",
         "451-4.7.1 Sender greylisted\r\n451 4.7.1 Come back in 5 minutes"),
        ({"replies": {"data": "554 5.5.1 Error: no valid recipients, says upstream"}}, "data",
         "554 5.5.1 Error: no valid recipients, says upstream"),
        ({"replies": {"data": "451-4.3.0 Try\r\n451 4.3.0 later"}}, "data", "451-4.3.0 Try\r\n451 4.3.0 later"),
        ({"replies": {"data": "354 Go ahead, custom text"}}, "data", "354 Go ahead, custom text"),
        ({}, "dot", "250 2.0.0 Ok: queued as FAKE1"),
        ({"replies": {"dot": "250 2.0.0 Ok: queued as 4XyZ9QrT7 <id@upstream.example>"}}, "dot",
         "250 2.0.0 Ok: queued as 4XyZ9QrT7 <id@upstream.example>"),
        ({"replies": {"dot": "250-2.0.0 Ok\r\n250 2.0.0 queued as ABC"}}, "dot",
         "250-2.0.0 Ok\r\n250 2.0.0 queued as ABC"),
        ({"replies": {"dot": "550-5.7.1 Message rejected as spam\r\n550 5.7.1 see https://x.example/spam"}}, "dot",
         "550-5.7.1 Message rejected as spam\r\n550 5.7.1 see https://x.example/spam"),
        ({"replies": {"dot": "452 4.3.1 Insufficient system storage"}}, "dot",
         "452 4.3.1 Insufficient system storage"),
    ],
    ids=["rcpt-multiline-550", "rcpt-450", "rcpt-250-text", "greeting-554", "greeting-multiline",
         "mail-550", "mail-multiline-451", "data-554", "data-multiline-451", "data-354-text",
         "dot-queue-id-default", "dot-queue-id", "dot-multiline-250", "dot-multiline-550", "dot-452"],
)
def test_upstream_reply_relayed_verbatim(proxy, upstream: dict, at: str, text: str) -> None:
    p = proxy(**upstream)
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")  # the upstream is not asked yet
    reply = c.cmd(f"RCPT TO:<{BOB}>")
    if at == "rcpt":
        assert reply == wire(text)
        return
    assert reply[0] == 250
    reply = c.cmd("DATA")
    if at == "data":
        assert reply == wire(text)
        if reply[0] != 354:
            check(c.cmd("NOOP"), 250, "2.0.0")
            return
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
        return
    assert reply[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply() == wire(text)
    check(c.cmd("NOOP"), 250, "2.0.0")


def test_upstream_421_becomes_451_with_its_text(proxy) -> None:
    """Willi's documented exception to "verbatim" (SmtpSession.relay): a 421 would tell
    the client that *its* connection closes; only the upstream's did."""
    p = proxy(rcpt_replies={BOB: "421 4.3.2 upstream shutting down"})
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>") == (451, ["4.3.2 upstream shutting down"])
    check(c.cmd("NOOP"), 250, "2.0.0")  # the client's connection lives on
    assert c.cmd("RCPT TO:<other@example.com>")[0] == 250  # over a new upstream connection
    assert len(p.up.sessions) == 2


@pytest.mark.parametrize("enabled", [True, False], ids=["smtputf8-on", "smtputf8-off"])
def test_smtputf8_parameter(proxy, enabled: bool) -> None:
    p = proxy(extra=f"smtputf8 = {str(enabled).lower()}")
    c = p.greeted()
    if not enabled:
        check(c.cmd(f"{MAIL} SMTPUTF8"), 555, "5.5.4")  # not advertised, so an unknown parameter
        check(c.cmd("MAIL FROM:<j\u00fcrg@sender.example> SMTPUTF8"), 553, "5.1.7")
        check(c.cmd("MAIL FROM:<j\u00fcrg@sender.example>"), 553, "5.1.7")
        return
    check(c.cmd("MAIL FROM:<j\u00fcrg@sender.example> SMTPUTF8"), 250, "2.1.0")
    assert c.cmd("RCPT TO:<b\u00f6b@example.com>")[0] == 250
    assert "RCPT TO:<b\u00f6b@example.com>" in upstream_commands(p.up)
    assert any(cmd.startswith("MAIL FROM:<j\u00fcrg@sender.example>") and "SMTPUTF8" in cmd
               for cmd in upstream_commands(p.up))


# ---------------------------------------------------------------- message size


def test_message_over_limit_is_read_to_the_end_and_refused(proxy) -> None:
    p = proxy(extra="max_message_bytes = 1000")
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    c.send(big * 40 + b".\r\nNOOP\r\n")  # the NOOP proves the rest of the message was consumed
    check(c.reply(), 552, "5.3.4")
    check(c.reply(), 250, "2.0.0")
    assert p.up.wait_for(lambda: bool(p.up.sessions) and p.up.sessions[0].closed)
    assert p.up.completed_transactions == []
    assert transaction(c)[0] == 250  # a fresh transaction still works
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)


# ---------------------------------------------------------------- line length, unknown and refused commands


@pytest.mark.parametrize("length", [513, 1000, 200_000])
def test_command_line_too_long(proxy, length: int) -> None:
    """max_command_line (512 here) counts the CRLF, as RFC 5321 4.5.3.1.4 does."""
    c = proxy(extra="max_command_line = 512").greeted()
    c.send("NOOP " + "x" * (length - 7) + "\r\n")
    check(c.reply(), 500, "5.5.2")
    check(c.cmd("NOOP"), 250, "2.0.0")


def test_command_line_at_limit_is_accepted(proxy) -> None:
    c = proxy(extra="max_command_line = 512").greeted()
    c.send("NOOP " + "x" * 505 + "\r\n")  # 512 octets with CRLF
    check(c.reply(), 250, "2.0.0")


def test_overlong_mail_is_not_executed(proxy) -> None:
    c = proxy(extra="max_command_line = 512").greeted()
    check(c.cmd("MAIL FROM:<" + "a" * 600 + "@sender.example>"), 500, "5.5.2")
    check(c.cmd(f"RCPT TO:<{BOB}>"), 503, "5.5.1")


@pytest.mark.parametrize("line", ["FOOBAR", "MAILFROM:<a@sender.example>", "HELLO client.example", "STARTTTLS",
                                  "", "GET / HTTP/1.1"])
def test_unknown_command(proxy, line: str) -> None:
    c = proxy().greeted()
    check(c.cmd(line), 500, "5.5.2")
    check(c.cmd("NOOP"), 250, "2.0.0")


@pytest.mark.parametrize("line", ["AUTH PLAIN AGFAAGI=", "auth login", "BDAT 0 LAST", "XCLIENT ADDR=203.0.113.66",
                                  "XFORWARD ADDR=203.0.113.66", "ETRN example.com", "EXPN staff", "TURN"])
def test_refused_command(proxy, line: str) -> None:
    c = proxy().greeted()
    check(c.cmd(line), 502, "5.5.1")
    check(c.cmd("NOOP"), 250, "2.0.0")


@pytest.mark.parametrize("advertised", [None, "NAME ADDR PORT PROTO HELO"], ids=["no-xclient", "upstream-xclient"])
def test_client_xclient_xforward_never_reach_upstream(proxy, advertised: str | None) -> None:
    p = proxy(xclient=advertised)
    c = p.greeted()
    check(c.cmd("XCLIENT ADDR=203.0.113.66 NAME=evil.example"), 502, "5.5.1")
    check(c.cmd("XFORWARD ADDR=203.0.113.66 NAME=evil.example"), 502, "5.5.1")
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    check(c.cmd("XCLIENT ADDR=203.0.113.66 NAME=evil.example"), 502, "5.5.1")
    check(c.cmd("XFORWARD ADDR=203.0.113.66 NAME=evil.example"), 502, "5.5.1")
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250
    c.send("QUIT\r\n")
    c.expect(221)
    assert p.up.wait_for(lambda: bool(p.up.sessions) and p.up.sessions[0].closed)
    raw = bytes(p.up.sessions[0].raw)
    assert b"XFORWARD" not in raw.upper()
    assert b"203.0.113.66" not in raw and b"evil.example" not in raw
    xclients = [cmd for cmd in p.up.sessions[0].commands if cmd.upper().startswith("XCLIENT")]
    if advertised is None:
        assert xclients == []
    else:
        assert xclients and all("ADDR=127.0.0.1" in cmd for cmd in xclients), xclients  # Willi's own only


# ---------------------------------------------------------------- VRFY NOOP RSET HELP QUIT


@pytest.mark.parametrize(
    ("line", "code", "status"),
    [
        (f"VRFY {BOB}", 252, "2.5.2"),
        ("VRFY <postmaster>", 252, "2.5.2"),
        ("NOOP", 250, "2.0.0"),
        ("NOOP anything", 250, "2.0.0"),
        ("noop", 250, "2.0.0"),
        ("RSET", 250, "2.0.0"),
        ("HELP", 214, "2.0.0"),
        ("HELP MAIL", 214, "2.0.0"),
    ],
)
@pytest.mark.parametrize("greeted", [False, True], ids=["before-ehlo", "after-ehlo"])
def test_informational_commands(proxy, line: str, code: int, status: str, greeted: bool) -> None:
    p = proxy()
    c = p.greeted() if greeted else p.client()
    if not greeted:
        c.expect(220)
    check(c.cmd(line), code, status)
    check(c.cmd("NOOP"), 250, "2.0.0")


def test_rset_clears_the_transaction(proxy) -> None:
    p = proxy()
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    check(c.cmd("RSET"), 250, "2.0.0")
    check(c.cmd("DATA"), 503, "5.5.1")
    assert transaction(c, "other@example.com")[0] == 250
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)
    assert p.up.completed_transactions[0].rcpts == ["RCPT TO:<other@example.com>"]


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in-transaction"])
def test_quit(proxy, in_transaction: bool) -> None:
    p = proxy()
    c = p.greeted()
    if in_transaction:
        check(c.cmd(MAIL), 250, "2.1.0")
        assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    check(c.cmd("QUIT"), 221, "2.0.0")
    assert c.closed()
    if in_transaction:
        assert p.up.wait_for(lambda: p.up.sessions[0].closed)
        assert p.up.completed_transactions == []
        assert not any(cmd.upper().startswith("DATA") for cmd in upstream_commands(p.up))
        assert upstream_commands(p.up)[-1].upper() == "QUIT"  # the upstream is quit, not just dropped


# ---------------------------------------------------------------- timeouts and limits


def test_idle_client_times_out(proxy) -> None:
    c = proxy(settings={"read_timeout": 1.0}).client()
    c.expect(220)
    started = time.monotonic()
    check(c.reply(), 421, "4.4.2")
    assert time.monotonic() - started >= 0.8
    assert c.closed()


def test_idle_client_in_data_times_out_and_upstream_gets_no_dot(proxy) -> None:
    p = proxy(settings={"read_timeout": 1.0})
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: unfinished\r\n\r\npartial line")
    check(c.reply(), 421, "4.4.2")
    assert c.closed()
    assert p.up.wait_for(lambda: p.up.sessions[0].closed)
    assert p.up.completed_transactions == []


def test_too_many_errors(proxy) -> None:
    c = proxy(extra="max_errors = 3").greeted()
    check(c.cmd("FOO"), 500, "5.5.2")
    check(c.cmd("MAIL FROM:bad"), 501, "5.5.4")
    check(c.cmd("NOOP"), 250, "2.0.0")  # two errors are tolerated
    check(c.cmd("BAR"), 500, "5.5.2")
    check(c.reply(), 421, "4.7.0")
    assert c.closed()


def _wait_for_slot(p: Proxy, source: str | None = None, timeout: float = 3.0) -> RawClient:
    """A new client that got the 220 greeting, once a slot has been released."""
    deadline = time.monotonic() + timeout
    while True:
        c = p.client(source=source)
        code, lines = c.reply()
        if code == 220:
            return c
        assert time.monotonic() < deadline, f"no slot freed: {code} {lines}"
        time.sleep(0.02)


def test_global_connection_limit(proxy) -> None:
    p = proxy(extra="max_connections = 2")
    first, second = p.client(), p.client()
    first.expect(220)
    second.expect(220)
    third = p.client()
    check(third.reply(), 421, "4.3.2")
    assert third.closed()
    fourth = p.client(source="127.0.0.2")  # the global limit is global
    check(fourth.reply(), 421, "4.3.2")
    assert fourth.closed()
    check(first.cmd("QUIT"), 221, "2.0.0")
    assert first.closed()
    _wait_for_slot(p).cmd("NOOP")


def test_per_ip_connection_limit(proxy) -> None:
    p = proxy(extra="max_connections_per_ip = 1")
    first = p.client()
    first.expect(220)
    second = p.client()
    check(second.reply(), 421, "4.7.0")
    assert second.closed()
    other = p.client(source="127.0.0.2")
    other.expect(220)
    check(other.cmd("NOOP"), 250, "2.0.0")
    check(first.cmd("QUIT"), 221, "2.0.0")
    assert first.closed()
    check(_wait_for_slot(p).cmd("NOOP"), 250, "2.0.0")


# ---------------------------------------------------------------- PIPELINING


def test_pipelined_transactions(proxy) -> None:
    p = proxy()
    c = p.greeted()
    c.send(f"{MAIL}\r\nRCPT TO:<{BOB}>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n")
    check(c.reply(), 250, "2.1.0")
    assert c.reply() == (250, ["2.1.5 Ok"])
    assert c.reply() == (250, ["2.1.5 Ok"])
    assert c.reply()[0] == 354
    second = b"Subject: second\r\n\r\n..leading dot\r\n"
    c.send(MESSAGE + b".\r\n" + b"MAIL FROM:<>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n")
    assert c.reply() == (250, ["2.0.0 Ok: queued as FAKE1"])
    check(c.reply(), 250, "2.1.0")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 354
    c.send(second + b".\r\nQUIT\r\n")
    assert c.reply() == (250, ["2.0.0 Ok: queued as FAKE2"])
    check(c.reply(), 221, "2.0.0")
    assert c.closed()
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 2)
    first_tx, second_tx = p.up.completed_transactions
    assert first_tx.rcpts == [f"RCPT TO:<{BOB}>", "RCPT TO:<carol@example.com>"]
    assert first_tx.data == MESSAGE
    assert second_tx.mail_from == "MAIL FROM:<>"
    assert second_tx.rcpts == ["RCPT TO:<dave@example.com>"]
    assert second_tx.data == second


def test_pipelined_with_refused_recipient(proxy) -> None:
    p = proxy(routes=ROUTES)
    c = p.greeted()
    c.send(f"{MAIL}\r\nRCPT TO:<{UNMAPPED}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n")
    check(c.reply(), 250, "2.1.0")
    assert c.reply() == (554, [f"5.7.1 <{UNMAPPED}>: Relay access denied"])
    assert c.reply()[0] == 250
    assert c.reply()[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250


def test_pipelined_all_recipients_refused(proxy) -> None:
    p = proxy(routes=ROUTES)
    c = p.greeted()
    c.send(f"{MAIL}\r\nRCPT TO:<{UNMAPPED}>\r\nDATA\r\nNOOP\r\n")
    check(c.reply(), 250, "2.1.0")
    assert c.reply()[0] == 554
    check(c.reply(), 503, "5.5.1")  # no 354: the NOOP below is a command, not message text
    check(c.reply(), 250, "2.0.0")


def test_pipelined_rset_noop(proxy) -> None:
    c = proxy().greeted()
    c.send(f"RSET\r\nNOOP\r\n{MAIL}\r\nRSET\r\nNOOP\r\nMAIL FROM:<>\r\nNOOP\r\n")
    for code, status in [(250, "2.0.0"), (250, "2.0.0"), (250, "2.1.0"), (250, "2.0.0"), (250, "2.0.0"),
                         (250, "2.1.0"), (250, "2.0.0")]:
        check(c.reply(), code, status)
    assert c.buf == b""


def test_pipelined_ehlo_through_quit(proxy) -> None:
    """A whole session in one write (only the greeting awaited)."""
    p = proxy()
    c = p.client()
    c.expect(220)
    c.send(f"EHLO client.example\r\n{MAIL}\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode() + MESSAGE + b".\r\nQUIT\r\n")
    assert c.reply()[1][0] == DOMAIN
    check(c.reply(), 250, "2.1.0")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 354
    assert c.reply()[0] == 250
    check(c.reply(), 221, "2.0.0")
    assert c.closed()
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 1)
    assert p.up.completed_transactions[0].data == MESSAGE


# ---------------------------------------------------------------- unexpected exceptions


def _boom(self: SmtpSession, arg: str) -> None:
    raise RuntimeError("injected failure")


def test_unexpected_exception(proxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The dispatch table is built once from the smtp_* methods, so patch both.
    monkeypatch.setattr(SmtpSession, "smtp_NOOP", _boom)
    monkeypatch.setitem(SmtpSession.HANDLERS, "NOOP", _boom)
    p = proxy()
    c = p.greeted()
    with caplog.at_level(logging.ERROR, logger="willi"):
        check(c.cmd("NOOP"), 451, "4.3.0")
        deadline = time.monotonic() + 2
        while not any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records):
            assert time.monotonic() < deadline, "no traceback logged"
            time.sleep(0.01)
    # the server lives on and serves new clients
    for _ in range(2):
        fresh = p.greeted()
        assert transaction(fresh)[0] == 250
        check(fresh.cmd("QUIT"), 221, "2.0.0")
    assert p.up.wait_for(lambda: len(p.up.completed_transactions) == 2)


def test_unexpected_exception_in_transaction_sends_no_dot(proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside the streaming itself, mid-body: no final dot upstream, and the rest of the
    message is never read as commands (the session ends instead)."""
    calls: list[int] = []
    send_data = UpstreamConnection.send_data

    def failing_send_data(self: UpstreamConnection, chunk: bytes) -> None:
        calls.append(len(chunk))
        if len(calls) > 1:
            raise RuntimeError("injected failure in the middle of the message")
        send_data(self, chunk)

    monkeypatch.setattr(UpstreamConnection, "send_data", failing_send_data)
    p = proxy()
    c = p.greeted()
    check(c.cmd(MAIL), 250, "2.1.0")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: first half\r\n\r\n" + b"first part of the body\r\n" * 20)
    assert p.up.wait_for(lambda: b"first part" in bytes(p.up.sessions[0].raw)), "the body must be under way"
    c.send(b"second part of the body\r\n" * 20)  # its send_data raises
    check(c.reply(), 451, "4.3.0")
    assert len(calls) == 2
    try:  # the rest of the message: text that looks like commands
        c.send(b"RSET\r\nMAIL FROM:<evil@sender.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
               b"smuggled\r\n.\r\nQUIT\r\n")
    except OSError:
        pass
    assert c.closed(), f"the rest of the message was read as commands: {c.buf!r}"
    assert p.up.wait_for(lambda: p.up.sessions[0].closed)
    assert p.up.completed_transactions == []
    raw = b"".join(bytes(s.raw) for s in p.up.sessions)
    assert b"\r\n.\r\n" not in raw and b"evil" not in raw and b"victim" not in raw, raw[-300:]

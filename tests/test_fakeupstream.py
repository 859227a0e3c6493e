"""The fake upstream must itself be right before proxy tests can trust it."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pytest
from certs import TestPKI
from fakeupstream import (
    DEFAULT_EXTENSIONS,
    LINGER_AFTER_421,
    MAIL_PARAMS,
    MAX_COMMAND_OCTETS,
    RCPT_PARAMS,
    FakeUpstream,
    line_error,
    offered_extensions,
    param_error,
    split_path,
    strip_line_end,
    without,
    xclient_addr,
    xclient_authorized,
    xclient_error,
    xtext_decode,
)
from hypothesis import given
from hypothesis import strategies as st

Factory = Callable[..., FakeUpstream]


def read_reply(f: BinaryIO) -> list[bytes]:
    """Read one (possibly multi-line) SMTP reply as its lines without CRLF."""
    lines = []
    while True:
        line = f.readline()
        assert line.endswith(b"\r\n"), f"truncated reply: {line!r}"
        lines.append(line[:-2])
        if line[3:4] != b"-":
            return lines


@contextmanager
def raw_client(server: FakeUpstream) -> Iterator[tuple[socket.socket, BinaryIO]]:
    """A raw socket past the greeting and EHLO, for byte-level tests."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    f = sock.makefile("rb")
    try:
        assert read_reply(f)[0].startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(f)[-1].startswith(b"250 ")
        yield sock, f
    finally:
        f.close()
        sock.close()


def test_plain_send(fake_upstream: Factory) -> None:
    server = fake_upstream()
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        refused = client.sendmail(
            "a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n"
        )
    assert refused == {}
    assert server.wait_for(lambda: server.sessions[0].closed)
    (txn,) = server.completed_transactions
    # Recorded verbatim: smtplib sends lowercase verbs.
    assert txn.mail_from == "mail FROM:<a@example.com>"
    assert txn.rcpts == ["rcpt TO:<b@example.com>"]
    assert txn.data == b"Subject: hi\r\n\r\nbody\r\n"
    assert txn.reply == "250 2.0.0 Ok: queued as FAKE1"
    session = server.sessions[0]
    assert session.commands[0].startswith("ehlo ")
    assert session.commands[-1] == "QUIT"
    assert not session.tls


def test_ehlo_features(fake_upstream: Factory) -> None:
    server = fake_upstream(size=1000, xclient="NAME ADDR PORT PROTO HELO")
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.esmtp_features["size"] == "1000"
        assert client.esmtp_features["xclient"] == "NAME ADDR PORT PROTO HELO"
        assert client.has_extn("pipelining")
        assert not client.has_extn("starttls")


def test_starttls(fake_upstream: Factory, pki: TestPKI) -> None:
    server = fake_upstream(tls_context=pki.server_context())
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@example.com", ["b@example.com"], b"secret\r\n")
    session = server.sessions[0]
    assert session.tls
    verbs = [c.split()[0].upper() for c in session.commands[:3]]
    assert verbs == ["EHLO", "STARTTLS", "EHLO"]
    assert b"mail FROM:<a@example.com>" in session.raw  # decrypted bytes recorded
    assert server.completed_transactions[0].data == b"secret\r\n"


def test_starttls_untrusted_ca(
    fake_upstream: Factory, pki: TestPKI, other_pki: TestPKI
) -> None:
    server = fake_upstream(tls_context=other_pki.server_context())
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=pki.client_context())


def test_issue_other_name(fake_upstream: Factory, pki: TestPKI) -> None:
    cert, key = pki.issue("mx.example.net")
    server = fake_upstream(tls_context=pki.server_context(cert, key))
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            client.starttls(context=pki.client_context())


def test_xclient(fake_upstream: Factory) -> None:
    server = fake_upstream(xclient="NAME ADDR PORT PROTO HELO")
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        assert client.docmd("XCLIENT", "ADDR=192.0.2.1 NAME=[UNAVAILABLE]") == (
            220,
            b"fake.upstream ESMTP",
        )
        # XCLIENT starts over: MAIL before a new EHLO is a protocol error.
        assert client.docmd("MAIL", "FROM:<a@example.com>")[0] == 503
        client.ehlo("client.test")
        client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
    assert "XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]" in server.sessions[0].commands
    assert len(server.completed_transactions) == 1


def test_xclient_not_offered(fake_upstream: Factory) -> None:
    server = fake_upstream()
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        assert client.docmd("XCLIENT", "ADDR=192.0.2.1")[0] == 502


def test_drop_at_rcpt(fake_upstream: Factory) -> None:
    server = fake_upstream(drop_at="rcpt")
    client = smtplib.SMTP(server.host, server.port, timeout=5)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
    client.close()
    assert server.wait_for(lambda: server.sessions[0].closed)
    assert server.completed_transactions == []
    assert server.sessions[0].commands[-1] == "rcpt TO:<b@example.com>"


def test_rcpt_replies(fake_upstream: Factory) -> None:
    server = fake_upstream(
        rcpt_replies={
            "Bad@Example.com": "550-5.1.1 no such user\r\n550 5.1.1 really not",
        }
    )
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        refused = client.sendmail(
            "a@example.com", ["good@example.com", "BAD@example.com"], b"x\r\n"
        )
    assert refused == {
        "BAD@example.com": (550, b"5.1.1 no such user\n5.1.1 really not")
    }
    (txn,) = server.completed_transactions
    assert txn.rcpts == ["rcpt TO:<good@example.com>"]


def test_scripted_replies_and_helo_fallback(fake_upstream: Factory) -> None:
    server = fake_upstream(ehlo_supported=False, replies={"mail": "451 4.3.0 later"})
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
        assert info.value.smtp_code == 451
    verbs = [c.split()[0].upper() for c in server.sessions[0].commands]
    assert verbs[:3] == ["EHLO", "HELO", "MAIL"]
    assert server.all_transactions == []


def test_delay(fake_upstream: Factory) -> None:
    server = fake_upstream(delays={"mail": 0.3})
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo("client.test")
        started = time.monotonic()
        assert client.docmd("MAIL", "FROM:<a@example.com>")[0] == 250
        assert time.monotonic() - started >= 0.3


def test_pipelining(fake_upstream: Factory) -> None:
    server = fake_upstream(size=1000, rcpt_replies={"no@example.com": "550 5.1.1 nope"})
    with raw_client(server) as (sock, f):
        sock.sendall(
            b"MAIL FROM:<a@example.com> SIZE=5\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<no@example.com>\r\n"
            b"RCPT TO:<c@example.com> NOTIFY=NEVER\r\n"
            b"DATA\r\n"
        )
        replies = [read_reply(f)[0][:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"550", b"555", b"354"]
        sock.sendall(b"hello\r\n.\r\nRSET\r\nNOOP\r\nBOGUS\r\nQUIT\r\n")
        replies = [read_reply(f)[0][:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"250", b"502", b"221"]
    (txn,) = server.completed_transactions
    assert txn.mail_from == "MAIL FROM:<a@example.com> SIZE=5"
    assert txn.rcpts == ["RCPT TO:<b@example.com>"]
    assert txn.data == b"hello\r\n"
    # Only the protocol faults count as refused, not the scripted 550.
    assert server.refused_commands == ["RCPT TO:<c@example.com> NOTIFY=NEVER", "BOGUS"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"..leading dot stuffed\r\n.\tnot a terminator\r\n",
        b"8bit \xe4\xf6\xfc\xff\r\nbare\nLF and bare\rCR\r\n.. \r\n",
        b"line ends with dot.\r\n" + b"x" * 100_000 + b"\r\n",
        b"no final CRLF",
    ],
)
def test_data_byte_exact(fake_upstream: Factory, data: bytes) -> None:
    server = fake_upstream()
    with raw_client(server) as (sock, f):
        sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        assert read_reply(f)[0].startswith(b"250")
        assert read_reply(f)[0].startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert read_reply(f)[0].startswith(b"354")
        terminator = b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n"
        # Dribble the bytes so the terminator search crosses chunk boundaries.
        payload = data + terminator
        for i in range(0, len(payload), 7 if len(payload) < 1000 else 65_000):
            sock.sendall(payload[i : i + (7 if len(payload) < 1000 else 65_000)])
        assert read_reply(f)[0].startswith(b"250 2.0.0 Ok: queued as FAKE")
    (txn,) = server.completed_transactions
    expected = data if terminator == b".\r\n" else data + b"\r\n"
    assert txn.data == expected
    assert expected in server.sessions[0].raw


def test_dot_drop_records_completed_data(fake_upstream: Factory) -> None:
    server = fake_upstream(drop_at="dot")
    client = smtplib.SMTP(server.host, server.port, timeout=5)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
    client.close()
    assert server.wait_for(lambda: server.sessions[0].closed)
    (txn,) = server.completed_transactions
    assert txn.data == b"x\r\n"
    assert txn.reply == ""


def test_ipv6(fake_upstream: Factory) -> None:
    """No skip: this machine and CI have ::1, and a missing ::1 must show."""
    server = fake_upstream(host="::1")
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
    assert len(server.completed_transactions) == 1


def test_survives_vanishing_client_and_stops_fast() -> None:
    server = FakeUpstream().start()
    try:
        gone = socket.create_connection((server.host, server.port), timeout=5)
        gone.sendall(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\npartial")
        assert server.wait_for(
            lambda: bool(server.sessions) and b"partial" in server.sessions[0].raw
        )
        gone.close()
        assert server.wait_for(lambda: server.sessions[0].closed)
        (txn,) = server.all_transactions
        assert not txn.completed
        assert txn.data == b"partial"
        idle = socket.create_connection((server.host, server.port), timeout=5)
        with smtplib.SMTP(server.host, server.port, timeout=5) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
    assert all(s.closed for s in server.sessions)
    assert idle.recv(1024).startswith(b"220")  # greeting, then EOF
    assert idle.recv(1024) == b""
    idle.close()


# -- strictness: pure rules ---------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        ((), DEFAULT_EXTENSIONS),
        (("SMTPUTF8",), ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")),
        (("smtputf8", "8bitmime"), ("PIPELINING", "ENHANCEDSTATUSCODES")),
        (("DSN",), DEFAULT_EXTENSIONS),
    ],
)
def test_without(keywords: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert without(*keywords) == expected


def test_without_other_base_matches_keyword_not_prefix() -> None:
    assert without("SIZE", base=("SIZE 100", "SIZEX", "AUTH PLAIN")) == ("SIZEX", "AUTH PLAIN")


def test_default_extensions_are_postfix_like() -> None:
    assert DEFAULT_EXTENSIONS == ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")


def test_offered_extensions_parses_the_reply_as_sent() -> None:
    reply = "250-fake.upstream\r\n250-SIZE 1000\r\n250-xclient NAME ADDR\r\n250 8BITMIME"
    assert offered_extensions(reply) == {"SIZE": "1000", "XCLIENT": "NAME ADDR", "8BITMIME": ""}
    assert offered_extensions("250 fake.upstream") == {}


@pytest.mark.parametrize(
    ("line", "content"),
    [(b"NOOP\r\n", b"NOOP"), (b"NOOP\n", b"NOOP"), (b"NOOP\r\r\n", b"NOOP\r"), (b"NOOP", b"NOOP")],
)
def test_strip_line_end_removes_one_line_end(line: bytes, content: bytes) -> None:
    assert strip_line_end(line) == content


@pytest.mark.parametrize(
    ("content", "utf8", "expected"),
    [
        (b"NOOP", True, None),
        (b"N" * MAX_COMMAND_OCTETS, True, None),
        (b"N" * (MAX_COMMAND_OCTETS + 1), True, "500 5.5.2 Error: line too long"),
        (b"NOOP a\rb", True, "500 5.5.2 Error: bad syntax"),
        (b"NOOP\r", True, "500 5.5.2 Error: bad syntax"),
        (b"NOOP a\0b", False, "500 5.5.2 Error: bad syntax"),
        (b"", True, "500 5.5.2 Error: bad syntax"),
        (b"  ", True, "500 5.5.2 Error: bad syntax"),
        ("MAIL FROM:<ä@example.com>".encode(), True, None),
        (b"MAIL FROM:<\xe4@example.com>", True, "500 5.5.2 Error: bad UTF-8 syntax"),
        (b"MAIL FROM:<\xe4@example.com>", False, None),
    ],
)
def test_line_error(content: bytes, utf8: bool, expected: str | None) -> None:
    assert line_error(content, utf8=utf8) == expected


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@example.com>", ("a@example.com", [])),
        ("from:<a@example.com> SIZE=1 BODY=8BITMIME", ("a@example.com", ["SIZE=1", "BODY=8BITMIME"])),
        ("FROM: <a@example.com>", ("a@example.com", [])),  # Postfix tolerates the space
        ("FROM:<a@example.com>  SIZE=1", ("a@example.com", ["SIZE=1"])),
        ("FROM:<>", ("", [])),
        ('FROM:<"a>b<c"@example.com> SMTPUTF8', ('"a>b<c"@example.com', ["SMTPUTF8"])),
        ('FROM:<"a\\"> x"@example.com>', ('"a\\"> x"@example.com', [])),
        ("FROM:a@example.com", None),
        ("FROM:<a@example.com", None),
        ("FROM:<a@example.com>SIZE=1", None),
        ("FROM:<a<b@example.com>", None),
        ("TO:<a@example.com>", None),
        ("FROM <a@example.com>", None),
    ],
)
def test_split_path(arg: str, expected: tuple[str, list[str]] | None) -> None:
    assert split_path(arg, "FROM:") == expected


_ADDR = st.text(st.characters(codec="utf-8", exclude_characters='<>"\\ \r\n\t\x00'), max_size=40)
_PARAMS = st.lists(st.from_regex(r"[A-Z0-9][A-Z0-9-]{0,8}(=[!-<>-~]{1,10})?", fullmatch=True), max_size=4)


@given(address=_ADDR, params=_PARAMS)
def test_split_path_round_trip(address: str, params: list[str]) -> None:
    arg = f"FROM:<{address}>" + "".join(f" {p}" for p in params)
    assert split_path(arg, "FROM:") == (address, params)


@given(arg=st.text(max_size=60))
def test_split_path_never_raises_and_keeps_the_path_inside_brackets(arg: str) -> None:
    parsed = split_path(arg, "TO:")
    if parsed is not None:
        path, _ = parsed
        assert f"<{path}>" in arg


BASE = {"PIPELINING": "", "8BITMIME": "", "ENHANCEDSTATUSCODES": "", "SMTPUTF8": ""}


@pytest.mark.parametrize(
    ("params", "offered", "expected"),
    [
        ([], {}, None),
        (["SIZE=10"], BASE, "555 5.5.4 Unsupported option: SIZE=10"),
        (["SIZE=10"], {**BASE, "SIZE": "1000"}, None),
        (["size=10"], {"SIZE": ""}, None),
        (["SIZE=abc"], {"SIZE": "1000"}, "501 5.5.4 Bad message size syntax"),
        (["SIZE=١٢"], {"SIZE": "1000"}, "501 5.5.4 Bad message size syntax"),  # not ASCII digits
        (["SIZE="], {"SIZE": "1000"}, "555 5.5.4 Unsupported option: SIZE="),
        (["SIZE=1", "SIZE=2"], {"SIZE": "1000"}, "555 5.5.4 Unsupported option: SIZE=2"),
        (["BODY=8BITMIME"], BASE, None),
        (["body=7bit"], BASE, None),
        (["BODY=8BITMIME"], {"SMTPUTF8": ""}, "555 5.5.4 Unsupported option: BODY=8BITMIME"),
        (["BODY=BINARYMIME"], BASE, "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
        (["BODY"], BASE, "555 5.5.4 Unsupported option: BODY"),
        (["SMTPUTF8"], BASE, None),
        (["SMTPUTF8"], {"8BITMIME": ""}, "555 5.5.4 Unsupported option: SMTPUTF8"),
        (["SMTPUTF8=yes"], BASE, "555 5.5.4 Unsupported option: SMTPUTF8=yes"),
        (["RET=HDRS"], BASE, "555 5.5.4 Unsupported option: RET=HDRS"),
        (["ENVID=QQ314159"], BASE, "555 5.5.4 Unsupported option: ENVID=QQ314159"),
        (["RET=HDRS", "ENVID=a+2Bb"], {"DSN": ""}, None),
        (["RET=ALL"], {"DSN": ""}, "501 5.5.4 Bad RET parameter syntax"),
        (["ENVID=a+zz"], {"DSN": ""}, "501 5.5.4 Bad ENVID parameter syntax"),
        (["AUTH=<>"], BASE, "555 5.5.4 Unsupported option: AUTH=<>"),
        (["AUTH=<>"], {"AUTH": "PLAIN"}, None),
        (["FOO=bar"], BASE, "555 5.5.4 Unsupported option: FOO=bar"),
        (["FOO"], BASE, "555 5.5.4 Unsupported option: FOO"),
        (["=x"], BASE, "555 5.5.4 Unsupported option: =x"),
        (["BODY=8BITMIME", "NOTIFY=NEVER"], {**BASE, "DSN": ""}, "555 5.5.4 Unsupported option: NOTIFY=NEVER"),
    ],
)
def test_mail_param_error(params: list[str], offered: dict[str, str], expected: str | None) -> None:
    assert param_error(params, offered, MAIL_PARAMS) == expected


@pytest.mark.parametrize(
    ("params", "offered", "expected"),
    [
        ([], BASE, None),
        (["NOTIFY=NEVER"], BASE, "555 5.5.4 Unsupported option: NOTIFY=NEVER"),
        (["ORCPT=rfc822;b@example.com"], BASE, "555 5.5.4 Unsupported option: ORCPT=rfc822;b@example.com"),
        (["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;b+40x"], {"DSN": ""}, None),
        (["NOTIFY=NEVER,SUCCESS"], {"DSN": ""}, "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
        (["NOTIFY=FAILURE,FAILURE"], {"DSN": ""}, "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
        (["ORCPT=b@example.com"], {"DSN": ""}, "501 5.5.4 Error: Bad ORCPT parameter syntax"),
        (["SIZE=10"], {"SIZE": "1000"}, "555 5.5.4 Unsupported option: SIZE=10"),  # MAIL only
        (["SMTPUTF8"], BASE, "555 5.5.4 Unsupported option: SMTPUTF8"),
    ],
)
def test_rcpt_param_error(params: list[str], offered: dict[str, str], expected: str | None) -> None:
    assert param_error(params, offered, RCPT_PARAMS) == expected


@given(key=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}", fullmatch=True), value=st.none() | st.text(max_size=8))
def test_unknown_parameters_are_always_555(key: str, value: str | None) -> None:
    param = key if value is None else f"{key}={value}"
    everything = {"SIZE": "", "8BITMIME": "", "SMTPUTF8": "", "DSN": "", "AUTH": ""}
    verdict = param_error([param], everything, MAIL_PARAMS)
    if key.upper() not in MAIL_PARAMS:
        assert verdict == f"555 5.5.4 Unsupported option: {param}"
    assert param_error([param], {}, MAIL_PARAMS) == f"555 5.5.4 Unsupported option: {param}"


def _xtext(text: str) -> str:
    """RFC 3461 encoder written independently of the code under test."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (ord("+"), ord("=")) else f"+{b:02X}" for b in text.encode()
    )


@given(st.text(max_size=30))
def test_xtext_decode_inverts_encoding(text: str) -> None:
    assert xtext_decode(_xtext(text)) == text


@pytest.mark.parametrize("bad", ["a+2", "a+ZZ", "a b", "a=b", "+"])
def test_xtext_decode_refuses_malformed(bad: str) -> None:
    assert xtext_decode(bad) is None


XCLIENT_ALL = "NAME ADDR PORT PROTO HELO"


@pytest.mark.parametrize(
    ("arg", "offered", "expected"),
    [
        ("ADDR=192.0.2.1 NAME=[UNAVAILABLE] PORT=25 PROTO=ESMTP HELO=a+20b", XCLIENT_ALL, None),
        ("ADDR=IPV6:2001:db8::1 NAME=mx.example.org", XCLIENT_ALL, None),
        ("name=[TEMPUNAVAIL]", XCLIENT_ALL, None),
        ("DESTADDR=192.0.2.9", XCLIENT_ALL, "501 5.5.4 Bad XCLIENT attribute name: DESTADDR"),
        ("NAME=mx.example.org", "ADDR", "501 5.5.4 Bad XCLIENT attribute name: NAME"),
        ("FOO=bar", XCLIENT_ALL, "501 5.5.4 Bad XCLIENT attribute name: FOO"),
        ("NAME", XCLIENT_ALL, "501 5.5.4 Error: attribute=value expected"),
        ("", XCLIENT_ALL, "501 5.5.4 Syntax: XCLIENT attribute=value..."),
        ("ADDR=notanip", XCLIENT_ALL, "501 5.5.4 Bad ADDR syntax: notanip"),
        ("ADDR=2001:db8::1", XCLIENT_ALL, "501 5.5.4 Bad ADDR syntax: 2001:db8::1"),  # needs IPV6:
        ("PORT=abc", XCLIENT_ALL, "501 5.5.4 Bad PORT syntax: abc"),
        ("PROTO=FOO", XCLIENT_ALL, "501 5.5.4 Bad PROTO syntax: FOO"),
        ("NAME=+ZZ", XCLIENT_ALL, "501 5.5.4 Bad NAME syntax: +ZZ"),
        ("NAME=bad_name!", XCLIENT_ALL, "501 5.5.4 Bad NAME syntax: bad_name!"),
        ("NAME=192.0.2.1", XCLIENT_ALL, "501 5.5.4 Bad NAME syntax: 192.0.2.1"),
        ("HELO=a+2", XCLIENT_ALL, "501 5.5.4 Bad HELO syntax: a+2"),
    ],
)
def test_xclient_error(arg: str, offered: str, expected: str | None) -> None:
    """Replies and verdicts as a real Postfix 3.7 gives them."""
    assert xclient_error(arg, offered) == expected


@pytest.mark.parametrize(
    ("address", "hosts", "expected"),
    [
        ("127.0.0.1", ("127.0.0.0/8", "::1/128"), True),
        ("::1", ("127.0.0.0/8", "::1/128"), True),
        ("IPV6:::1", ("127.0.0.0/8", "::1/128"), True),
        ("127.0.0.2", ("127.0.0.1/32",), False),
        ("203.0.113.5", ("127.0.0.0/8", "::1/128"), False),
        ("[UNAVAILABLE]", ("0.0.0.0/0",), False),
        ("IPV6:2001:db8::1", ("2001:db8::/32",), True),
    ],
)
def test_xclient_authorized(address: str, hosts: tuple[str, ...], expected: bool) -> None:
    assert xclient_authorized(address, hosts) is expected


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("NAME=a.example ADDR=192.0.2.1", "192.0.2.1"), ("HELO=x", None), ("ADDR=IPV6+3A::1", "IPV6:::1")],
)
def test_xclient_addr(arg: str, expected: str | None) -> None:
    assert xclient_addr(arg) == expected


# -- strictness over the wire -------------------------------------------------


def dialog(server: FakeUpstream, lines: list[bytes], hello: bytes = b"EHLO client.test") -> list[bytes]:
    """Send `lines` one by one after `hello`; return each reply's last line."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock, sock.makefile("rb") as f:
        assert read_reply(f)[0].startswith(b"220")
        sock.sendall(hello + b"\r\n")
        assert read_reply(f)[-1].startswith(b"250")
        answers = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            answers.append(read_reply(f)[-1])
        return answers


NO_UTF8 = {"extensions": without("SMTPUTF8")}
NO_8BIT = {"extensions": without("8BITMIME")}
DSN = {"extensions": (*DEFAULT_EXTENSIONS, "DSN")}
SIZE = {"size": 1000}

MAIL_CASES = [
    ({}, "MAIL FROM:<a@example.com>", "250 2.1.0"),
    ({}, "MAIL FROM:<>", "250 2.1.0"),
    ({}, "MAIL FROM: <a@example.com>", "250 2.1.0"),
    ({}, "MAIL FROM:a@example.com", "501 5.1.7"),
    ({}, "MAIL FROM:<a@example.com", "501 5.1.7"),
    ({}, "MAIL TO:<a@example.com>", "501 5.1.7"),
    ({}, "MAIL FROM:<a@example.com> SIZE=10", "555 5.5.4"),
    (SIZE, "MAIL FROM:<a@example.com> SIZE=10", "250 2.1.0"),
    (SIZE, "MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0"),
    (SIZE, "MAIL FROM:<a@example.com> SIZE=abc", "501 5.5.4"),
    (SIZE, "MAIL FROM:<a@example.com> SIZE=1 SIZE=2", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> BODY=8BITMIME", "250 2.1.0"),
    (NO_8BIT, "MAIL FROM:<a@example.com> BODY=8BITMIME", "555 5.5.4"),
    (NO_8BIT, "MAIL FROM:<a@example.com> BODY=7BIT", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> BODY=", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> SMTPUTF8", "250 2.1.0"),
    (NO_UTF8, "MAIL FROM:<a@example.com> SMTPUTF8", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> RET=HDRS", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> ENVID=QQ314159", "555 5.5.4"),
    (DSN, "MAIL FROM:<a@example.com> RET=HDRS ENVID=QQ314159", "250 2.1.0"),
    ({}, "MAIL FROM:<a@example.com> AUTH=<>", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com> XYZZY", "555 5.5.4"),
    ({}, "MAIL FROM:<ä@example.com>", "553 5.6.7"),
    ({}, "MAIL FROM:<ä@example.com> SMTPUTF8", "250 2.1.0"),
    (NO_UTF8, "MAIL FROM:<ä@example.com> SMTPUTF8", "555 5.5.4"),
    (NO_UTF8, "MAIL FROM:<ä@example.com>", "553 5.6.7"),
]


@pytest.mark.parametrize(("kwargs", "line", "expected"), MAIL_CASES)
def test_mail_parameters(fake_upstream: Factory, kwargs: dict, line: str, expected: str) -> None:
    server = fake_upstream(**kwargs)
    (answer,) = dialog(server, [line.encode()])
    assert answer.decode().startswith(expected), answer
    assert server.wait_for(lambda: server.sessions[0].closed)
    # Exactly the non-2xx answers are the client's fault here.
    assert server.refused_commands == ([] if expected.startswith("2") else [line])
    assert len(server.all_transactions) == (1 if expected.startswith("2") else 0)


RCPT_CASES = [
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "250 2.1.5"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO: <b@example.com>", "250 2.1.5"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:b@example.com", "501 5.1.3"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:<>", "501 5.1.3"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com> NOTIFY=NEVER", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com> ORCPT=rfc822;b@example.com", "555 5.5.4"),
    (DSN, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com> NOTIFY=NEVER ORCPT=rfc822;b@example.com",
     "250 2.1.5"),
    (DSN, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com> NOTIFY=SOMETIMES", "501 5.5.4"),
    (SIZE, "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com> SIZE=10", "555 5.5.4"),
    ({}, "MAIL FROM:<a@example.com>", "RCPT TO:<ü@example.com>", "553 5.6.7"),
    ({}, "MAIL FROM:<a@example.com> SMTPUTF8", "RCPT TO:<ü@example.com>", "250 2.1.5"),
]


@pytest.mark.parametrize(("kwargs", "mail", "rcpt", "expected"), RCPT_CASES)
def test_rcpt_parameters(fake_upstream: Factory, kwargs: dict, mail: str, rcpt: str, expected: str) -> None:
    server = fake_upstream(**kwargs)
    mail_answer, answer = dialog(server, [mail.encode(), rcpt.encode()])
    assert mail_answer.startswith(b"250 ")
    assert answer.decode().startswith(expected), answer
    assert server.refused_commands == ([] if expected.startswith("2") else [rcpt])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:<a@example.com>", "250 2.1.0"),
        ("MAIL FROM:<a@example.com> SIZE=10", "555 5.5.4"),
        ("MAIL FROM:<a@example.com> BODY=8BITMIME", "555 5.5.4"),
        ("MAIL FROM:<a@example.com> SMTPUTF8", "555 5.5.4"),
        ("MAIL FROM:<ä@example.com>", "553 5.6.7"),
    ],
)
def test_helo_client_gets_no_extensions(fake_upstream: Factory, line: str, expected: str) -> None:
    server = fake_upstream(size=1000)
    (answer,) = dialog(server, [line.encode()], hello=b"HELO client.test")
    assert answer.decode().startswith(expected), answer


def test_scripted_ehlo_reply_is_what_is_enforced(fake_upstream: Factory) -> None:
    """The session follows the EHLO reply that went out, even a scripted one."""
    server = fake_upstream(replies={"ehlo": "250-fake.upstream\r\n250 SIZE 100"})
    answers = dialog(server, [
        b"MAIL FROM:<a@example.com> SIZE=101",
        b"MAIL FROM:<a@example.com> BODY=8BITMIME",
        b"MAIL FROM:<a@example.com> SIZE=100",
    ])
    assert [a[:9] for a in answers] == [b"552 5.3.4", b"555 5.5.4", b"250 2.1.0"]
    assert server.refused_commands == ["MAIL FROM:<a@example.com> BODY=8BITMIME"]  # 552 is policy


def test_size_over_limit_is_policy_not_refusal(fake_upstream: Factory) -> None:
    server = fake_upstream(size=1000)
    (answer,) = dialog(server, [b"MAIL FROM:<a@example.com> SIZE=1001"])
    assert answer == b"552 5.3.4 Message size exceeds fixed limit"
    assert server.refused_commands == []


def test_scripted_reply_never_hides_a_refusal(fake_upstream: Factory) -> None:
    server = fake_upstream(replies={"mail": "250 2.1.0 anything goes", "rcpt": "250 2.1.5 sure"})
    answers = dialog(server, [b"RCPT TO:<b@example.com>", b"MAIL FROM:<a@example.com> FOO=bar"])
    assert answers == [b"503 5.5.1 Error: need MAIL command", b"555 5.5.4 Unsupported option: FOO=bar"]
    assert server.refused_commands == ["RCPT TO:<b@example.com>", "MAIL FROM:<a@example.com> FOO=bar"]


def test_unknown_command_refused_unless_scripted(fake_upstream: Factory) -> None:
    server = fake_upstream(replies={"vrfy": "252 2.0.0 maybe"})
    assert dialog(server, [b"VRFY bob", b"BDAT 10 LAST", b"ETRN example.com"]) == [
        b"252 2.0.0 maybe",
        b"502 5.5.2 Error: command not recognized",
        b"502 5.5.2 Error: command not recognized",
    ]
    assert server.refused_commands == ["BDAT 10 LAST", "ETRN example.com"]


@pytest.mark.parametrize(
    ("kwargs", "line", "expected"),
    [
        ({}, b"NOOP " + b"x" * (MAX_COMMAND_OCTETS - 5), b"250 2.0.0 Ok"),
        ({}, b"NOOP " + b"x" * (MAX_COMMAND_OCTETS - 4), b"500 5.5.2 Error: line too long"),
        ({}, b"NOOP a\rb", b"500 5.5.2 Error: bad syntax"),
        ({}, b"NOOP a\0b", b"500 5.5.2 Error: bad syntax"),
        ({}, b"MAIL FROM:<a\0@example.com>", b"500 5.5.2 Error: bad syntax"),
        ({}, b"NOOP \xff", b"500 5.5.2 Error: bad UTF-8 syntax"),
        (NO_UTF8, b"NOOP \xff", b"250 2.0.0 Ok"),
        ({}, b"", b"500 5.5.2 Error: bad syntax"),
    ],
)
def test_command_line_syntax(fake_upstream: Factory, kwargs: dict, line: bytes, expected: bytes) -> None:
    server = fake_upstream(**kwargs)
    assert dialog(server, [line]) == [expected]
    assert len(server.refused_commands) == (0 if expected.startswith(b"2") else 1)


def test_bare_lf_ends_a_command_as_in_postfix(fake_upstream: Factory) -> None:
    server = fake_upstream()
    with raw_client(server) as (sock, f):
        sock.sendall(b"NOOP\n")
        assert read_reply(f) == [b"250 2.0.0 Ok"]
    assert server.refused_commands == []


@pytest.mark.parametrize(
    ("kwargs", "line", "expected"),
    [
        ({"xclient": "ADDR"}, b"XCLIENT ADDR=192.0.2.1", b"220 fake.upstream ESMTP"),
        ({"xclient": "ADDR"}, b"XCLIENT NAME=mx.example.org", b"501 5.5.4 Bad XCLIENT attribute name: NAME"),
        ({"xclient": "ADDR"}, b"XCLIENT ADDR=::1", b"501 5.5.4 Bad ADDR syntax: ::1"),
        ({}, b"XCLIENT ADDR=192.0.2.1", b"502 5.5.2 Error: command not recognized"),
        ({}, b"STARTTLS", b"502 5.5.1 Error: command not implemented"),
    ],
)
def test_xclient_and_starttls_only_as_offered(fake_upstream: Factory, kwargs: dict, line: bytes,
                                              expected: bytes) -> None:
    server = fake_upstream(**kwargs)
    assert dialog(server, [line]) == [expected]
    assert len(server.refused_commands) == (0 if expected.startswith(b"2") else 1)


def test_xclient_needs_ehlo_offer_not_just_configuration(fake_upstream: Factory) -> None:
    server = fake_upstream(xclient="ADDR")
    (answer,) = dialog(server, [b"XCLIENT ADDR=192.0.2.1"], hello=b"HELO client.test")
    assert answer == b"502 5.5.2 Error: command not recognized"


def test_several_xclient_commands_in_a_row(fake_upstream: Factory) -> None:
    """Postfix takes XCLIENT after XCLIENT without a new EHLO (long values need several)."""
    server = fake_upstream(xclient="NAME ADDR HELO")
    answers = dialog(server, [b"XCLIENT HELO=x.example", b"XCLIENT ADDR=127.0.0.2", b"XCLIENT NAME=a.example",
                              b"EHLO x.example"])
    assert answers == [b"220 fake.upstream ESMTP"] * 3 + [b"250 SMTPUTF8"]
    assert server.refused_commands == []


@pytest.mark.parametrize("addr", [b"203.0.113.5", b"IPV6:2001:db8::5", b"[UNAVAILABLE]"])
def test_xclient_addr_outside_authorized_hosts_ends_xclient(fake_upstream: Factory, addr: bytes) -> None:
    """As Postfix: XCLIENT_README says to send ADDR last, because it re-checks authorization."""
    server = fake_upstream(xclient="NAME ADDR HELO")
    with raw_client(server) as (sock, f):
        sock.sendall(b"XCLIENT ADDR=" + addr + b"\r\n")
        assert read_reply(f) == [b"220 fake.upstream ESMTP"]
        sock.sendall(b"XCLIENT HELO=x.example\r\n")
        assert read_reply(f) == [b"550 5.7.0 Error: insufficient authorization"]
        sock.sendall(b"EHLO x.example\r\n")
        assert not any(line.upper().startswith(b"250-XCLIENT") for line in read_reply(f))
    assert server.refused_commands == ["XCLIENT HELO=x.example"]


def test_xclient_not_offered_to_an_unauthorized_peer(fake_upstream: Factory) -> None:
    server = fake_upstream(xclient="NAME ADDR", xclient_hosts=("192.0.2.0/24",))
    with socket.create_connection((server.host, server.port), timeout=5) as sock, sock.makefile("rb") as f:
        read_reply(f)
        sock.sendall(b"EHLO client.test\r\nXCLIENT ADDR=192.0.2.1\r\n")
        assert not any(b"XCLIENT" in line for line in read_reply(f))
        assert read_reply(f) == [b"550 5.7.0 Error: insufficient authorization"]


def test_advertised_parameters_pass_end_to_end(fake_upstream: Factory) -> None:
    """smtplib uses every extension the fake offers; none of it is refused."""
    server = fake_upstream(size=100_000, extensions=(*DEFAULT_EXTENSIONS, "DSN"))
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        refused = client.sendmail(
            "ä@example.com",
            ["ü@example.com"],
            "Subject: ü\r\n\r\nbody\r\n".encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME", "RET=HDRS", "ENVID=id+2B1"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;u+40example.com"],
        )
    assert refused == {}
    (txn,) = server.completed_transactions
    assert txn.mail_from.startswith("mail FROM:<ä@example.com> size=")
    assert server.refused_commands == []


def test_refused_commands_cover_every_session(fake_upstream: Factory) -> None:
    server = fake_upstream()
    dialog(server, [b"MAIL FROM:<a@example.com> SIZE=1"])
    dialog(server, [b"MAIL FROM:<a@example.com> RET=FULL"])
    assert server.refused_commands == ["MAIL FROM:<a@example.com> SIZE=1", "MAIL FROM:<a@example.com> RET=FULL"]
    assert [s.refused for s in server.sessions] == [[c] for c in server.refused_commands]


# -- 421 closes the channel ---------------------------------------------------

BUSY = "421 4.3.2 fake.upstream busy"
STEPS_421 = ["greeting", "ehlo", "mail", "rcpt", "data", "dot"]


def _drive_to(step: str, sock: socket.socket, f: BinaryIO) -> list[bytes]:
    """Walk a transaction up to `step` and return the reply to it."""
    script = [
        ("ehlo", b"EHLO client.test\r\n"),
        ("mail", b"MAIL FROM:<a@example.com>\r\n"),
        ("rcpt", b"RCPT TO:<b@example.com>\r\n"),
        ("data", b"DATA\r\n"),
        ("dot", b"hello\r\n.\r\n"),
    ]
    reply = read_reply(f)
    for name, line in script:
        if step == "greeting":
            break
        sock.sendall(line)
        reply = read_reply(f)
        if name == step:
            break
    return reply


@pytest.mark.parametrize("multiline", [False, True], ids=["one-line", "multi-line"])
@pytest.mark.parametrize("step", STEPS_421)
def test_421_closes_the_connection_at_once(fake_upstream: Factory, step: str, multiline: bool) -> None:
    text = f"421-4.3.2 first line\r\n{BUSY}" if multiline else BUSY
    server = fake_upstream(
        greeting=text if step == "greeting" else "220 fake.upstream ESMTP",
        replies={} if step == "greeting" else {step: text},
    )
    with socket.create_connection((server.host, server.port), timeout=5) as sock, sock.makefile("rb") as f:
        assert _drive_to(step, sock, f)[-1] == BUSY.encode()
        started = time.monotonic()
        assert f.read() == b""  # EOF right after the 421 line, no waiting for the client
        assert time.monotonic() - started < LINGER_AFTER_421 / 2
        sock.sendall(b"NOOP\r\n")  # talking after the 421 reaches nobody
    assert server.wait_for(lambda: server.sessions[0].closed)
    session = server.sessions[0]
    assert "NOOP" not in session.commands
    assert b"NOOP" not in session.raw
    assert bytes(session.after_421) == b"NOOP\r\n"


def test_421_after_pipelined_commands_answers_none_of_them(fake_upstream: Factory) -> None:
    """Commands already pipelined behind the one that got 421 are never answered."""
    server = fake_upstream(replies={"mail": BUSY})
    with raw_client(server) as (sock, f):
        sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert read_reply(f) == [BUSY.encode()]
        assert f.read() == b""
    assert server.wait_for(lambda: server.sessions[0].closed)
    assert server.sessions[0].commands[-1] == "MAIL FROM:<a@example.com>"
    assert server.all_transactions == []


def test_silent_client_after_421_is_dropped_after_linger(fake_upstream: Factory) -> None:
    server = fake_upstream(greeting=BUSY)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        assert sock.recv(1024) == BUSY.encode() + b"\r\n"
        assert server.wait_for(lambda: server.sessions[0].closed, timeout=LINGER_AFTER_421 + 2)
        assert bytes(server.sessions[0].after_421) == b""


# -- hostile options: unsolicited replies, data interjection, dribbling ------------


def test_unsolicited_text_follows_the_reply_in_the_same_write(fake_upstream: Factory) -> None:
    server = fake_upstream(unsolicited={"rcpt": "250 2.1.5 and once more"})
    with raw_client(server) as (sock, f):
        sock.sendall(b"MAIL FROM:<a@example.com>\r\n")
        assert read_reply(f) == [b"250 2.1.0 Ok"]
        sock.sendall(b"RCPT TO:<b@example.com>\r\n")
        assert read_reply(f) == [b"250 2.1.5 Ok"]
        assert read_reply(f) == [b"250 2.1.5 and once more"]  # nobody asked for this one
        sock.sendall(b"NOOP\r\n")
        assert read_reply(f) == [b"250 2.0.0 Ok"]  # other steps are unaffected


def test_unsolicited_text_after_the_greeting(fake_upstream: Factory) -> None:
    server = fake_upstream(unsolicited={"greeting": "250 pregreet"})
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        f = sock.makefile("rb")
        assert read_reply(f) == [b"220 fake.upstream ESMTP"]
        assert read_reply(f) == [b"250 pregreet"]


def test_data_interjection_goes_out_after_n_octets_and_the_dot_is_answered(fake_upstream: Factory) -> None:
    server = fake_upstream(data_interjection=(10, "250 2.0.0 early"), replies={"dot": "550 5.7.1 no"})
    with raw_client(server) as (sock, f):
        for line in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            read_reply(f)
        sock.sendall(b"Subject: 12")  # 11 octets: the interjection is due
        assert server.interjected.wait(5)
        assert read_reply(f) == [b"250 2.0.0 early"]
        sock.sendall(b"\r\n\r\nbody\r\n.\r\n")
        assert read_reply(f) == [b"550 5.7.1 no"]
    assert server.wait_for(lambda: server.sessions[0].closed)
    (txn,) = server.all_transactions
    assert txn.completed and txn.data == b"Subject: 12\r\n\r\nbody\r\n"


def test_no_interjection_before_enough_data(fake_upstream: Factory) -> None:
    server = fake_upstream(data_interjection=(1000, "250 early"))
    with raw_client(server) as (sock, f):
        for line in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            read_reply(f)
        sock.sendall(b"short\r\n")
        assert not server.interjected.wait(0.3)
        sock.sendall(b".\r\n")  # the end of the data comes first: then it is sent before the dot's reply
        assert read_reply(f) == [b"250 early"]
        assert read_reply(f)[0].startswith(b"250 2.0.0 Ok: queued as")


def test_dribble_sends_one_byte_at_a_time(fake_upstream: Factory) -> None:
    server = fake_upstream(dribble={"greeting": 0.05}, greeting="220 slow")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        started = time.monotonic()
        received = b""
        chunks = 0
        while not received.endswith(b"\r\n"):
            chunk = sock.recv(100)
            assert chunk
            received += chunk
            chunks += 1
    assert received == b"220 slow\r\n"
    # 10 bytes with 9 pauses of 0.05 s; reads may coalesce bytes, but not all of them.
    assert time.monotonic() - started >= 0.4
    assert chunks >= 3


def test_dribble_stops_with_the_server(fake_upstream: Factory) -> None:
    server = FakeUpstream(dribble={"greeting": 5.0}).start()
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        assert sock.recv(10) == b"2"
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3.0
    finally:
        sock.close()


def test_data_interjection_bytes_are_sent_raw(fake_upstream: Factory) -> None:
    server = fake_upstream(data_interjection=(1, b"2"))
    with raw_client(server) as (sock, f):
        for line in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            read_reply(f)
        sock.sendall(b"x\r\n")
        assert server.interjected.wait(5)
        sock.sendall(b".\r\n")
        assert f.readline().startswith(b"2250 2.0.0 Ok: queued as")  # no line end after the raw "2"

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
from fakeupstream import FakeUpstream

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
    server = fake_upstream(rcpt_replies={"no@example.com": "550 5.1.1 nope"})
    with raw_client(server) as (sock, f):
        sock.sendall(
            b"MAIL FROM:<a@example.com> SIZE=5\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<no@example.com>\r\n"
            b"RCPT TO:<c@example.com> NOTIFY=NEVER\r\n"
            b"DATA\r\n"
        )
        replies = [read_reply(f)[0][:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"550", b"250", b"354"]
        sock.sendall(b"hello\r\n.\r\nRSET\r\nNOOP\r\nBOGUS\r\nQUIT\r\n")
        replies = [read_reply(f)[0][:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"250", b"502", b"221"]
    (txn,) = server.completed_transactions
    assert txn.mail_from == "MAIL FROM:<a@example.com> SIZE=5"
    assert txn.rcpts == [
        "RCPT TO:<b@example.com>",
        "RCPT TO:<c@example.com> NOTIFY=NEVER",
    ]
    assert txn.data == b"hello\r\n"


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
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
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

"""The private Postfix really is the upstream Willi's interop tests need.

Talks to Postfix with plain smtplib from 127.0.0.2, the way Willi will: the
instance must offer STARTTLS and XCLIENT, honour XCLIENT after TLS, and write
the client's identity into the Received: header of the delivered message.
"""

from __future__ import annotations

import email
import smtplib
import socket
import ssl
from collections.abc import Iterator

import postfix_harness
import pytest
from certs import TestPKI
from postfix_harness import PostfixInstance, postfix_upstream

SOURCE = ("127.0.0.2", 0)


@pytest.fixture(scope="module")
def postfix(pki: TestPKI) -> Iterator[PostfixInstance]:
    """One instance for the module; delivered() consumes, so tests stay apart."""
    with postfix_upstream(pki.cert_file, pki.key_file) as instance:
        yield instance


def connect(instance: PostfixInstance) -> smtplib.SMTP:
    """An smtplib client from 127.0.0.2, an authorized XCLIENT host."""
    return smtplib.SMTP(
        "127.0.0.1", instance.port, local_hostname="relay.willi.test", source_address=SOURCE, timeout=10
    )


@pytest.mark.postfix
def test_ehlo_offers_starttls_and_xclient(postfix: PostfixInstance) -> None:
    with connect(postfix) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("starttls")
        assert client.has_extn("xclient")
        for attribute in ("ADDR", "NAME", "HELO", "PROTO", "PORT"):
            assert attribute in client.esmtp_features["xclient"].split()


@pytest.mark.postfix
def test_xclient_after_starttls_shows_in_received_header(postfix: PostfixInstance, pki: TestPKI) -> None:
    with connect(postfix) as client:
        client.ehlo()
        client.starttls(context=pki.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("xclient")
        code, text = client.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP")
        assert code == 220, text
        # Postfix takes the HELO name from this EHLO, overriding XCLIENT's
        # HELO= (see the next test), so a proxy repeats the client's name.
        code, _ = client.ehlo("client.example")
        assert code == 250
        client.sendmail("sender@sender.example", ["bob@example.test"], b"Subject: interop\r\n\r\nhello postfix\r\n")

    [raw] = postfix.delivered()
    message = email.message_from_bytes(raw)
    received = " ".join(message.get_all("Received", []))
    assert "from client.example (unknown [192.0.2.7])" in " ".join(received.split()), received
    assert "127.0.0.2" not in received
    assert message["Delivered-To"] == "bob@example.test"
    assert message["Subject"] == "interop"
    assert raw.endswith(b"\n\nhello postfix\n")


@pytest.mark.postfix
def test_ehlo_after_xclient_overrides_helo_attribute(postfix: PostfixInstance) -> None:
    """Pins a Postfix behaviour Willi must live with: the last EHLO wins."""
    with connect(postfix) as client:
        client.ehlo()
        code, text = client.docmd("XCLIENT", "ADDR=192.0.2.8 NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP")
        assert code == 220, text
        client.ehlo("relay.willi.test")
        client.sendmail("sender@sender.example", ["carol@example.com"], b"Subject: helo\r\n\r\nx\r\n")

    [raw] = postfix.delivered()
    received = " ".join(" ".join(email.message_from_bytes(raw).get_all("Received", [])).split())
    assert "from relay.willi.test (unknown [192.0.2.8])" in received, received
    assert "client.example" not in received


@pytest.mark.postfix
def test_xclient_accepts_ipv6_address(postfix: PostfixInstance) -> None:
    """IPv6 clients are passed as ADDR=IPV6:...; needs inet_protocols=all."""
    with connect(postfix) as client:
        client.ehlo()
        code, text = client.docmd("XCLIENT", "ADDR=IPV6:2001:db8::7 NAME=[UNAVAILABLE] HELO=v6.example PORT=40312")
        assert code == 220, text
        client.ehlo("v6.example")
        client.sendmail("sender@sender.example", ["dave@example.com"], b"Subject: v6\r\n\r\nx\r\n")

    [raw] = postfix.delivered()
    received = " ".join(" ".join(email.message_from_bytes(raw).get_all("Received", [])).split())
    assert "from v6.example (unknown [IPv6:2001:db8::7])" in received, received


def require_ipv6_loopback() -> None:
    """IPv6 loopback is required; without ::1 this skips (a failure in CI, by conftest.py)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"IPv6 loopback ::1 is required but cannot be bound here: {err}")


@pytest.mark.postfix
def test_listens_on_ipv6_loopback_when_asked(pki: TestPKI) -> None:
    require_ipv6_loopback()
    with postfix_upstream(pki.cert_file, pki.key_file, listen_ipv6=True) as instance:
        with smtplib.SMTP("::1", instance.port, timeout=10) as client:
            assert client.ehlo()[0] == 250
            assert client.has_extn("xclient")


@pytest.mark.postfix
def test_reject_and_relay_are_refused_at_rcpt(postfix: PostfixInstance) -> None:
    with connect(postfix) as client:
        client.ehlo()
        client.mail("sender@sender.example")
        assert client.rcpt("reject@example.com")[0] == 550
        assert client.rcpt("defer@example.com")[0] == 450
        assert client.rcpt("someone@elsewhere.example")[0] == 554  # never relays
        client.rset()


def test_missing_postfix_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interop tests may skip on a laptop, never in CI."""
    monkeypatch.setattr(postfix_harness, "POSTFIX", "/nonexistent/postfix")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        postfix_harness.require_postfix()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        postfix_harness.require_postfix()

"""Willi in front of a real Postfix: XCLIENT and STARTTLS against the real thing.

The client connects from 127.0.0.2 and uses STARTTLS with Willi; Willi uses
STARTTLS (verified) and XCLIENT with Postfix. The Received: header Postfix
writes must name the client's HELO and 127.0.0.2, which only XCLIENT can
have told it, and say that Postfix itself received over TLS.
"""

from __future__ import annotations

import email
import re
import smtplib
from collections.abc import Iterator

import pytest
from certs import TestPKI
from postfix_harness import PostfixInstance, postfix_upstream
from support import RunningWilli, willi_config

pytestmark = pytest.mark.postfix

CLIENT_HELO = "client.sender.example"


@pytest.fixture(scope="module")
def postfix(pki: TestPKI) -> Iterator[PostfixInstance]:
    with postfix_upstream(pki.cert_file, pki.key_file) as instance:
        yield instance


@pytest.fixture
def proxy(willi, postfix: PostfixInstance, pki: TestPKI) -> RunningWilli:
    mappings = f'[[mappings]]\ntype = "static"\nserver = "localhost:{postfix.port}"\ntls_verify = true\n'
    extra = (f'tls_cert = "{pki.cert_file}"\ntls_key = "{pki.key_file}"\nupstream_tls_ca = "{pki.ca_file}"\n'
             'upstream_command_timeout = "20s"\n')
    return willi(config=willi_config(mappings=mappings, extra=extra))


def client_from_127_0_0_2(proxy: RunningWilli, pki: TestPKI) -> smtplib.SMTP:
    client = smtplib.SMTP(proxy.host, proxy.port, local_hostname=CLIENT_HELO,
                          source_address=("127.0.0.2", 0), timeout=30)
    client.ehlo()
    client.starttls(context=pki.client_context())
    client.ehlo()
    return client


def test_received_header_names_the_real_client(proxy, postfix, pki) -> None:
    with client_from_127_0_0_2(proxy, pki) as client:
        refused = client.sendmail("alice@sender.example", ["bob@example.com"],
                                  b"Subject: through Willi\r\n\r\nHello Postfix.\r\n")
        assert refused == {}
    [raw] = postfix.delivered(count=1)
    message = email.message_from_bytes(raw)
    received = " ".join(message.get_all("Received")[0].split())
    assert CLIENT_HELO in received, received
    assert "127.0.0.2" in received, f"XCLIENT ADDR did not reach Postfix: {received}"
    assert "using TLS" in received, f"Willi -> Postfix was not TLS: {received}"
    assert message.get_payload().strip() == "Hello Postfix."


def test_final_reply_is_postfix_own_queue_id(proxy, postfix, pki) -> None:
    """The 250 after the dot is Postfix's own reply: its queue id is the one Postfix gave the message."""
    with client_from_127_0_0_2(proxy, pki) as client:
        client.mail("alice@sender.example")
        assert client.rcpt("carol@example.net")[0] == 250
        code, text = client.data(b"Subject: queue id\r\n\r\nx\r\n")
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", text)
    assert code == 250 and match, text
    queue_id = match.group(1).decode()
    [raw] = postfix.delivered(count=1)
    received = " ".join(email.message_from_bytes(raw).get_all("Received")[0].split())
    assert re.search(rf"\bwith ESMTPS id {queue_id}\b", received), (queue_id, received)
    assert re.search(rf": {queue_id}: client=unknown\[127\.0\.0\.2\]", postfix.log_tail(200)), postfix.log_tail()


@pytest.mark.parametrize(("recipient", "code", "text"), [
    ("reject@example.com", 550,
     b"5.1.1 <reject@example.com>: Recipient address rejected: Recipient rejected by the test upstream"),
    ("defer@example.com", 450,
     b"4.2.1 <defer@example.com>: Recipient address rejected: Recipient deferred by the test upstream"),
])
def test_postfix_refusals_reach_the_client_verbatim(proxy, pki, recipient, code, text) -> None:
    with client_from_127_0_0_2(proxy, pki) as client:
        client.mail("alice@sender.example")
        assert client.rcpt(recipient) == (code, text)

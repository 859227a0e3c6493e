"""The simplest full path: smtplib -> Willi -> fake upstream."""

from __future__ import annotations


def test_message_passes_through(willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = willi(upstream_port=upstream.port)
    with w.smtp() as client:
        client.ehlo("client.example")
        client.sendmail("a@sender.example", ["bob@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
    assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)
    assert upstream.completed_transactions[0].data == b"Subject: hi\r\n\r\nbody\r\n"

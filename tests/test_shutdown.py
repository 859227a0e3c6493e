"""Graceful stop: idle clients hear 421 4.3.2, a transaction in flight completes."""

from __future__ import annotations

import threading
import time

from support import RunningWilli


def test_idle_client_gets_421_on_stop(willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w: RunningWilli = willi(upstream_port=upstream.port)
    client = w.raw()
    client.ehlo()
    started = time.monotonic()
    w.service.stop(timeout=5.0)
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("4.3.2")
    assert client.closed()
    assert time.monotonic() - started < 3.0, "an idle client must not hold up the stop"


def test_idle_tls_client_gets_421_over_tls(willi, fake_upstream, pki) -> None:
    upstream = fake_upstream()
    w = willi(upstream_port=upstream.port, extra=f'tls_cert = "{pki.cert_file}"\ntls_key = "{pki.key_file}"')
    client = w.raw()
    client.ehlo()
    client.send("STARTTLS\r\n")
    client.expect(220)
    client.starttls(pki.client_context())
    client.send("EHLO client.example\r\n")
    client.expect(250)
    w.service.stop(timeout=5.0)
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("4.3.2")


def test_transaction_in_flight_completes_before_stop(willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = willi(upstream_port=upstream.port)
    client = w.raw()
    client.ehlo()
    client.send("MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    client.expect(250)
    client.expect(250)
    client.expect(354)
    client.send("Subject: slow\r\n\r\nfirst half\r\n")
    stopper = threading.Thread(target=w.service.stop, kwargs={"timeout": 10.0})
    stopper.start()
    time.sleep(0.5)
    assert stopper.is_alive(), "stop must wait for the message in flight"
    client.send("second half\r\n.\r\n")
    code, lines = client.reply()
    assert code == 250 and "queued as" in lines[0]
    code, lines = client.reply()
    assert code == 421 and lines[0].startswith("4.3.2")
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert upstream.completed_transactions[0].data.endswith(b"second half\r\n")


def test_new_connections_refused_after_stop(willi, fake_upstream) -> None:
    upstream = fake_upstream()
    w = willi(upstream_port=upstream.port)
    port = w.port
    w.service.stop(timeout=1.0)
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_reload_closes_the_old_runtime_after_its_last_session(willi, fake_upstream, monkeypatch) -> None:
    from willi.server import Runtime

    upstream = fake_upstream()
    w = willi(upstream_port=upstream.port)
    closed: list[Runtime] = []
    monkeypatch.setattr(Runtime, "close", lambda self: closed.append(self))
    old = w.service.runtime
    client = w.raw()
    client.ehlo()  # this session holds the old runtime
    w.service.reload(Runtime.build(w.config))
    assert closed == [], "a runtime in use by a session must stay open"
    client.cmd("QUIT")
    client.close()
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed == [old]
    new = w.service.runtime
    w.service.reload(Runtime.build(w.config))
    assert closed == [old, new], "an unused runtime closes at once"

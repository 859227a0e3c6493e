"""A real Postfix as the *sender*, and Willi's 452 4.5.3 for a recipient on another route.

Willi answers a recipient whose route differs from the transaction's first
recipient's with `452 4.5.3`, so the sender must deliver it in a separate
transaction. How soon depends on the sender: Postfix moves such a recipient
to the next address of the destination within the same delivery, but when
the destination has only one address it defers the recipient to its next
queue run (300 s by default). So the MX name should have at least two
addresses that reach Willi (README, "Running several Willis").

Willi listens on 127.0.0.1:P and 127.0.0.2:P; a private Postfix (own config
directory, high port, Postfix's default retry timing) relays to
`[127.0.0.1]:P, [127.0.0.2]:P` or to `[127.0.0.1]:P` only; two fake
upstreams stand for the two routes.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import free_port
from fakeupstream import FakeUpstream
from postfix_harness import PostfixInstance, postfix_sender
from proxy_helpers import csv_mapping, make_config, write_csv

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

FAST = 15.0  # with two addresses both upstreams must have the message well within this
SLOW_WATCH = 10.0  # with one address the second upstream must still be without it after this
RECIPIENTS = ("alice@one.test", "bob@two.test")


@pytest.fixture
def routes(fake_upstream, tmp_path: Path) -> Iterator[tuple[FakeUpstream, FakeUpstream, Path]]:
    one, two = fake_upstream(), fake_upstream()
    table = tmp_path / "routes.csv"
    write_csv(table, [("one.test", f"127.0.0.1:{one.port}"), ("two.test", f"127.0.0.1:{two.port}")])
    yield one, two, table


def start_willi(willi, tmp_path: Path, table: Path) -> int:
    """Willi on the same port of 127.0.0.1 and 127.0.0.2 (two addresses of one MX); the port."""
    port = free_port()
    w = willi(config=make_config(tmp_path, [csv_mapping(table)], listen=[f"127.0.0.1:{port}", f"127.0.0.2:{port}"],
                                 xclient=False))
    assert {address[:2] for address in w.service.addresses} == {("127.0.0.1", port), ("127.0.0.2", port)}
    return port


def inject(sender: PostfixInstance) -> float:
    """One message to both recipients, handed to the sending Postfix; when it was queued."""
    body = (b"From: <carol@client.example>\r\nSubject: split\r\nMessage-ID: <split-test@client.example>\r\n"
            b"\r\nOne message, two routes.\r\n")
    with smtplib.SMTP("127.0.0.1", sender.port, timeout=15) as client:
        refused = client.sendmail("carol@client.example", list(RECIPIENTS), body)
    assert refused == {}
    return time.monotonic()


def has_message(upstream: FakeUpstream, recipient: str) -> bool:
    return any(f"RCPT TO:<{recipient}>" in tx.rcpts and b"split-test@client.example" in tx.data
               for tx in upstream.completed_transactions)


def test_two_addresses_deliver_the_split_recipient_at_once(willi, routes, pki, tmp_path: Path) -> None:
    one, two, table = routes
    port = start_willi(willi, tmp_path, table)
    with postfix_sender(pki.cert_file, pki.key_file, f"[127.0.0.1]:{port}, [127.0.0.2]:{port}") as sender:
        queued = inject(sender)
        both = one.wait_for(lambda: has_message(one, RECIPIENTS[0]) and has_message(two, RECIPIENTS[1]), FAST)
        seconds = time.monotonic() - queued
        assert both, (f"not both upstreams within {FAST:g}s; one={[t.rcpts for t in one.completed_transactions]} "
                      f"two={[t.rcpts for t in two.completed_transactions]}\n{sender.log_tail()}")
        log = sender.log_text()
    print(f"\nPOSTFIX-SENDER two addresses: both upstreams had the message after {seconds:.2f}s")
    # The first address took alice and said 452 4.5.3 for bob; Postfix gave bob to the second address.
    assert f"to=<{RECIPIENTS[1]}>, relay=127.0.0.2[127.0.0.2]:{port}" in log, log
    assert f"to=<{RECIPIENTS[0]}>, relay=127.0.0.1[127.0.0.1]:{port}" in log, log
    assert "452 4.5.3" in log, log  # Postfix saw the split and logged why it moved on
    assert len(one.completed_transactions) == 1 and len(two.completed_transactions) == 1
    print("POSTFIX-SENDER two addresses, the sender's log:\n" + "\n".join(
        line for line in log.splitlines() if "to=<" in line))


def test_one_address_defers_the_split_recipient_to_the_next_queue_run(willi, routes, pki, tmp_path: Path) -> None:
    one, two, table = routes
    port = start_willi(willi, tmp_path, table)
    with postfix_sender(pki.cert_file, pki.key_file, f"[127.0.0.1]:{port}") as sender:
        queued = inject(sender)
        assert one.wait_for(lambda: has_message(one, RECIPIENTS[0]), FAST), sender.log_tail()
        first = time.monotonic() - queued
        time.sleep(max(0.0, SLOW_WATCH - first))
        assert not has_message(two, RECIPIENTS[1]), "the split recipient arrived although it should wait"
        waited = time.monotonic() - queued
        log = sender.log_text()
        queue = sender.queue()
    print(f"\nPOSTFIX-SENDER one address: first upstream after {first:.2f}s; the second had nothing "
          f"after {waited:.1f}s (deferred to the next queue run)")
    assert two.completed_transactions == []
    deferred = [line for line in log.splitlines() if f"to=<{RECIPIENTS[1]}>" in line and "status=deferred" in line]
    assert deferred and "452 4.5.3" in deferred[0], log
    assert RECIPIENTS[1] in queue and "4.5.3" in queue, queue  # still queued, with Willi's reason
    assert RECIPIENTS[0] not in queue  # alice is done: only bob is left in the queue
    print(f"POSTFIX-SENDER one address, postqueue -p:\n{queue.strip()}")

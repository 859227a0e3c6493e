"""Issue 7, points 7 and 8: upstream replies are checked, not trusted.

Point 7. The client's 2xx after its final dot comes only from the
upstream's reply to *that dot* (design.md, DATA invariant 1). An upstream
that speaks during the data phase (an early `250` after 354, then `550` for
the dot) has committed a protocol error: Willi sends no dot, the client
hears 451 4.5.0, and the connection is never reused. The same for a second
reply to one command and for data after (or mixed into) the greeting.

Point 8. Each upstream reply has a deadline for the whole reply: a reply
dribbled a byte at a time is cut at the configured timeout (connect for the
greeting, command for EHLO/MAIL/RCPT/DATA, data for the dot), and the
client hears 451 in that time, not after the last byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream, RecordedSession, without
from proxy_helpers import static_mapping
from security_helpers import open_transaction, start, transaction_lines
from support import RawClient, RunningWilli, printable_id

MARGIN = 2.5
Factory = Callable[..., FakeUpstream]


def after_data(session: RecordedSession) -> bytes:
    """What the upstream received after the DATA command line."""
    raw = bytes(session.raw)
    index = raw.upper().find(b"\r\nDATA\r\n")
    assert index >= 0, raw[-200:]
    return raw[index + len(b"\r\nDATA\r\n"):]


def closed_sessions(upstream: FakeUpstream, count: int) -> bool:
    return upstream.wait_for(lambda: len(upstream.sessions) >= count
                             and all(s.closed for s in upstream.sessions[:count]))


@pytest.fixture
def pooled(tmp_path: Path) -> Iterator[Callable[[FakeUpstream], RunningWilli]]:
    """Willi with upstream connection reuse on (the fake offers no XCLIENT), so "not reused" is tested."""
    started: list[RunningWilli] = []

    def factory(upstream: FakeUpstream, **settings: object) -> RunningWilli:
        w = start(tmp_path, [static_mapping(upstream.port)], upstream_reuse=True, **settings)
        started.append(w)
        return w

    yield factory
    for w in started:
        w.stop()


def begin_data(client: RawClient, recipient: str = "b@example.com") -> tuple[int, list[str]]:
    assert client.cmd(f"RCPT TO:<{recipient}>")[0] == 250
    return client.cmd("DATA")


# ---------------------------------------------------------------- point 7: speaking during DATA

INTERJECTIONS = [
    "250 2.0.0 Ok: queued as EARLY",                 # the false verdict itself
    "550 5.7.1 early rejection",
    "250-2.0.0 multi\n250 2.0.0 line",
    "354 go on",
    "421 4.3.0 going away",
    b"2",                                            # not even a whole line
    b"\r\n",
]


def interjected_transaction(client: RawClient, upstream: FakeUpstream, recipient: str) -> tuple[int, list[str]]:
    """DATA, part of the message, wait until the fake spoke, then the rest and the dot; the final reply.

    The client finishes only after the upstream's interjection is on its way: an early reply that
    arrives after Willi sent its dot cannot be told from the reply to the dot (by Willi or anyone).
    """
    upstream.interjected.clear()
    code, reply = begin_data(client, recipient)
    assert code == 354, reply
    client.send(b"Subject: early\r\n\r\n" + b"x" * 3000 + b"\r\n")
    assert upstream.interjected.wait(10), "the fake never got enough data to interject"
    time.sleep(0.2)  # the interjection is on Willi's side of the socket before the dot is due
    client.send(b"the rest\r\n.\r\n")
    return client.reply()


@pytest.mark.parametrize("interjection", INTERJECTIONS, ids=printable_id)
@pytest.mark.parametrize("after", [1, 2000])
def test_an_early_reply_during_data_is_451_without_the_dot(fake_upstream: Factory, pooled, interjection: str | bytes,
                                                           after: int) -> None:
    upstream = fake_upstream(data_interjection=(after, interjection), replies={"dot": "550 5.7.1 rejected"})
    w = pooled(upstream)
    with transaction_lines() as lines:
        client = open_transaction(w)
        try:
            code, reply = interjected_transaction(client, upstream, "b@example.com")
            assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
            # Not reused: the next transaction of this client goes out on a new upstream connection
            # (which interjects again, as the fake was told to).
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            code, reply = interjected_transaction(client, upstream, "c@example.com")
            assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
            assert client.cmd("QUIT")[0] == 221
        finally:
            client.close()
        assert w.service.wait_idle(5)
    assert closed_sessions(upstream, 2)
    assert len(upstream.sessions) == 2
    for session in upstream.sessions:
        data = after_data(session)
        assert b"\r\n.\r\n" not in data, data[-40:]  # the final dot never went out
        assert all(not t.completed for t in session.transactions)
    assert len(lines) == 2 and all("result=failed" in line and "error_src=upstream" in line for line in lines), lines


def test_without_interjection_the_same_exchange_is_delivered(fake_upstream: Factory, pooled) -> None:
    """Control for the test above: the same client steps with a well-behaved upstream end in 250."""
    upstream = fake_upstream()
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = begin_data(client)
        assert code == 354
        client.send(b"Subject: early\r\n\r\n" + b"x" * 3000 + b"\r\n")
        time.sleep(0.2)
        client.send(b"the rest\r\n.\r\n")
        code, reply = client.reply()
        assert code == 250 and "queued as FAKE1" in reply[0], reply
    finally:
        client.close()
    (txn,) = upstream.completed_transactions
    assert txn.data.endswith(b"the rest\r\n")


def test_an_early_reply_right_after_354_is_451(fake_upstream: Factory, pooled) -> None:
    """The upstream speaks before any data: whether Willi sees it with the 354 or later, no dot and 451."""
    upstream = fake_upstream(data_interjection=(0, "250 2.0.0 early"), replies={"dot": "550 5.7.1 no"})
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = begin_data(client)
        if code == 354:
            assert upstream.interjected.wait(10)
            time.sleep(0.2)
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            code, reply = client.reply()
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
    finally:
        client.close()
    assert closed_sessions(upstream, 1)
    assert b"\r\n.\r\n" not in after_data(upstream.sessions[0])


def test_a_large_message_with_an_early_reply_gets_no_dot(fake_upstream: Factory, pooled) -> None:
    upstream = fake_upstream(data_interjection=(1000, "250 2.0.0 early"), replies={"dot": "550 5.7.1 no"})
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        assert begin_data(client)[0] == 354
        client.send(b"Subject: big\r\n\r\n")
        for _ in range(64):
            client.send(b"y" * 16382 + b"\r\n")
        client.send(b".\r\n")
        code, reply = client.reply()
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
    finally:
        client.close()
    assert upstream.interjected.is_set()
    assert closed_sessions(upstream, 1)
    assert b"\r\n.\r\n" not in after_data(upstream.sessions[0])


# ---------------------------------------------------------------- point 7: two replies to one command


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("step", ["ehlo", "mail", "rcpt"])
def test_a_second_reply_to_one_command_is_451_450(fake_upstream: Factory, pooled, step: str,
                                                  pipelining: bool) -> None:
    """Replies and commands out of step: found at once where the extra line comes with the last awaited
    reply, otherwise at the next command whose answer cannot fit (a 2xx to DATA); never a dot."""
    kwargs = {} if pipelining else {"extensions": without("PIPELINING")}
    upstream = fake_upstream(unsolicited={step: "250 2.0.0 and another thing"}, **kwargs)
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = client.cmd("RCPT TO:<b@example.com>")
        if code == 250:
            # Pipelined MAIL + RCPT: the extra line was read as the RCPT's reply, the RCPT's real reply is
            # still on its way. It surfaces as the "reply" to DATA, which no 2xx can be.
            assert step == "mail" and pipelining, (code, reply)
            code, reply = client.cmd("DATA")
            assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
        else:
            assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
            assert client.cmd("DATA")[0] == 503  # nothing was accepted
    finally:
        client.close()
    assert closed_sessions(upstream, 1)
    assert upstream.completed_transactions == []
    assert b"\r\n.\r\n" not in bytes(upstream.sessions[0].raw)


def test_a_second_reply_to_data_is_451_without_the_dot(fake_upstream: Factory, pooled) -> None:
    upstream = fake_upstream(unsolicited={"data": "250 2.0.0 Ok: queued as EARLY"}, replies={"dot": "550 5.7.1 no"})
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = begin_data(client)
        if code == 354:  # the extra line came in a later segment: it is found before the dot
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            code, reply = client.reply()
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
    finally:
        client.close()
    assert closed_sessions(upstream, 1)
    assert b"\r\n.\r\n" not in after_data(upstream.sessions[0])


@pytest.mark.parametrize("dot_reply", ["250 2.0.0 Ok: queued as FIRST", "550 5.7.1 no"])
def test_a_second_reply_to_the_dot_is_never_relayed_as_a_verdict(fake_upstream: Factory, pooled,
                                                                  dot_reply: str) -> None:
    """Which of two replies answers the dot is unknowable: the client hears 451 (it retries; a duplicate
    is better than a message reported delivered that was refused, or refused that was delivered)."""
    upstream = fake_upstream(replies={"dot": dot_reply}, unsolicited={"dot": "250 2.0.0 Ok: queued as SECOND"})
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        assert begin_data(client)[0] == 354
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        code, reply = client.reply()
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
        assert "SECOND" not in " ".join(reply)
    finally:
        client.close()
    assert closed_sessions(upstream, 1)


# ---------------------------------------------------------------- point 7: the greeting


@pytest.mark.parametrize("kwargs", [
    {"unsolicited": {"greeting": "250 pregreet"}},
    {"unsolicited": {"greeting": "220 fake.upstream ESMTP again"}},
    {"greeting": "220-fake.upstream\n250 not a greeting line"},
    {"greeting": "220-fake.upstream\n220-still greeting\n554 but this is not"},
], ids=["data after", "second greeting", "mixed codes", "mixed codes, last"])
def test_data_before_the_greeting_is_complete_is_451_450(fake_upstream: Factory, pooled, kwargs: dict) -> None:
    upstream = fake_upstream(**kwargs)
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = client.cmd("RCPT TO:<b@example.com>")
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
    finally:
        client.close()
    assert closed_sessions(upstream, 1)
    assert upstream.sessions[0].commands == []  # not even EHLO


def test_a_pregreeting_upstream_is_failed_over(fake_upstream: Factory, tmp_path: Path) -> None:
    """Nothing reached the client yet: the route's next upstream takes the transaction."""
    bad = fake_upstream(unsolicited={"greeting": "250 pregreet"})
    good = fake_upstream()
    mapping = {"type": "static", "server": f"127.0.0.1:{bad.port}, 127.0.0.1:{good.port}", "tls_verify": False}
    w = start(tmp_path, [mapping])
    try:
        client = open_transaction(w)
        try:
            assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
        finally:
            client.close()
    finally:
        w.stop()
    assert bad.sessions and bad.sessions[0].commands == []
    assert good.sessions and "RCPT TO:<b@example.com>" in good.sessions[0].commands


# ---------------------------------------------------------------- point 8: per-reply deadlines


DRIBBLE_SETTINGS = {"upstream_connect_timeout": "2s", "upstream_command_timeout": "2s",
                    "upstream_data_timeout": "2s"}


@pytest.mark.parametrize("step", ["greeting", "ehlo", "mail", "rcpt"])
def test_a_dribbled_reply_before_data_is_cut_at_its_timeout(fake_upstream: Factory, tmp_path: Path,
                                                           step: str) -> None:
    upstream = fake_upstream(dribble={step: 1.0})  # every reply is > 10 bytes: > 10 s dribbled
    w = start(tmp_path, [static_mapping(upstream.port)], **DRIBBLE_SETTINGS)
    try:
        client = open_transaction(w)
        try:
            started = time.monotonic()
            code, reply = client.cmd("RCPT TO:<b@example.com>")
            elapsed = time.monotonic() - started
        finally:
            client.close()
    finally:
        w.stop()
    assert code == 451 and reply[0].startswith("4.4."), (code, reply)
    assert 1.5 < elapsed < 2 + MARGIN, elapsed


@pytest.mark.parametrize("step", ["data", "dot"])
def test_a_dribbled_reply_to_data_or_dot_is_cut_at_its_timeout(fake_upstream: Factory, tmp_path: Path,
                                                              step: str) -> None:
    upstream = fake_upstream(dribble={step: 1.0})
    w = start(tmp_path, [static_mapping(upstream.port)], **DRIBBLE_SETTINGS)
    try:
        client = open_transaction(w)
        try:
            assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
            started = time.monotonic()
            code, reply = client.cmd("DATA")
            if step == "dot":
                assert code == 354
                started = time.monotonic()
                client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
                code, reply = client.reply()
            elapsed = time.monotonic() - started
        finally:
            client.close()
    finally:
        w.stop()
    assert code == 451 and reply[0].startswith("4.4."), (code, reply)
    assert 1.5 < elapsed < 2 + MARGIN, elapsed
    assert closed_sessions(upstream, 1)


def test_a_multiline_reply_with_slow_lines_has_one_deadline(fake_upstream: Factory, tmp_path: Path) -> None:
    """Each line arrives well within the timeout, the whole reply does not."""
    ehlo = "\n".join(f"250-LINE{i}" for i in range(10)) + "\n250 PIPELINING"
    upstream = fake_upstream(replies={"ehlo": ehlo}, dribble={"ehlo": 0.05})  # ~8 s for ~160 bytes
    w = start(tmp_path, [static_mapping(upstream.port)], **DRIBBLE_SETTINGS)
    try:
        client = open_transaction(w)
        try:
            started = time.monotonic()
            code, reply = client.cmd("RCPT TO:<b@example.com>")
            elapsed = time.monotonic() - started
        finally:
            client.close()
    finally:
        w.stop()
    assert code == 451, (code, reply)
    assert elapsed < 2 + MARGIN, elapsed


def test_a_slow_but_complete_reply_within_the_timeout_is_relayed(fake_upstream: Factory, tmp_path: Path) -> None:
    """Control: dribbling that finishes in time is just a slow upstream."""
    upstream = fake_upstream(replies={"rcpt": "250 ok"}, dribble={"rcpt": 0.1})  # 8 bytes: 0.7 s
    w = start(tmp_path, [static_mapping(upstream.port)], **DRIBBLE_SETTINGS)
    try:
        client = open_transaction(w)
        try:
            code, reply = client.cmd("RCPT TO:<b@example.com>")
        finally:
            client.close()
    finally:
        w.stop()
    assert (code, reply) == (250, ["ok"])


# ---------------------------------------------------------------- variants: TLS to the upstream, setup steps


def test_an_early_reply_over_tls_is_451_without_the_dot(fake_upstream: Factory, pooled, pki) -> None:
    """Willi's check for unsolicited data must see TLS records (buffered in the SSL object) too."""
    upstream = fake_upstream(tls_context=pki.server_context(), data_interjection=(1, "250 2.0.0 early"),
                             replies={"dot": "550 5.7.1 no"})
    w = pooled(upstream)
    client = open_transaction(w)
    try:
        code, reply = interjected_transaction(client, upstream, "b@example.com")
        assert code == 451 and reply[0].startswith("4.5.0"), (code, reply)
    finally:
        client.close()
    assert closed_sessions(upstream, 1)
    assert upstream.sessions[0].tls
    assert upstream.completed_transactions == []


@pytest.mark.parametrize("step", ["starttls", "xclient"])
def test_a_dribbled_setup_reply_is_cut_at_the_command_timeout(fake_upstream: Factory, tmp_path: Path, pki,
                                                             step: str) -> None:
    kwargs = {"tls_context": pki.server_context()} if step == "starttls" else {"xclient": "ADDR NAME"}
    upstream = fake_upstream(dribble={step: 1.0}, **kwargs)
    w = start(tmp_path, [static_mapping(upstream.port)], **DRIBBLE_SETTINGS)
    try:
        client = open_transaction(w)
        try:
            started = time.monotonic()
            code, reply = client.cmd("RCPT TO:<b@example.com>")
            elapsed = time.monotonic() - started
        finally:
            client.close()
    finally:
        w.stop()
    assert code == 451, (code, reply)
    assert elapsed < 2 + MARGIN, elapsed

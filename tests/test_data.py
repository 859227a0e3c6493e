"""End to end: the DATA invariants of design.md ("DATA: the invariants that lose nothing").

Raw-socket clients send exactly the bytes under test; the fake upstream
records the bytes Willi really sent (`session.raw`). The memory test uses a
tiny discarding upstream defined here, because FakeUpstream keeps every
received byte in memory.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import pytest
from proxy_helpers import BODY, make_config, static_mapping, transaction, verbs, wait_sessions_closed
from support import printable_id

SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled text"
SEQUENCES = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n"]


def assert_clean_wire(session) -> None:
    """Only CRLF lines, no NUL, and a lone "." line only as the end of a completed transaction."""
    raw = bytes(session.raw)
    assert b"\x00" not in raw
    assert raw.count(b"\n") == raw.count(b"\r\n"), "bare LF reached the upstream"
    assert raw.count(b"\r") == raw.count(b"\r\n"), "bare CR reached the upstream"
    lone_dots = raw.split(b"\r\n").count(b".")
    assert lone_dots == sum(t.completed for t in session.transactions), raw


# ---------------------------------------------------------------- smuggling


@pytest.mark.parametrize("policy", ["normalize", "reject"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=[printable_id(s) for s in SEQUENCES])
def test_smuggling_sequences_never_end_the_data(willi, fake_upstream, tmp_path, sequence, policy) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], bare_newline=policy))
    client = w.raw()
    try:
        client.ehlo()
        client.send("MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(354)
        # The first message (with the sequence and smuggled-looking text),
        # its real end, and a second transaction pipelined in the same write.
        client.send(b"Subject: one\r\n\r\nfirst line" + sequence + SMUGGLED + b"\r\n.\r\n"
                    + b"MAIL FROM:<carol@sender.example>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n")
        first = client.reply()
        client.expect(250)
        client.expect(250)
        client.expect(354)
        client.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        second = client.reply()
        client.expect(221)
    finally:
        client.close()

    assert second[0] == 250, second
    if policy == "normalize":
        assert first[0] == 250, first
    else:
        assert first[0] == 550 and first[1][0].startswith("5.5.2"), first
    wait_sessions_closed(upstream)

    transactions = upstream.all_transactions
    # Exactly the transactions the client made; nothing smuggled became one.
    assert [t.mail_from for t in transactions] == ["MAIL FROM:<alice@sender.example>",
                                                   "MAIL FROM:<carol@sender.example>"]
    assert [t.rcpts for t in transactions] == [["RCPT TO:<bob@example.com>"], ["RCPT TO:<dave@example.com>"]]
    for session in upstream.sessions:
        assert not any("evil" in c or "victim" in c for c in session.commands), session.commands
        assert_clean_wire(session)
    one, two = transactions
    assert two.completed and two.data == b"Subject: two\r\n\r\nsecond\r\n"
    if policy == "normalize":
        assert one.completed
        assert one.data.startswith(b"Subject: one\r\n\r\nfirst line")
        for text in (b"MAIL FROM:<evil@x>", b"RCPT TO:<victim@example.com>", b"smuggled text"):
            assert text in one.data
        assert one.data.endswith(b"smuggled text\r\n")
        assert two.reply.startswith("250")
    else:
        assert not one.completed
        # The refused message's upstream connection was closed, not finished:
        # the second transaction went over a new one.
        assert len(upstream.sessions) == 2
        assert upstream.sessions[0].transactions == [one]
        assert upstream.sessions[0].closed
        assert "QUIT" not in [c.upper() for c in upstream.sessions[0].commands]


def test_dot_stuffing_round_trip(willi, fake_upstream, tmp_path) -> None:
    """Lines starting with '.' survive Willi's unstuffing and re-stuffing.

    The fake records the wire bytes (still dot-stuffed), so they must equal
    what the client sent.
    """
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    stuffed = b"Subject: dots\r\n\r\n..\r\n...\r\n..hidden\r\nend\r\n"
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"], stuffed)
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (tx,) = upstream.completed_transactions
    assert tx.data == stuffed
    assert_clean_wire(upstream.sessions[0])


# ---------------------------------------------------------------- incomplete or refused data


def test_client_disconnect_mid_data(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        client.send("MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(354)
        client.send(b"Subject: cut\r\n\r\n" + b"some text\r\n" * 1000 + b"and then the line ends with")
        assert upstream.wait_for(lambda: len(upstream.sessions[0].raw) > 5000)
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (tx,) = upstream.all_transactions
    assert not tx.completed
    assert upstream.completed_transactions == []
    assert_clean_wire(upstream.sessions[0])


def test_oversized_message_refused_and_session_goes_on(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], max_message_bytes="10KiB"))
    client = w.raw()
    try:
        client.ehlo()
        big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 512  # 50 KiB, no SIZE= announced
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"], big)
        assert [r[0] for r in replies] == [250, 250]
        assert final is not None and final[0] == 552 and final[1][0].startswith("5.3.4"), final
        # The same connection carries on with a new transaction.
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert [r[0] for r in replies] == [250, 250]
        assert final is not None and final[0] == 250, final
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream, 2)
    first, second = upstream.all_transactions
    assert not first.completed
    assert second.completed and second.data == BODY
    assert len(upstream.completed_transactions) == 1
    for session in upstream.sessions:
        assert_clean_wire(session)


@pytest.mark.parametrize(("extra", "expected"), [(0, 250), (1, 552)], ids=["exactly-the-limit", "one-octet-over"])
def test_a_message_of_exactly_max_message_bytes_is_accepted(willi, fake_upstream, tmp_path, extra, expected) -> None:
    """The limit is the largest message accepted (octets after unstuffing, CRLF line ends, without the dot)."""
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], max_message_bytes="10240"))
    head = b"Subject: edge\r\n\r\n"
    body = head + b"x" * (10240 - len(head) - 2 + extra) + b"\r\n"
    assert len(body) == 10240 + extra
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"], body)
        assert final is not None and final[0] == expected, final
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    assert len(upstream.completed_transactions) == (1 if expected == 250 else 0)


def test_declared_size_over_limit_refused_at_mail(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], max_message_bytes="10KiB"))
    client = w.raw()
    try:
        client.ehlo()
        code, lines = client.cmd("MAIL FROM:<alice@sender.example> SIZE=51200")
        assert code == 552 and lines[0].startswith("5.3.4")
        # The refused MAIL opened no transaction: the RCPT that would reach the upstream is out of sequence.
        code, lines = client.cmd("RCPT TO:<bob@example.com>")
        assert code == 503 and lines[0].startswith("5.5.1"), (code, lines)
        time.sleep(0.2)
        assert upstream.sessions == []
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250, (replies, final)
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    assert [c for c in upstream.sessions[0].commands if c.startswith("MAIL")] == ["MAIL FROM:<alice@sender.example>"]


# ---------------------------------------------------------------- upstream failures


@pytest.mark.parametrize("step", ["greeting", "ehlo", "mail", "rcpt", "data", "dot"])
def test_upstream_drop_gives_4xx_and_willi_keeps_serving(willi, fake_upstream, tmp_path, step) -> None:
    upstream = fake_upstream(drop_at=step)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        code, lines = client.cmd("RCPT TO:<bob@example.com>")
        if step in ("greeting", "ehlo", "mail", "rcpt"):
            assert 400 <= code < 500, (step, code, lines)
            assert client.cmd("DATA")[0] == 503
        else:
            assert code == 250, (code, lines)
            code, lines = client.cmd("DATA")
            if step == "data":
                assert 400 <= code < 500, (step, code, lines)
            else:
                assert code == 354
                client.send(BODY + b".\r\n")
                code, lines = client.reply()
                assert 400 <= code < 500, (step, code, lines)
        # The client connection is still usable.
        assert client.cmd("RSET")[0] == 250
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    # Willi still serves new connections.
    upstream.drop_at = None
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250, final
        client.cmd("QUIT")
    finally:
        client.close()
    assert upstream.wait_for(lambda: any(t.completed and t.reply.startswith("250") for t in
                                         upstream.sessions[-1].transactions))


# ---------------------------------------------------------------- replies after the dot


def test_final_reply_is_the_upstreams_own(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (tx,) = upstream.completed_transactions
    assert final == (250, [tx.reply[4:]])
    assert "queued as FAKE" in final[1][0]


@pytest.mark.parametrize("reply", [
    "554 5.7.1 Rejected by content filter",
    "550-5.7.1 first line of a\n550 5.7.1 multi-line rejection",
    "452 4.3.1 Insufficient system storage",
])
def test_upstream_refusal_after_dot_reaches_client_verbatim(willi, fake_upstream, tmp_path, reply) -> None:
    upstream = fake_upstream(replies={"dot": reply})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        client.cmd("QUIT")
    finally:
        client.close()
    lines = reply.split("\n")
    assert final == (int(reply[:3]), [line[4:] for line in lines])


@pytest.mark.parametrize("refusal", ["554 5.7.1 No DATA for you", "451 4.3.0 Try DATA later"])
def test_a_refused_data_is_reset_upstream_so_the_next_transaction_goes_through(
        willi, fake_upstream, tmp_path, refusal) -> None:
    """An upstream that refuses DATA still holds MAIL and RCPT: Willi sends RSET before it sends the next MAIL."""
    upstream = fake_upstream(replies={"data": refusal})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        _, refused = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert refused is not None and refused[0] == int(refusal[:3])
        del upstream.replies["data"]
        replies, final = transaction(client, "alice@sender.example", ["carol@example.com"])
        client.cmd("QUIT")
    finally:
        client.close()
    assert [code for code, _ in replies] == [250, 250] and final is not None and final[0] == 250, (replies, final)
    (session,) = upstream.sessions
    sent = verbs(session)
    assert sent[sent.index("DATA") + 1] == "RSET", sent
    assert session.refused == [], session.refused


def test_an_upstream_lost_after_an_accepted_recipient_makes_the_data_a_4xx(willi, fake_upstream, tmp_path) -> None:
    """The accepted recipient went down with the connection: DATA gets 451 4.4.2 and no upstream sees a message."""
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        upstream.drop_at = "rcpt"  # the connection breaks under the second recipient
        lost = client.cmd("RCPT TO:<carol@example.com>")
        data = client.cmd("DATA")
        client.cmd("QUIT")
    finally:
        client.close()
    assert lost[0] // 100 == 4, lost
    assert data[0] == 451 and data[1][0].startswith("4.4.2"), data
    assert all(not t.completed for s in upstream.sessions for t in s.transactions)


# ---------------------------------------------------------------- bounded memory


class DiscardUpstream:
    """An SMTP upstream that counts message bytes and keeps none of them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.data_sizes: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                self._dialog(conn)
        except BaseException as exc:
            self.error = exc
        finally:
            self.listener.close()

    def _dialog(self, conn: socket.socket) -> None:
        conn.sendall(b"220 discard.test ESMTP\r\n")
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            command = line.rstrip(b"\r").upper()
            if command.startswith(b"EHLO"):
                conn.sendall(b"250-discard.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif command == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                size, buf = self._read_data(conn, buf)
                self.data_sizes.append(size)
                conn.sendall(f"250 2.0.0 Ok: discarded {size} octets\r\n".encode())
            elif command == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")

    @staticmethod
    def _read_data(conn: socket.socket, pending: bytes) -> tuple[int, bytes]:
        """Count bytes up to CRLF.CRLF (the last CRLF counted); return the count and what follows."""
        consumed = 0  # stream bytes before `chunk`
        tail = b"\r\n"  # the DATA line's CRLF: a message may be just ".\r\n"
        chunk = pending
        while True:
            if chunk:
                window = tail + chunk
                idx = window.find(b"\r\n.\r\n")
                if idx >= 0:
                    end = consumed + idx + 5 - len(tail)
                    return end - 3, window[idx + 5 :]
                consumed += len(chunk)
                tail = window[-4:]
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("upstream: client went away in DATA")


@pytest.mark.slow
def test_20_mib_message_streams_in_bounded_memory(willi, tmp_path) -> None:
    upstream = DiscardUpstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], max_message_bytes="30MiB"))
    line = b"x" * 1022 + b"\r\n"
    block = line * 64  # 64 KiB, built once and sent again and again
    blocks = 20 * 16  # 20 MiB
    total = len(block) * blocks

    client = w.raw()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        client.ehlo()
        client.send("MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(354)
        for _ in range(blocks):
            client.send(block)
        client.send(b".\r\n")
        code, lines = client.reply()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        client.close()
    assert code == 250, (code, lines)
    upstream.thread.join(10)
    assert upstream.error is None, upstream.error
    assert upstream.data_sizes == [total]
    assert lines == [f"2.0.0 Ok: discarded {total} octets"]
    assert peak - baseline < 10 * 1024 * 1024, f"memory grew by {(peak - baseline) / 2**20:.1f} MiB"


def test_client_timeout_mid_data(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], read_timeout="1s"))
    client = w.raw()
    try:
        client.ehlo()
        client.send("MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(354)
        client.send(b"Subject: slow\r\n\r\nthe client stops here\r\n")
        code, lines = client.reply()  # after read_timeout
        assert code == 421 and lines[0].startswith("4.4.2"), (code, lines)
        assert client.closed()
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (tx,) = upstream.all_transactions
    assert not tx.completed
    assert_clean_wire(upstream.sessions[0])

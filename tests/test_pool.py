"""Upstream connection reuse between client connections (`upstream_reuse = true`, willi/upstream/pool.py).

Each test runs Willi in-process against a FakeUpstream and looks at the
upstream sessions the fake recorded: one session serving two client
connections is reuse; a second session is a new connection. A pooled
connection must be clean (no error, 421, timeout, incomplete DATA or
refused RSET ever seen on it), must never have carried XCLIENT, must stay
with its route and its TLS policy, and must be checked before use: a 421
it received while idle is never the verdict on the next message
(house.md's trap).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream, RecordedSession
from proxy_helpers import BODY, csv_mapping, make_config, static_mapping, transaction, verb, verbs
from support import RunningWilli

ATTRIBUTES = "NAME ADDR PORT PROTO HELO"
IDLE_421 = "421 4.4.2 fake.upstream Error: timeout exceeded"


def pooled(w: RunningWilli) -> int:
    pool = w.service.runtime.pool
    assert pool is not None, "upstream_reuse is on: the runtime has a pool"
    return len(pool)


def wait_pooled(w: RunningWilli, count: int, timeout: float = 5.0) -> None:
    """Wait until `count` connections sit idle in the pool (the last client's session has ended)."""
    deadline = time.monotonic() + timeout
    while pooled(w) != count:
        assert time.monotonic() < deadline, f"{pooled(w)} pooled connections, expected {count}"
        time.sleep(0.01)


def wait_closed(upstream: FakeUpstream, session: RecordedSession, timeout: float = 10.0) -> None:
    assert upstream.wait_for(lambda: session.closed, timeout), f"session still open: {session.commands}"


def deliver(w: RunningWilli, recipient: str = "bob@example.com", *, sender: str = "alice@sender.example",
            tls_context=None) -> tuple[list[tuple[int, list[str]]], tuple[int, list[str]] | None]:
    """One client connection with one transaction, ended by QUIT; the replies it got."""
    client = w.raw()
    try:
        client.ehlo()
        if tls_context is not None:
            assert client.cmd("STARTTLS")[0] == 220
            client.starttls(tls_context)
            client.send("EHLO client.example\r\n")
            client.expect(250)
        replies, final = transaction(client, sender, [recipient])
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    return replies, final


def deliver_ok(w: RunningWilli, recipient: str = "bob@example.com", **kwargs) -> str:
    """`deliver`, insisting on success; the text of the reply to the dot."""
    replies, final = deliver(w, recipient, **kwargs)
    assert [code for code, _ in replies] == [250, 250], replies
    assert final is not None and final[0] == 250, final
    return final[1][0]


def reuse_config(tmp_path: Path, port: int, **settings) -> object:
    return make_config(tmp_path, [static_mapping(port)], upstream_reuse=True, **settings)


def count_verb(session: RecordedSession, name: str) -> int:
    return sum(1 for v in verbs(session) if v == name)


# ---------------------------------------------------------------- reuse


def test_two_client_connections_share_one_upstream_connection(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port))
    first = deliver_ok(w, "bob@example.com")
    wait_pooled(w, 1)
    second = deliver_ok(w, "carol@example.com")
    wait_pooled(w, 1)
    assert first != second and "queued as" in second  # two verdicts, each the upstream's own
    (session,) = upstream.sessions  # one connection: one greeting, one EHLO
    assert count_verb(session, "EHLO") == 1
    assert [t.rcpts for t in session.transactions] == [["RCPT TO:<bob@example.com>"],
                                                       ["RCPT TO:<carol@example.com>"]]
    assert all(t.completed and t.data == BODY for t in session.transactions)
    assert not session.closed and upstream.refused_commands == []
    w.stop()  # the pool says goodbye
    wait_closed(upstream, session)
    assert session.commands[-1] == "QUIT"


def test_reuse_off_opens_a_connection_per_client(willi, fake_upstream, tmp_path) -> None:
    """The control for the tests below: without reuse each client connection has its own upstream session."""
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], upstream_reuse=False))
    deliver_ok(w)
    deliver_ok(w)
    assert upstream.wait_for(lambda: len(upstream.sessions) == 2 and all(s.closed for s in upstream.sessions))
    assert w.service.runtime.pool is None


# ---------------------------------------------------------------- dead while idle


@pytest.mark.parametrize("said", [None, IDLE_421], ids=["closed", "421"])
def test_pooled_connection_the_upstream_ended_while_idle_is_replaced(willi, fake_upstream, tmp_path,
                                                                     said) -> None:
    """The client hears the verdict of a new connection, never the idle 421 (house.md's trap)."""
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port))
    deliver_ok(w)
    wait_pooled(w, 1)
    idle = upstream.sessions[0]
    upstream.disconnect(idle, said)
    wait_closed(upstream, idle)
    replies, final = deliver(w, "carol@example.com")
    assert [code for code, _ in replies] == [250, 250], replies
    assert final is not None and final[0] == 250 and "queued as FAKE2" in final[1][0], final
    assert len(upstream.sessions) == 2
    assert len(idle.transactions) == 1 and verbs(idle).count("MAIL") == 1  # nothing more went to the dead one
    fresh = upstream.sessions[1]
    assert verbs(fresh)[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert fresh.transactions[0].completed
    assert w.service.runtime.pool.reused == 0, "found at the idle check, before any command was sent on it"


@pytest.mark.parametrize("reuse", [True, False], ids=["pool", "no-pool"])
def test_421_while_the_client_sat_idle_between_transactions_is_not_the_next_verdict(willi, fake_upstream, tmp_path,
                                                                                   reuse) -> None:
    """One client connection keeps its upstream connection between transactions (pool or not): same trap."""
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], upstream_reuse=reuse))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        kept = upstream.sessions[0]
        upstream.disconnect(kept, IDLE_421)
        wait_closed(upstream, kept)
        replies, final = transaction(client, "alice@sender.example", ["carol@example.com"])
        assert [code for code, _ in replies] == [250, 250], replies
        assert final is not None and final[0] == 250 and "FAKE2" in final[1][0], final
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    assert len(upstream.sessions) == 2 and upstream.sessions[1].transactions[0].completed


class MailRefusedOnce(dict):
    """`FakeUpstream.replies` that answers the Nth MAIL with 421 (the upstream closing as the MAIL arrives)."""

    def __init__(self, nth: int) -> None:
        super().__init__()
        self.nth, self.mails = nth, 0

    def get(self, key, default=None):  # type: ignore[override]
        if key == "mail":
            self.mails += 1
            if self.mails == self.nth:
                return "421 4.3.2 fake.upstream closing now"
        return super().get(key, default)


def test_421_to_mail_on_a_reused_connection_means_reconnect_once(willi, fake_upstream, tmp_path) -> None:
    """A 421 that races the MAIL of a reused connection (the idle check saw nothing) is not the verdict."""
    upstream = fake_upstream()
    upstream.replies = MailRefusedOnce(2)
    w = willi(config=reuse_config(tmp_path, upstream.port))
    deliver_ok(w)
    wait_pooled(w, 1)
    text = deliver_ok(w, "carol@example.com")
    assert "closing now" not in text
    assert len(upstream.sessions) == 2
    first, second = upstream.sessions
    assert verbs(first).count("MAIL") == 2 and len(first.transactions) == 1
    assert second.transactions[0].rcpts == ["RCPT TO:<carol@example.com>"] and second.transactions[0].completed


def test_a_421_on_a_new_connection_is_the_verdict(willi, fake_upstream, tmp_path) -> None:
    """The replacement happens once, for reused connections only: a fresh connection's 421 is relayed (451)."""
    upstream = fake_upstream()
    upstream.replies = MailRefusedOnce(1)
    w = willi(config=reuse_config(tmp_path, upstream.port))
    replies, _ = deliver(w)
    assert replies[1] == (451, ["4.3.2 fake.upstream closing now"]), replies
    assert len(upstream.sessions) == 1


# ---------------------------------------------------------------- never reused after trouble


def _break_with_protocol_error(w: RunningWilli, upstream: FakeUpstream) -> None:
    upstream.replies = {"rcpt": "2x0 not a reply line"}
    replies, _ = deliver(w)
    assert replies[1][0] == 451 and replies[1][1][0].startswith("4.5.0"), replies


def _break_with_421(w: RunningWilli, upstream: FakeUpstream) -> None:
    upstream.replies = {"rcpt": "421 4.3.2 fake.upstream busy"}
    replies, _ = deliver(w)
    assert replies[1] == (451, ["4.3.2 fake.upstream busy"]), replies


def _break_with_timeout(w: RunningWilli, upstream: FakeUpstream) -> None:
    upstream.delays = {"dot": 3.0}
    _, final = deliver(w)
    assert final is not None and final[0] == 451 and final[1][0].startswith("4.4.2"), final


def _break_with_incomplete_data(w: RunningWilli, upstream: FakeUpstream) -> None:
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: cut\r\n\r\nthe first half, and then the client vanishes\r\n")
        assert upstream.wait_for(lambda: b"the first half" in upstream.sessions[0].raw)
    finally:
        client.close()


def _break_with_oversized_data(w: RunningWilli, upstream: FakeUpstream) -> None:
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 200 + b".\r\n")
        code, lines = client.reply()
        assert code == 552, (code, lines)
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()


def _break_with_refused_rset(w: RunningWilli, upstream: FakeUpstream) -> None:
    upstream.replies = {"rset": "554 5.5.1 Error: no RSET for you"}
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        assert client.cmd("QUIT")[0] == 221  # the upstream transaction is still open: Willi sends RSET
    finally:
        client.close()
    assert upstream.wait_for(lambda: "RSET" in verbs(upstream.sessions[0]))


BREAKS = {
    "protocol-error": _break_with_protocol_error,
    "421": _break_with_421,
    "timeout": _break_with_timeout,
    "incomplete-data": _break_with_incomplete_data,
    "oversized-data": _break_with_oversized_data,
    "refused-rset": _break_with_refused_rset,
}


@pytest.mark.parametrize("trouble", list(BREAKS))
def test_connection_is_never_pooled_after_trouble(willi, fake_upstream, tmp_path, trouble) -> None:
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port, upstream_data_timeout="1s", max_message_bytes=4096))
    BREAKS[trouble](w, upstream)
    troubled = upstream.sessions[0]
    wait_closed(upstream, troubled)
    assert pooled(w) == 0
    if trouble != "timeout":  # the one case where the dot went out (and its verdict came too late)
        assert not any(t.completed for t in troubled.transactions)
    upstream.replies, upstream.delays = {}, {}
    deliver_ok(w, "carol@example.com")
    assert len(upstream.sessions) == 2, [s.commands for s in upstream.sessions]
    assert "RCPT TO:<carol@example.com>" not in troubled.commands
    assert upstream.sessions[1].transactions[0].completed


def test_rset_accepted_keeps_the_connection_poolable(willi, fake_upstream, tmp_path) -> None:
    """The control for refused-rset: an open transaction that the upstream RSETs cleanly is reused."""
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_pooled(w, 1)
    deliver_ok(w, "carol@example.com")
    (session,) = upstream.sessions
    assert verbs(session) == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"], session.commands


# ---------------------------------------------------------------- XCLIENT


def test_a_connection_that_carried_xclient_serves_one_client_connection(willi, fake_upstream, tmp_path) -> None:
    """Never a second XCLIENT on one connection (Postfix refuses it), however many clients come."""
    upstream = fake_upstream(xclient=ATTRIBUTES)
    w = willi(config=reuse_config(tmp_path, upstream.port))
    clients = 5
    for n in range(clients):
        client = w.raw()
        try:
            client.ehlo()
            for m in range(2):  # two transactions per client connection share its upstream connection
                _, final = transaction(client, "alice@sender.example", [f"rcpt{n}-{m}@example.com"])
                assert final is not None and final[0] == 250, final
            assert client.cmd("QUIT")[0] == 221
        finally:
            client.close()
    assert upstream.wait_for(lambda: len(upstream.sessions) == clients and all(s.closed for s in upstream.sessions))
    assert pooled(w) == 0
    for session in upstream.sessions:
        assert count_verb(session, "XCLIENT") == 1, session.commands
        assert len(session.transactions) == 2 and session.commands[-1] == "QUIT"
    assert upstream.refused_commands == []


def test_xclient_off_lets_an_xclient_upstream_be_reused(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ATTRIBUTES)
    w = willi(config=reuse_config(tmp_path, upstream.port, xclient=False))
    for n in range(3):
        deliver_ok(w, f"rcpt{n}@example.com")
        wait_pooled(w, 1)
    (session,) = upstream.sessions
    assert count_verb(session, "XCLIENT") == 0 and len(session.transactions) == 3


def test_xclient_required_is_never_pooled(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ATTRIBUTES)
    w = willi(config=reuse_config(tmp_path, upstream.port, xclient="required"))
    for n in range(2):
        deliver_ok(w, f"rcpt{n}@example.com")
    assert upstream.wait_for(lambda: len(upstream.sessions) == 2 and all(s.closed for s in upstream.sessions))
    assert [count_verb(s, "XCLIENT") for s in upstream.sessions] == [1, 1]


# ---------------------------------------------------------------- limits of reuse


def test_idle_timeout_says_quit_to_pooled_connections(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port, upstream_idle_timeout="3s"))
    deliver_ok(w)
    wait_pooled(w, 1)
    pooled_at = time.monotonic()
    session = upstream.sessions[0]
    assert not session.closed, "pooled, not closed at the client's QUIT"
    wait_closed(upstream, session, timeout=15.0)
    assert time.monotonic() - pooled_at > 2.0, "kept for about upstream_idle_timeout"
    assert session.commands[-1] == "QUIT"
    assert pooled(w) == 0
    deliver_ok(w, "carol@example.com")
    assert len(upstream.sessions) == 2


def test_max_transactions_caps_reuse(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=reuse_config(tmp_path, upstream.port, upstream_max_transactions=2))
    for n in range(3):
        deliver_ok(w, f"rcpt{n}@example.com")
    assert upstream.wait_for(lambda: len(upstream.sessions) == 2 and upstream.sessions[0].closed)
    first, second = upstream.sessions
    assert len(first.transactions) == 2 and first.commands[-1] == "QUIT"
    assert len(second.transactions) == 1
    wait_pooled(w, 1)
    assert not second.closed


def test_routes_never_share_a_pooled_connection(willi, fake_upstream, tmp_path) -> None:
    """Two routes to the same host and port that differ in policy (tls_verify) each get their own connection."""
    upstream = fake_upstream()
    routes = tmp_path / "routes.csv"
    routes.write_text(f"pattern;server;tls_verify\na.example;127.0.0.1:{upstream.port};false\n"
                      f"b.example;127.0.0.1:{upstream.port};true\n")
    cfg = make_config(tmp_path, [csv_mapping(routes)], upstream_reuse=True)
    w = willi(config=cfg)
    order = ["x@a.example", "x@b.example", "y@a.example", "y@b.example"]
    for n, recipient in enumerate(order):
        deliver_ok(w, recipient)
        wait_pooled(w, min(n + 1, 2))
    assert len(upstream.sessions) == 2
    domains = [{rcpt.rpartition("@")[2].rstrip(">") for t in s.transactions for rcpt in t.rcpts}
               for s in upstream.sessions]
    assert domains == [{"a.example"}, {"b.example"}]
    assert [len(s.transactions) for s in upstream.sessions] == [2, 2]


def test_plaintext_clients_connection_is_not_given_to_a_tls_client(willi, fake_upstream, tmp_path, pki) -> None:
    """upstream_starttls = "client": the pool keeps plaintext and TLS upstream connections apart."""
    upstream = fake_upstream(tls_context=pki.server_context())
    cfg = reuse_config(tmp_path, upstream.port, upstream_starttls="client", tls_cert=pki.cert_file,
                       tls_key=pki.key_file)
    w = willi(config=cfg)
    tls = pki.client_context()
    deliver_ok(w, "plain1@example.com")
    wait_pooled(w, 1)
    deliver_ok(w, "tls1@example.com", tls_context=tls)
    wait_pooled(w, 2)
    deliver_ok(w, "plain2@example.com")
    deliver_ok(w, "tls2@example.com", tls_context=tls)
    wait_pooled(w, 2)
    plain, encrypted = upstream.sessions
    assert not plain.tls and encrypted.tls
    assert [t.rcpts for t in plain.transactions] == [["RCPT TO:<plain1@example.com>"],
                                                     ["RCPT TO:<plain2@example.com>"]]
    assert [t.rcpts for t in encrypted.transactions] == [["RCPT TO:<tls1@example.com>"],
                                                         ["RCPT TO:<tls2@example.com>"]]
    assert "STARTTLS" not in verbs(plain) and verb(encrypted.commands[1]) == "STARTTLS"

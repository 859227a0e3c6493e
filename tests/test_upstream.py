"""End to end: how Willi talks to the upstream (design.md, "The upstream side").

STARTTLS policy and verification, XCLIENT, connection reuse and upstream
timeouts, each over real sockets: a client -> Willi (in-process) -> FakeUpstream.
"""

from __future__ import annotations

import time

import pytest
from fakeupstream import without
from proxy_helpers import (
    BODY,
    make_config,
    settle,
    static_mapping,
    transaction,
    verb,
    verbs,
    wait_sessions_closed,
)

from willi.protocol import xtext_decode


class SizeOnlyAfterTls(dict):
    """`FakeUpstream.replies` that adds SIZE to the EHLO reply once TLS is up.

    The fake advertises STARTTLS exactly while the session is still plain, so
    an EHLO reply without STARTTLS is the one after the handshake. This lets
    a test see whether Willi uses the second EHLO's extension list.
    """

    def get(self, key, default=None):  # type: ignore[override]
        if key == "ehlo" and isinstance(default, str) and "STARTTLS" not in default and "\r\n" in default:
            first, rest = default.split("\r\n", 1)
            return f"{first}\r\n250-SIZE 1000000\r\n{rest}"
        return super().get(key, default)


def deliver_with_smtplib(w, recipients=("bob@example.com",), *, starttls_context=None) -> None:
    with w.smtp() as client:
        client.ehlo("client.example")
        if starttls_context is not None:
            client.starttls(context=starttls_context)
            client.ehlo("client.example")
        assert client.sendmail("alice@sender.example", list(recipients), BODY) == {}


def xclient_lines(session) -> list[str]:
    return [c for c in session.commands if verb(c) == "XCLIENT"]


def xclient_attributes(line: str) -> dict[str, str]:
    """`XCLIENT A=x B=y` -> {"A": decoded x, ...}; every item must be exactly one NAME=xtext."""
    items = line.split(" ")
    assert items[0] == "XCLIENT"
    result: dict[str, str] = {}
    for item in items[1:]:
        assert item.count("=") == 1, f"not a single NAME=value pair: {item!r} in {line!r}"
        name, value = item.split("=")
        assert name not in result, f"attribute {name} twice in {line!r}"
        result[name] = xtext_decode(value)
    return result


# ---------------------------------------------------------------- STARTTLS


def test_starttls_upstream_ehlo_again_and_new_extensions(willi, fake_upstream, pki, tmp_path) -> None:
    upstream = fake_upstream(tls_context=pki.server_context())
    upstream.replies = SizeOnlyAfterTls()
    cfg = make_config(tmp_path, [static_mapping(upstream.port, host="localhost", tls_verify=True)],
                      upstream_tls_ca=pki.ca_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    assert session.tls
    cmds = verbs(session)
    assert cmds[:3] == ["EHLO", "STARTTLS", "EHLO"], cmds
    assert session.commands[0] == session.commands[2] == f"EHLO {w.config.domain}", session.commands[:3]
    assert cmds.index("MAIL") > 2
    # smtplib sends SIZE= because Willi offers SIZE; only the post-TLS EHLO
    # of the upstream offers it, so it passes only if Willi used the new list.
    mail = next(c for c in session.commands if verb(c) == "MAIL")
    assert "SIZE=" in mail.upper(), mail
    (tx,) = upstream.completed_transactions
    assert tx.data == BODY


def test_starttls_upstream_drops_extension_gone_after_tls(willi, fake_upstream, pki, tmp_path) -> None:
    """The reverse: SIZE offered only before TLS must not be used after it."""
    upstream = fake_upstream(tls_context=pki.server_context(), size=1000000)

    class SizeOnlyBeforeTls(dict):
        def get(self, key, default=None):  # type: ignore[override]
            if key == "ehlo" and isinstance(default, str) and "STARTTLS" not in default:
                return "\r\n".join(line for line in default.split("\r\n") if "SIZE" not in line)
            return super().get(key, default)

    upstream.replies = SizeOnlyBeforeTls()
    cfg = make_config(tmp_path, [static_mapping(upstream.port, host="localhost", tls_verify=True)],
                      upstream_tls_ca=pki.ca_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    mail = next(c for c in upstream.sessions[0].commands if verb(c) == "MAIL")
    assert "SIZE=" not in mail.upper(), mail


@pytest.mark.parametrize("problem", ["wrong-name", "untrusted-ca"])
def test_starttls_verification_failure_gives_451_475(willi, fake_upstream, pki, other_pki, tmp_path,
                                                      problem) -> None:
    if problem == "wrong-name":
        cert, key = pki.issue("other.example")
        context = pki.server_context(cert, key)
    else:
        context = other_pki.server_context()
    upstream = fake_upstream(tls_context=context)
    cfg = make_config(tmp_path, [static_mapping(upstream.port, host="localhost", tls_verify=True)],
                      upstream_tls_ca=pki.ca_file)
    w = willi(config=cfg)
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert replies[0][0] == 250
        code, lines = replies[1]
        assert code == 451 and lines[0].startswith("4.7.5"), replies[1]
        assert final is not None and final[0] == 503, final  # no recipient was accepted
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream)
    assert upstream.sessions, "Willi never connected"
    for session in upstream.sessions:
        assert not session.transactions
        # Nothing after the failed handshake: no plaintext fallback on that connection.
        assert verbs(session)[-1] == "STARTTLS", session.commands
        assert b"MAIL" not in bytes(session.raw).upper()
    assert upstream.completed_transactions == []


def test_starttls_no_verify_accepts_any_certificate(willi, fake_upstream, pki, tmp_path) -> None:
    cert, key = pki.issue("other.example")
    upstream = fake_upstream(tls_context=pki.server_context(cert, key))
    cfg = make_config(tmp_path, [static_mapping(upstream.port, host="localhost", tls_verify=False)],
                      upstream_tls_ca=pki.ca_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    assert upstream.sessions[0].tls
    assert [t.data for t in upstream.completed_transactions] == [BODY]


def test_upstream_starttls_never(willi, fake_upstream, pki, tmp_path) -> None:
    upstream = fake_upstream(tls_context=pki.server_context())
    cfg = make_config(tmp_path, [static_mapping(upstream.port)], upstream_starttls="never")
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    session = upstream.sessions[0]
    assert "STARTTLS" not in verbs(session)
    assert not session.tls
    assert len(upstream.completed_transactions) == 1


@pytest.mark.parametrize("client_tls", [False, True])
def test_upstream_starttls_client_follows_the_client(willi, fake_upstream, pki, tmp_path, client_tls) -> None:
    upstream = fake_upstream(tls_context=pki.server_context())
    cfg = make_config(tmp_path, [static_mapping(upstream.port)], upstream_starttls="client",
                      tls_cert=pki.cert_file, tls_key=pki.key_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w, starttls_context=pki.client_context() if client_tls else None)
    wait_sessions_closed(upstream, 1)
    session = upstream.sessions[0]
    assert session.tls is client_tls
    assert ("STARTTLS" in verbs(session)) is client_tls
    assert len(upstream.completed_transactions) == 1


def test_upstream_starttls_always_without_client_tls(willi, fake_upstream, pki, tmp_path) -> None:
    upstream = fake_upstream(tls_context=pki.server_context())
    cfg = make_config(tmp_path, [static_mapping(upstream.port)], tls_cert=pki.cert_file, tls_key=pki.key_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    assert upstream.sessions[0].tls


# ---------------------------------------------------------------- XCLIENT

ALL_ATTRIBUTES = "NAME ADDR PORT PROTO HELO"


def test_xclient_ipv4(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo("client.example")
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        client_port = client.sock.getsockname()[1]
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    (line,) = xclient_lines(session)
    attrs = xclient_attributes(line)
    assert attrs == {"NAME": "[UNAVAILABLE]", "ADDR": "127.0.0.1", "PORT": str(client_port),
                     "PROTO": "ESMTP", "HELO": "client.example"}
    cmds = verbs(session)
    # XCLIENT after the first EHLO, then EHLO again (after its 220), then MAIL.
    i = cmds.index("XCLIENT")
    assert cmds[i - 1] == "EHLO" and cmds[i + 1] == "EHLO" and cmds[i + 2] == "MAIL", cmds
    # Postfix records the name of the EHLO after XCLIENT, so it must be the client's.
    assert session.commands[i - 1] == "EHLO mx.willi.test"
    assert session.commands[i + 1] == "EHLO client.example"


def test_xclient_ipv6(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], listen="[::1]:0"))
    assert w.host == "::1"
    client = w.raw()
    try:
        client.ehlo("v6.client.example")
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (line,) = xclient_lines(upstream.sessions[0])
    attrs = xclient_attributes(line)
    assert attrs["ADDR"] == "IPV6:::1"
    assert attrs["HELO"] == "v6.client.example"


def test_xclient_helo_cannot_inject_attributes(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    helo = "a b=c+d ü ADDR=6.6.6.6"
    client = w.raw()
    try:
        client.expect(220)
        client.send(f"EHLO {helo}\r\n".encode())
        client.expect(250)
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (line,) = xclient_lines(upstream.sessions[0])
    assert line.isascii(), line
    attrs = xclient_attributes(line)
    assert set(attrs) == set(ALL_ATTRIBUTES.split())
    assert attrs["HELO"] == helo
    assert attrs["ADDR"] == "127.0.0.1"
    assert line.count("=") == len(ALL_ATTRIBUTES.split())
    # The EHLO after XCLIENT carries the client's name as one neutered token.
    commands = upstream.sessions[0].commands
    after = commands[commands.index(line) + 1]
    assert after == "EHLO a?b=c+d???ADDR=6.6.6.6", after


def test_no_xclient_when_not_offered(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    assert "XCLIENT" not in verbs(upstream.sessions[0])
    assert verbs(upstream.sessions[0]).count("EHLO") == 1


def test_xclient_sends_only_offered_attributes(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient="ADDR HELO")
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    (line,) = xclient_lines(upstream.sessions[0])
    assert xclient_attributes(line) == {"ADDR": "127.0.0.1", "HELO": "client.example"}


def test_client_xclient_and_xforward_refused(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo("client.example")
        code, lines = client.cmd("XCLIENT ADDR=6.6.6.6 NAME=spoofed.example")
        assert code == 502 and lines[0].startswith("5.5.1"), (code, lines)
        code, lines = client.cmd("XFORWARD ADDR=6.6.6.6")
        assert code == 502 and lines[0].startswith("5.5.1"), (code, lines)
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        # Inside a transaction too.
        client.cmd("MAIL FROM:<alice@sender.example>")
        assert client.cmd("RCPT TO:<bob@example.com>")[0] == 250
        assert client.cmd("XCLIENT ADDR=6.6.6.6")[0] == 502
        assert client.cmd("XFORWARD ADDR=6.6.6.6")[0] == 502
        assert client.cmd("RSET")[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    for session in upstream.sessions:
        raw = bytes(session.raw)
        assert b"6.6.6.6" not in raw and b"spoofed" not in raw
        assert b"XFORWARD" not in raw.upper()
        (line,) = xclient_lines(session)  # Willi's own, once
        assert xclient_attributes(line)["ADDR"] == "127.0.0.1"


def test_xclient_disabled(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], xclient=False))
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    assert "XCLIENT" not in verbs(upstream.sessions[0])
    assert len(upstream.completed_transactions) == 1


def test_xclient_after_starttls(willi, fake_upstream, pki, tmp_path) -> None:
    """STARTTLS first, then XCLIENT over TLS, then EHLO again."""
    upstream = fake_upstream(tls_context=pki.server_context(), xclient=ALL_ATTRIBUTES)
    cfg = make_config(tmp_path, [static_mapping(upstream.port, host="localhost", tls_verify=True)],
                      upstream_tls_ca=pki.ca_file)
    w = willi(config=cfg)
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    session = upstream.sessions[0]
    assert session.tls
    assert verbs(session)[:6] == ["EHLO", "STARTTLS", "EHLO", "XCLIENT", "EHLO", "MAIL"], session.commands


# ---------------------------------------------------------------- connection reuse


def test_one_upstream_connection_for_two_transactions(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    with w.smtp() as client:
        client.ehlo("client.example")
        assert client.sendmail("alice@sender.example", ["bob@example.com"], b"Subject: 1\r\n\r\none\r\n") == {}
        assert client.sendmail("carol@sender.example", ["dave@example.com"], b"Subject: 2\r\n\r\ntwo\r\n") == {}
        assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 2)
        assert len(upstream.sessions) == 1
        assert not upstream.sessions[0].closed
    # The client's QUIT makes Willi QUIT the upstream.
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    assert len(session.transactions) == 2
    assert [t.data for t in session.transactions] == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"]
    assert session.commands[-1] == "QUIT"


def test_client_disconnect_without_quit_closes_upstream(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 1)
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)


# ---------------------------------------------------------------- timeouts


@pytest.mark.parametrize("step", ["greeting", "rcpt"])
def test_upstream_command_timeout_gives_451_442(willi, fake_upstream, tmp_path, step) -> None:
    upstream = fake_upstream(delays={step: 3})
    # The greeting belongs to connecting (upstream_connect_timeout): a server that accepts and never
    # greets is as good as unreachable, and the next upstream of a route is tried.
    cfg = make_config(tmp_path, [static_mapping(upstream.port)], upstream_command_timeout="1s",
                      upstream_connect_timeout="1s")
    w = willi(config=cfg)
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        start = time.monotonic()
        code, lines = client.cmd("RCPT TO:<bob@example.com>")
        elapsed = time.monotonic() - start
        assert code == 451 and lines[0].startswith("4.4.2"), (code, lines)
        assert 0.8 < elapsed < 2.8, elapsed
        # DATA is where the upstream would hear about the message: it must not.
        code, lines = client.cmd("DATA")
        assert code == 503 and lines[0].startswith("5.5.1"), (code, lines)
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    settle(0.1)
    assert not [c for s in upstream.sessions for c in s.commands if verb(c) == "DATA"]
    # The timed-out connection was dropped, not kept for another transaction.
    assert upstream.wait_for(lambda: all(s.closed for s in upstream.sessions))


def test_upstream_data_timeout_after_dot_gives_4xx(willi, fake_upstream, tmp_path) -> None:
    """No verdict on the message in time: a 4xx, never a 2xx (invariant 1)."""
    upstream = fake_upstream(delays={"dot": 3})
    cfg = make_config(tmp_path, [static_mapping(upstream.port)], upstream_data_timeout="1s")
    w = willi(config=cfg)
    client = w.raw()
    try:
        client.ehlo()
        start = time.monotonic()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        elapsed = time.monotonic() - start
        assert final is not None and final[0] == 451 and final[1][0].startswith("4.4.2"), final
        assert elapsed < 2.8, elapsed
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()


# ---------------------------------------------------------------- upstream replies during setup


def test_upstream_without_ehlo_gets_helo(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(ehlo_supported=False, xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    deliver_with_smtplib(w)
    wait_sessions_closed(upstream, 1)
    cmds = verbs(upstream.sessions[0])
    assert cmds[:3] == ["EHLO", "HELO", "MAIL"], cmds  # no extensions known: no XCLIENT either
    assert len(upstream.completed_transactions) == 1


def test_xclient_proto_smtp_for_helo_client(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.expect(220)
        assert client.cmd("HELO old.client.example")[0] == 250
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (line,) = xclient_lines(upstream.sessions[0])
    attrs = xclient_attributes(line)
    assert attrs["PROTO"] == "SMTP" and attrs["HELO"] == "old.client.example"


def test_xclient_commands_at_most_512_octets(willi, fake_upstream, tmp_path) -> None:
    """A 254-octet non-ASCII HELO becomes ~760 octets of xtext: it must not make an XCLIENT line over 512."""
    upstream = fake_upstream(xclient=ALL_ATTRIBUTES)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    helo = "ü" * 127
    client = w.raw()
    try:
        client.expect(220)
        client.send(f"EHLO {helo}\r\n".encode())
        client.expect(250)
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250, final
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    lines = xclient_lines(upstream.sessions[0])
    assert lines
    for line in lines:
        assert len(line.encode()) + 2 <= 512, f"XCLIENT command of {len(line.encode()) + 2} octets"
        xclient_attributes(line)


def test_upstream_greeting_refusal_relayed_verbatim(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(greeting="554-5.7.1 this upstream\r\n554 5.7.1 serves nobody today")
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, _ = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert replies[1] == (554, ["5.7.1 this upstream", "5.7.1 serves nobody today"])
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()


@pytest.mark.parametrize("step", ["greeting", "ehlo", "mail", "rcpt", "data", "dot"])
def test_upstream_421_never_leaves_the_client_in_doubt(willi, fake_upstream, tmp_path, step) -> None:
    """An upstream 421 reaches the client as a 4xx with the upstream's text.

    If Willi passes the code 421 on, it must also close the client connection
    (RFC 5321: 421 means the channel closes); if it keeps the connection,
    the code must be 451, as willi/session.py `relay` documents.
    """
    reply = "421 4.3.2 upstream busy"
    upstream = fake_upstream(greeting=reply if step == "greeting" else "220 fake.upstream ESMTP",
                             replies={} if step == "greeting" else {step: reply})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        got = final if step in ("data", "dot") else replies[1]
        assert got is not None
        code, lines = got
        assert code in (421, 451) and lines == ["4.3.2 upstream busy"], (step, got)
        if code == 421:
            assert client.closed(), f"Willi sent 421 at {step} but kept the connection open"
            return
        assert client.cmd("RSET")[0] == 250
        # The fake hung up after its 421 (RFC 5321 3.8); Willi must have let go without a word.
        assert upstream.wait_for(lambda: upstream.sessions[0].closed)
        assert bytes(upstream.sessions[0].after_421) == b"", f"Willi wrote after the 421 at {step}"
        assert not any(t.reply.startswith("2") for t in upstream.all_transactions)
        # The next transaction of the same client goes over a new upstream connection.
        upstream.greeting, upstream.replies = "220 fake.upstream ESMTP", {}
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250, (step, replies, final)
        assert len(upstream.sessions) == 2
        assert upstream.refused_commands == []
    finally:
        client.close()


@pytest.mark.parametrize(("sender", "recipient"), [
    ("j\u00fcrg@sender.example", "bob@example.com"),
    ("alice@sender.example", "b\u00f6b@example.com"),
    ("alice@sender.example", "bob@example.com"),  # SMTPUTF8 declared, ASCII envelope: the content may need it
], ids=["utf8-sender", "utf8-recipient", "ascii-envelope"])
def test_smtputf8_towards_an_upstream_without_it_gives_550_567(willi, fake_upstream, tmp_path, sender,
                                                               recipient) -> None:
    """SMTPUTF8 cannot be dropped (design.md): the recipient is refused with 550 5.6.7, nothing is sent."""
    upstream = fake_upstream(extensions=without("SMTPUTF8"))
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd(f"MAIL FROM:<{sender}> SMTPUTF8")[0] == 250
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        assert code == 550 and lines[0].startswith("5.6.7"), (code, lines)
        assert client.cmd("DATA")[0] == 503
        assert client.cmd("RSET")[0] == 250
        assert upstream.wait_for(lambda: bool(upstream.sessions)), "Willi asks the upstream what it offers"
        assert not [c for c in upstream.sessions[0].commands if verb(c) == "MAIL"]
        # Without SMTPUTF8 the same client connection and upstream carry an ASCII message.
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250, (replies, final)
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    assert [c for c in upstream.sessions[0].commands if verb(c) == "MAIL"] == ["MAIL FROM:<alice@sender.example>"]
    assert upstream.refused_commands == []


def test_upstream_421_after_an_accepted_recipient_defers_the_data(willi, fake_upstream) -> None:
    """The upstream closing after one RCPT was accepted: DATA must get a 4xx, never 503 or 2xx."""
    upstream = fake_upstream(rcpt_replies={"second@example.com": "421 4.3.0 fake.upstream going down"})
    w = willi(upstream_port=upstream.port)
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<first@example.com>")[0] == 250
        code, lines = client.cmd("RCPT TO:<second@example.com>")
        assert (code, lines) == (451, ["4.3.0 fake.upstream going down"])
        code, lines = client.cmd("DATA")
        assert code == 451 and lines[0].startswith("4.4.2"), (code, lines)
        assert client.cmd("NOOP")[0] == 250, "the client's own connection stays usable"
    finally:
        client.close()
    assert not upstream.completed_transactions

"""The upstream hop as a postmaster configures it (issue 10, points 8, 9, 10, 12).

`xclient = true | false | "required"` (global and per [[mappings]] table),
the per-route `tls` level (CSV fourth column, static key; the SQL column is
in test_postmaster_sql below), the TLS and refusal fields of the log line,
and TLS close_notify on both hops. Client -> Willi (in-process) ->
FakeUpstream, over real sockets.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import pytest
from certs import TestPKI
from fakeupstream import FakeUpstream
from postmaster_support import all_logs, transaction_log
from proxy_helpers import BODY, make_config, static_mapping, transaction, verbs, wait_sessions_closed
from support import RawClient

from willi.cli import main

ALL_XCLIENT = "NAME ADDR PORT PROTO HELO"
CSV_HEADER = "pattern;server;tls_verify;tls\n"


def one_message(w, recipient: str = "bob@example.com") -> tuple[tuple[int, list[str]], tuple[int, list[str]] | None]:
    """EHLO, MAIL, RCPT `recipient`, DATA; the RCPT reply and the final reply; then QUIT."""
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", [recipient])
        assert replies[0][0] == 250, replies
        assert client.cmd("QUIT")[0] == 221
        return replies[1], final
    finally:
        client.close()


def assert_code(reply: tuple[int, list[str]] | None, code: int, status: str) -> None:
    assert reply is not None and reply[0] == code and reply[1][-1].startswith(status), reply


def mail_commands(upstream: FakeUpstream) -> list[str]:
    return [c for s in upstream.sessions for c in s.commands if c.upper().startswith("MAIL")]


# ---------------------------------------------------------------- point 8: xclient


@pytest.mark.parametrize("where", ["global", "mapping"])
def test_xclient_required_without_xclient_gives_451_470(willi, fake_upstream, tmp_path, where: str) -> None:
    upstream = fake_upstream()  # no XCLIENT offered
    mapping = static_mapping(upstream.port)
    if where == "mapping":
        mapping["xclient"] = "required"
        cfg = make_config(tmp_path, [mapping])
    else:
        cfg = make_config(tmp_path, [mapping], xclient="required")
    w = willi(config=cfg)
    rcpt, final = one_message(w)
    assert_code(rcpt, 451, "4.7.0")
    assert_code(final, 503, "5.5.1")
    wait_sessions_closed(upstream)
    assert upstream.sessions, "Willi must have connected to find out"
    assert mail_commands(upstream) == [], "no transaction without XCLIENT"
    assert upstream.refused_commands == []


def test_xclient_required_per_mapping_leaves_other_mappings_alone(willi, fake_upstream, tmp_path) -> None:
    strict, lenient = fake_upstream(), fake_upstream()
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{CSV_HEADER}example.com;127.0.0.1:{strict.port};false\n")
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(csv), "xclient": "required"},
                                            static_mapping(lenient.port)]))
    assert_code(one_message(w, "bob@example.com")[0], 451, "4.7.0")
    assert_code(one_message(w, "bob@example.org")[1], 250, "2.0.0")
    assert lenient.wait_for(lambda: len(lenient.completed_transactions) == 1)
    assert mail_commands(strict) == []


def test_xclient_true_in_a_mapping_overrides_a_global_required(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    mapping = {**static_mapping(upstream.port), "xclient": True}
    w = willi(config=make_config(tmp_path, [mapping], xclient="required"))
    assert_code(one_message(w)[1], 250, "2.0.0")


def test_xclient_required_with_xclient_offered_delivers(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient=ALL_XCLIENT)
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], xclient="required"))
    assert_code(one_message(w)[1], 250, "2.0.0")
    wait_sessions_closed(upstream, 1)
    assert "XCLIENT" in verbs(upstream.sessions[0])


def test_xclient_true_without_xclient_warns_once_per_upstream(willi, fake_upstream, tmp_path) -> None:
    first, second = fake_upstream(), fake_upstream()
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{CSV_HEADER}example.com;127.0.0.1:{first.port};false\nexample.org;127.0.0.1:{second.port};false\n")
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(csv)}]))
    with all_logs() as logs:
        for recipient in ["a@example.com", "b@example.com", "c@example.org", "d@example.com", "e@example.org"]:
            assert_code(one_message(w, recipient)[1], 250, "2.0.0")
    warnings = [m for m in logs.messages if "does not offer XCLIENT" in m]
    assert len(warnings) == 2, warnings
    assert sorted(w.split(" ", 1)[0] for w in warnings) == sorted(
        [f"upstream=127.0.0.1:{first.port}", f"upstream=127.0.0.1:{second.port}"])
    assert "sees Willi's address, not the client's" in warnings[0]
    assert len(first.completed_transactions) == 3 and len(second.completed_transactions) == 2


@pytest.mark.parametrize("where", ["global", "mapping"])
def test_xclient_false_never_sends_xclient(willi, fake_upstream, tmp_path, where: str) -> None:
    upstream = fake_upstream(xclient=ALL_XCLIENT)
    mapping = static_mapping(upstream.port)
    if where == "mapping":
        mapping["xclient"] = False
        cfg = make_config(tmp_path, [mapping], xclient="required")
    else:
        cfg = make_config(tmp_path, [mapping], xclient=False)
    w = willi(config=cfg)
    with all_logs() as logs:
        assert_code(one_message(w)[1], 250, "2.0.0")
    wait_sessions_closed(upstream, 1)
    assert b"XCLIENT" not in bytes(upstream.sessions[0].raw).upper()
    assert not [m for m in logs.messages if "XCLIENT" in m and "warning" in m.lower()]


# ---------------------------------------------------------------- point 9: per-route tls


@pytest.fixture
def upstreams(fake_upstream, pki: TestPKI, other_pki: TestPKI) -> Callable[[str], FakeUpstream]:
    """Fakes by kind: plain (no STARTTLS), good (our CA, loopback names), wrong-name, untrusted, refuses."""

    def make(kind: str) -> FakeUpstream:
        if kind == "plain":
            return fake_upstream()
        if kind == "good":
            return fake_upstream(tls_context=pki.server_context())
        if kind == "wrong-name":
            return fake_upstream(tls_context=pki.server_context(*pki.issue("other.example")))
        if kind == "untrusted":
            return fake_upstream(tls_context=other_pki.server_context())
        if kind == "refuses":
            return fake_upstream(tls_context=pki.server_context(),
                                 replies={"starttls": "454 4.7.0 TLS not available due to local problem"})
        raise ValueError(kind)

    return make


DELIVERED_PLAIN, DELIVERED_TLS, REFUSED_475 = "plain", "tls", "451 4.7.5"

TLS_CASES = [
    ("none", "good", DELIVERED_PLAIN), ("none", "plain", DELIVERED_PLAIN),
    ("may", "plain", DELIVERED_PLAIN), ("may", "untrusted", DELIVERED_TLS), ("may", "wrong-name", DELIVERED_TLS),
    ("may", "refuses", DELIVERED_PLAIN),
    ("encrypt", "plain", REFUSED_475), ("encrypt", "untrusted", DELIVERED_TLS), ("encrypt", "refuses", REFUSED_475),
    ("verify", "good", DELIVERED_TLS), ("verify", "untrusted", REFUSED_475), ("verify", "wrong-name", REFUSED_475),
    ("verify", "plain", REFUSED_475), ("verify", "refuses", REFUSED_475),
    # no tls column: today's behaviour, governed by tls_verify (true by default)
    ("", "plain", DELIVERED_PLAIN), ("", "good", DELIVERED_TLS), ("", "untrusted", REFUSED_475),
    ("", "wrong-name", REFUSED_475),
]


@pytest.mark.parametrize(("level", "kind", "expected"), TLS_CASES,
                         ids=[f"{level or 'absent'}-{kind}" for level, kind, _ in TLS_CASES])
def test_csv_tls_column(willi, upstreams, pki, tmp_path, level: str, kind: str, expected: str) -> None:
    upstream = upstreams(kind)
    csv = tmp_path / "routes.csv"
    tls_verify = "" if level == "" else "false"  # the column decides when given, even against tls_verify
    csv.write_text(f"{CSV_HEADER}example.com;localhost:{upstream.port};{tls_verify};{level}\n")
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(csv)}], upstream_tls_ca=pki.ca_file))
    with transaction_log() as txlog:
        rcpt, final = one_message(w)
        [record] = txlog.wait(1)
    wait_sessions_closed(upstream)
    sessions = upstream.sessions
    if expected == REFUSED_475:
        assert_code(rcpt, 451, "4.7.5")
        assert mail_commands(upstream) == [], "no plaintext fallback: nothing of the transaction was sent"
        for session in sessions:
            assert verbs(session)[-1] in ("EHLO", "STARTTLS"), session.commands
        assert record["result"] == "rejected" and record["error_src"] == "upstream", record
        return
    assert_code(final, 250, "2.0.0")
    [session] = sessions
    assert session.tls is (expected == DELIVERED_TLS), session.commands
    assert upstream.completed_transactions[0].data == BODY
    if level == "none":
        assert "STARTTLS" not in verbs(session)
    if expected == DELIVERED_TLS:
        verified = level == "verify" or (level == "" and kind == "good")
        assert record["upstream_tls"].startswith("TLSv1."), record
        assert record["upstream_tls"].endswith(" verified" if verified else " unverified"), record
    else:
        assert record["upstream_tls"] == "no", record


@pytest.mark.parametrize(("kind", "expected"), [("good", DELIVERED_TLS), ("wrong-name", REFUSED_475)])
def test_verify_an_ip_literal_upstream_against_its_certificate(willi, upstreams, pki, tmp_path, kind: str,
                                                               expected: str) -> None:
    """`server = "127.0.0.1:port"` with tls = verify: the certificate must name the address (IP SAN)."""
    upstream = upstreams(kind)
    mapping = {"type": "static", "server": f"127.0.0.1:{upstream.port}", "tls": "verify"}
    w = willi(config=make_config(tmp_path, [mapping], upstream_tls_ca=pki.ca_file))
    rcpt, final = one_message(w)
    if expected == REFUSED_475:
        assert_code(rcpt, 451, "4.7.5")
    else:
        assert_code(final, 250, "2.0.0")
        assert upstream.sessions[0].tls


@pytest.mark.parametrize(("level", "kind", "expected"), [
    ("encrypt", "plain", REFUSED_475), ("none", "good", DELIVERED_PLAIN), ("verify", "good", DELIVERED_TLS)])
def test_static_tls_key(willi, upstreams, pki, tmp_path, level: str, kind: str, expected: str) -> None:
    upstream = upstreams(kind)
    mapping = {"type": "static", "server": f"localhost:{upstream.port}", "tls": level}
    w = willi(config=make_config(tmp_path, [mapping], upstream_tls_ca=pki.ca_file))
    rcpt, final = one_message(w)
    if expected == REFUSED_475:
        assert_code(rcpt, 451, "4.7.5")
        return
    assert_code(final, 250, "2.0.0")
    assert upstream.sessions[0].tls is (expected == DELIVERED_TLS)


@pytest.mark.parametrize(("row", "shown"), [
    ("example.com;mx.example.net:25;false;verify", "tls=verify (from the mapping)"),
    ("example.com;mx.example.net:25;;none", "tls=none (from the mapping)"),
    ("example.com;mx.example.net:25;true", "tls=opportunistic (upstream_starttls=always, certificate verified"),
    ("example.com;mx.example.net:25;false", "tls=opportunistic (upstream_starttls=always, certificate not verified"),
])
def test_lookup_shows_the_effective_tls_policy(capsys, tmp_path, row: str, shown: str) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{CSV_HEADER}{row}\n")
    config = tmp_path / "w.toml"
    config.write_text(f'[[mappings]]\ntype = "csv"\nfile = "{csv}"\n')
    assert main(["-c", str(config), "--lookup", "a@example.com"]) == 0
    assert shown in capsys.readouterr().out


def test_bad_tls_level_is_refused_with_file_and_line(tmp_path) -> None:
    from willi.mappings.csv import CsvFormatError, parse_csv

    with pytest.raises(CsvFormatError, match=r"^routes.csv:2: tls must be one of none, may, encrypt, verify"):
        parse_csv(f"{CSV_HEADER}example.com;mx;true;sometimes\n", source="routes.csv")


# ---------------------------------------------------------------- point 10: which hop the TLS fields describe


def test_log_tls_fields_name_each_hop(willi, upstreams, pki, tmp_path) -> None:
    upstream = upstreams("good")
    mapping = {"type": "static", "server": f"localhost:{upstream.port}", "tls": "verify"}
    w = willi(config=make_config(tmp_path, [mapping], upstream_tls_ca=pki.ca_file, tls_cert=pki.cert_file,
                                 tls_key=pki.key_file))
    with transaction_log() as txlog:
        one_message(w)  # plaintext client
        client = w.raw()
        try:
            client.ehlo()
            assert client.cmd("STARTTLS")[0] == 220
            client.starttls(pki.client_context())
            client.send("EHLO tls.client.example\r\n")
            client.expect(250)
            _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
            assert_code(final, 250, "2.0.0")
            client.cmd("QUIT")
        finally:
            client.close()
        plain, tls = txlog.wait(2)
    assert plain["tls"] == "no", plain
    assert tls["tls"] in ("TLSv1.2", "TLSv1.3"), tls
    for record in (plain, tls):
        protocol, cipher, verified = record["upstream_tls"].split(" ")
        assert protocol in ("TLSv1.2", "TLSv1.3") and cipher and verified == "verified", record
        assert record["result"] == "accepted" and record["upstream"] == f"localhost:{upstream.port}", record
        assert record["upstream_addr"] == "127.0.0.1", record


def test_log_refused_field_lists_each_recipient_with_its_code(willi, fake_upstream, tmp_path) -> None:
    a = fake_upstream(rcpt_replies={"nouser@example.com": "550 5.1.1 <nouser@example.com>: no such user"})
    b = fake_upstream()
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{CSV_HEADER}example.com;127.0.0.1:{a.port};false\nexample.org;127.0.0.1:{b.port};false\n")
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(csv)}], max_recipients=2))
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.ehlo()
            replies, final = transaction(client, "alice@sender.example", [
                "nobody@elsewhere.example", "bob@example.com", "carol@example.org", "nouser@example.com",
                "\"a%b\"@example.com", "dave@example.com", "eve@example.com"])
            assert [r[0] for r in replies] == [250, 554, 250, 452, 550, 554, 250, 452], replies
            assert_code(final, 250, "2.0.0")
            client.cmd("QUIT")
        finally:
            client.close()
        [record] = txlog.wait(1)
    assert record["refused"] == ("<nobody@elsewhere.example>:554,<carol@example.org>:452,<nouser@example.com>:550,"
                                 "<\"a%b\"@example.com>:554,<eve@example.com>:452"), record
    assert record["to"] == "<bob@example.com>,<dave@example.com>", record


def test_log_refused_field_counts_past_the_first_ten(willi, fake_upstream, tmp_path) -> None:
    a = fake_upstream()
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{CSV_HEADER}example.com;127.0.0.1:{a.port};false\n")
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(csv)}], max_errors=100))
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.ehlo()
            recipients = [f"u{i}@nowhere.example" for i in range(13)] + ["bob@example.com"]
            _, final = transaction(client, "alice@sender.example", recipients)
            assert_code(final, 250, "2.0.0")
            client.cmd("QUIT")
        finally:
            client.close()
        [record] = txlog.wait(1)
    shown = ",".join(f"<u{i}@nowhere.example>:554" for i in range(10))
    assert record["refused"] == f"{shown},+3 more", record


# ---------------------------------------------------------------- point 12: TLS close_notify on both hops


def test_tls_client_that_quits_receives_close_notify(willi, fake_upstream, pki, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], tls_cert=pki.cert_file,
                                 tls_key=pki.key_file))
    client = RawClient(w.host, w.port)
    try:
        client.ehlo()
        assert client.cmd("STARTTLS")[0] == 220
        client.starttls(pki.client_context())
        client.send("EHLO client.example\r\n")
        client.expect(250)
        assert client.cmd("QUIT")[0] == 221
        assert isinstance(client.sock, ssl.SSLSocket)
        client.sock.settimeout(5)
        client.sock.unwrap()  # SSLEOFError ("EOF occurred in violation of protocol") without Willi's close_notify
    finally:
        client.close()


def test_upstream_with_tls_receives_close_notify_after_quit(willi, upstreams, pki, tmp_path) -> None:
    upstream = upstreams("good")
    mapping = {"type": "static", "server": f"localhost:{upstream.port}", "tls": "verify"}
    w = willi(config=make_config(tmp_path, [mapping], upstream_tls_ca=pki.ca_file))
    assert_code(one_message(w)[1], 250, "2.0.0")
    wait_sessions_closed(upstream, 1)
    [session] = upstream.sessions
    assert session.tls and session.commands[-1] == "QUIT", session.commands
    assert session.tls_close_notify is True, "Willi closed the TLS connection without close_notify"


def test_fake_upstream_sees_a_ragged_close_as_such(pki: TestPKI, fake_upstream) -> None:
    """The recording above can fail: a client that just closes after QUIT is recorded as unclean."""
    upstream = fake_upstream(tls_context=pki.server_context())
    client = RawClient("127.0.0.1", upstream.port)
    try:
        client.ehlo()
        assert client.cmd("STARTTLS")[0] == 220
        client.starttls(pki.client_context())
        client.send("EHLO client.example\r\n")
        client.expect(250)
        assert client.cmd("QUIT")[0] == 221
        socket.socket.shutdown(client.sock, socket.SHUT_RDWR)  # TCP FIN, no close_notify
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    assert upstream.sessions[0].tls_close_notify is False

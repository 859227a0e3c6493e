"""Promises of design.md that had no test (issue 11 point 4), and the check that tests/README.md's map is real.

- the client's verified reverse name in XCLIENT NAME, `[UNAVAILABLE]` or
  `[TEMPUNAVAIL]` (client_name_lookup on: every other test turns it off);
  the DNS is an edge we do not own, so the resolver calls are replaced
  for test addresses, and one case uses the machine's real resolver;
- an upstream refusing XCLIENT: 451 4.4.0;
- tls_verify = true towards an upstream without STARTTLS: plaintext
  (the route's `tls` level is what requires TLS);
- `error=` / `error_src=` for each source, and one log line per
  transaction whatever the outcome;
- passwords in no log line and no error output;
- upstream timeouts shorter than the client's patience by default;
- every test that tests/README.md names exists.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from postmaster_support import ROOT, all_logs, run_willi, transaction_log
from proxy_helpers import BODY, make_config, static_mapping, transaction, verb, wait_sessions_closed
from support import RawClient

from willi import dns as dns_module
from willi import relay as relay_module
from willi import session as session_module
from willi.config import Config, ConfigError, parse_config
from willi.dns import DNS, TEMPUNAVAIL, UNAVAILABLE
from willi.session import SmtpSession

# ---------------------------------------------------------------- reverse DNS in XCLIENT NAME

REAL_GETHOSTBYADDR = socket.gethostbyaddr
REAL_GETADDRINFO = socket.getaddrinfo


class FakeDns:
    """PTR and A answers for test addresses; everything else goes to the real resolver."""

    def __init__(self) -> None:
        self.ptr: dict[str, Callable[[], str]] = {}
        self.forward: dict[str, Callable[[], list[str]]] = {}

    def gethostbyaddr(self, addr: str) -> tuple[str, list[str], list[str]]:
        answer = self.ptr.get(addr)
        if answer is None:
            return REAL_GETHOSTBYADDR(addr)
        return answer(), [], [addr]

    def getaddrinfo(self, host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        answer = self.forward.get(host) if isinstance(host, str) else None
        if answer is None:
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port or 0)) for ip in answer()]


def raises(exc: BaseException) -> Callable[[], object]:
    def answer() -> object:
        raise exc

    return answer


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDns]:
    fake = FakeDns()
    monkeypatch.setattr(dns_module.socket, "gethostbyaddr", fake.gethostbyaddr)
    monkeypatch.setattr(dns_module.socket, "getaddrinfo", fake.getaddrinfo)
    DNS.clear()
    yield fake
    DNS.clear()


def xclient_name(w, upstream: FakeUpstream, source: str) -> tuple[str, float]:
    """Send one message from `source`; the NAME the upstream got in XCLIENT, and how long the RCPT took."""
    client = RawClient(w.host, w.port, source=source)
    try:
        client.ehlo("client.example")
        assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
        started = time.monotonic()
        code, lines = client.cmd("RCPT TO:<b@example.com>")
        elapsed = time.monotonic() - started
        assert code == 250, (code, lines)
        assert client.cmd("DATA")[0] == 354
        client.send(BODY + b".\r\n")
        assert client.reply()[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(upstream)
    [line] = [c for s in upstream.sessions for c in s.commands if verb(c) == "XCLIENT"]
    names = re.findall(r"\bNAME=(\S+)", line)
    assert len(names) == 1, line
    assert upstream.refused_commands == []
    return names[0], elapsed


def name_lookup_willi(willi, upstream: FakeUpstream, tmp_path: Path):
    return willi(config=make_config(tmp_path, [static_mapping(upstream.port)], client_name_lookup=True))


def test_xclient_name_is_the_verified_reverse_name(willi, fake_upstream, tmp_path, dns) -> None:
    dns.ptr["127.0.0.51"] = lambda: "client51.verified.test"
    dns.forward["client51.verified.test"] = lambda: ["192.0.2.9", "127.0.0.51"]
    upstream = fake_upstream(xclient="NAME ADDR")
    name, _ = xclient_name(name_lookup_willi(willi, upstream, tmp_path), upstream, "127.0.0.51")
    assert name == "client51.verified.test"


@pytest.mark.parametrize(("ptr", "forward", "expected"), [
    (lambda: "liar.test", lambda: ["192.0.2.1"], UNAVAILABLE),  # does not resolve back
    (raises(socket.herror(1, "Unknown host")), None, UNAVAILABLE),  # no PTR record
    (lambda: "gone.test", raises(socket.gaierror(socket.EAI_NONAME, "Name or service not known")), UNAVAILABLE),
    (raises(socket.herror(2, "Host name lookup failure")), None, TEMPUNAVAIL),  # TRY_AGAIN
    (lambda: "flaky.test", raises(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")), TEMPUNAVAIL),
], ids=["unverified", "no-ptr", "name-does-not-resolve", "ptr-try-again", "forward-try-again"])
def test_xclient_name_unavailable_or_tempunavail(willi, fake_upstream, tmp_path, dns, ptr, forward,
                                                  expected: str) -> None:
    source = f"127.0.0.{60 + secrets.randbelow(100)}"
    dns.ptr[source] = ptr
    if forward is not None:
        dns.forward[ptr()] = forward
    upstream = fake_upstream(xclient="NAME ADDR")
    name, _ = xclient_name(name_lookup_willi(willi, upstream, tmp_path), upstream, source)
    assert name == expected


def test_xclient_name_timed_out_is_tempunavail(willi, fake_upstream, tmp_path, dns, monkeypatch) -> None:
    """A resolver that does not answer in time: [TEMPUNAVAIL], and the client waits only the bounded time."""
    monkeypatch.setattr(session_module, "NAME_LOOKUP_WAIT", 0.5)
    release = threading.Event()

    def slow() -> str:
        release.wait(10)
        return "slow.test"

    dns.ptr["127.0.0.52"] = slow
    dns.forward["slow.test"] = lambda: ["127.0.0.52"]
    upstream = fake_upstream(xclient="NAME ADDR")
    try:
        name, elapsed = xclient_name(name_lookup_willi(willi, upstream, tmp_path), upstream, "127.0.0.52")
    finally:
        release.set()
    assert name == TEMPUNAVAIL
    assert elapsed < 4.0, f"the RCPT waited {elapsed:.1f}s for DNS"


def real_verified_name(addr: str) -> str:
    """What a forward-confirmed reverse lookup gives on this machine, computed independently of Willi."""
    try:
        name = REAL_GETHOSTBYADDR(addr)[0]
        forward = {info[4][0] for info in REAL_GETADDRINFO(name, None, proto=socket.IPPROTO_TCP)}
    except socket.herror as exc:
        return TEMPUNAVAIL if exc.errno == 2 else UNAVAILABLE
    except socket.gaierror as exc:
        return TEMPUNAVAIL if exc.errno == socket.EAI_AGAIN else UNAVAILABLE
    return name if addr in forward else UNAVAILABLE


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.2"])
def test_xclient_name_with_the_real_resolver(willi, fake_upstream, tmp_path, source: str) -> None:
    """No monkeypatching: /etc/hosts (127.0.0.1 localhost on Debian) and a loopback address without a name."""
    DNS.clear()
    expected = real_verified_name(source)
    upstream = fake_upstream(xclient="NAME ADDR")
    name, _ = xclient_name(name_lookup_willi(willi, upstream, tmp_path), upstream, source)
    assert name == expected
    if source == "127.0.0.1" and expected != UNAVAILABLE:
        assert Path("/etc/hosts").read_text().count(expected) >= 1


def test_xclient_name_not_looked_up_when_disabled(willi, fake_upstream, tmp_path, dns) -> None:
    looked_up: list[str] = []

    def ptr() -> str:
        looked_up.append("ptr")
        return "never.test"

    dns.ptr["127.0.0.53"] = ptr
    upstream = fake_upstream(xclient="NAME ADDR")
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], client_name_lookup=False))
    name, _ = xclient_name(w, upstream, "127.0.0.53")
    assert name == UNAVAILABLE and looked_up == []


# ---------------------------------------------------------------- XCLIENT refused, tls_verify without STARTTLS


def test_upstream_refusing_xclient_gives_451_440(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(xclient="NAME ADDR PORT PROTO HELO",
                             replies={"xclient": "550 5.7.0 Error: insufficient authorization"})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "a@sender.example", ["b@example.com"])
        assert replies[1][0] == 451 and replies[1][1][0].startswith("4.4.0"), replies
        assert final is not None and final[0] == 503
    finally:
        client.close()
    wait_sessions_closed(upstream)
    assert not [c for s in upstream.sessions for c in s.commands if verb(c) in ("MAIL", "RCPT", "DATA")]


def test_tls_verify_true_without_starttls_goes_on_in_plaintext(willi, fake_upstream, tmp_path) -> None:
    """Documented decision: tls_verify checks a certificate *when TLS is used*; requiring TLS is `tls = encrypt`."""
    upstream = fake_upstream()  # offers no STARTTLS
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port, tls_verify=True)]))
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.ehlo()
            _, final = transaction(client, "a@sender.example", ["b@example.com"])
            assert final is not None and final[0] == 250, final
            client.cmd("QUIT")
        finally:
            client.close()
        [record] = txlog.wait(1)
    assert record["upstream_tls"] == "no", record
    assert not upstream.sessions[0].tls and upstream.completed_transactions[0].data == BODY


# ---------------------------------------------------------------- error= / error_src=, one line per transaction


@pytest.fixture
def logged(willi, fake_upstream, tmp_path):
    """`logged(**fake kwargs)` -> (willi, upstream); CSV routes example.com to the fake, nothing else."""

    def make(settings: dict | None = None, **kwargs) -> tuple[object, FakeUpstream]:
        upstream = fake_upstream(**kwargs)
        csv = tmp_path / "routes.csv"
        csv.write_text(f"pattern;server;tls_verify\nexample.com;127.0.0.1:{upstream.port};false\n")
        cfg = make_config(tmp_path, [{"type": "csv", "file": str(csv)}], **(settings or {}))
        return willi(config=cfg), upstream

    return make


def only_record(txlog, settle: float = 0.3) -> dict[str, str]:
    [record] = txlog.wait(1)
    time.sleep(settle)
    assert len(txlog.records()) == 1, f"one transaction, one line: {txlog.messages}"
    return record


def session_with(w, script: Callable[[RawClient], None]) -> None:
    client = w.raw()
    try:
        client.ehlo()
        script(client)
    finally:
        client.close()


def data_cut(c: RawClient) -> None:
    c.send("MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    c.expect(250)
    c.expect(250)
    c.expect(354)
    c.send(b"Subject: cut\r\n\r\npartial")


def data_stall(c: RawClient) -> None:
    data_cut(c)
    assert c.reply()[0] == 421


def rcpt_then(verb_: str) -> Callable[[RawClient], None]:
    def script(c: RawClient) -> None:
        assert c.cmd("MAIL FROM:<a@sender.example>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.com>")[0] == 250
        c.cmd(verb_)

    return script


def refused_then_quit(recipient: str) -> Callable[[RawClient], None]:
    def script(c: RawClient) -> None:
        assert c.cmd("MAIL FROM:<a@sender.example>")[0] == 250
        assert c.cmd(f"RCPT TO:<{recipient}>")[0] // 100 in (4, 5)
        c.cmd("QUIT")

    return script


def big_message(c: RawClient) -> None:
    _, final = transaction(c, "a@sender.example", ["b@example.com"], b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")
    assert final is not None and final[0] == 552
    c.cmd("QUIT")


def whole(c: RawClient) -> None:
    transaction(c, "a@sender.example", ["b@example.com"])
    c.cmd("QUIT")


ERROR_CASES = [
    # (id, fake kwargs, settings, script, result, error_src, error fragment)
    ("client-disconnect", {}, {}, data_cut, "aborted", "client", "client disconnected"),
    ("client-timeout", {}, {"read_timeout": "1s"}, data_stall, "aborted", "client", "client timeout"),
    ("client-rset", {}, {}, rcpt_then("RSET"), "aborted", "client", "client sent RSET"),
    ("client-quit", {}, {}, rcpt_then("QUIT"), "aborted", "client", "client sent QUIT"),
    ("client-too-large", {}, {"max_message_bytes": 1000}, big_message, "rejected", "client", "message too large"),
    ("proxy-routing-syntax", {}, {}, refused_then_quit('"a%b"@example.com'), "rejected", "proxy",
     "no recipient accepted"),
    ("lookup-unmapped", {}, {}, refused_then_quit("b@elsewhere.example"), "rejected", "lookup",
     "no recipient accepted"),
    ("upstream-rcpt-refused", {"rcpt_replies": {"b@example.com": "550 5.1.1 no such user"}}, {},
     refused_then_quit("b@example.com"), "rejected", "upstream", "no recipient accepted"),
    ("upstream-dot-refused", {"replies": {"dot": "554 5.7.1 spam"}}, {}, whole, "rejected", "upstream",
     "upstream refused message"),
    ("upstream-dot-timeout", {"delays": {"dot": 3}}, {"upstream_data_timeout": "1s"}, whole, "failed", "upstream",
     "timeout"),
    ("upstream-data-refused", {"replies": {"data": "554 5.5.1 no"}}, {}, whole, "rejected", "upstream",
     "upstream refused DATA"),
]


@pytest.mark.parametrize(("fake", "settings", "script", "result", "source", "fragment"),
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_error_and_error_src_for_each_source(logged, fake, settings, script, result: str, source: str,
                                             fragment: str) -> None:
    w, _ = logged(settings, **fake)
    with transaction_log() as txlog:
        session_with(w, script)
        record = only_record(txlog)
    assert record["result"] == result and record["error_src"] == source, record
    assert fragment in record["error"], record
    assert record["sid"] and record["from"] == "<a@sender.example>" and int(record["duration_ms"]) >= 0, record


def test_error_src_lookup_when_a_mapping_fails(willi, fake_upstream, tmp_path) -> None:
    w = willi(config=make_config(tmp_path, [{"type": "csv", "file": str(tmp_path / "missing.csv")}]))
    with transaction_log() as txlog:
        session_with(w, refused_then_quit("b@example.com"))
        record = only_record(txlog)
    assert (record["result"], record["error_src"], record["reply"]) == (
        "rejected", "lookup", "451 4.3.0 Recipient lookup failed, try again later"), record


def test_error_src_upstream_when_unreachable(willi, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = willi(config=make_config(tmp_path, [static_mapping(port)]))
    with transaction_log() as txlog:
        session_with(w, refused_then_quit("b@example.com"))
        record = only_record(txlog)
    assert record["error_src"] == "upstream" and record["reply"].startswith("451 4.4.1"), record


def test_error_src_proxy_for_an_internal_error(logged, monkeypatch) -> None:
    def boom(self, tx, read, unread):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected")

    monkeypatch.setattr(relay_module.Relay, "stream", boom)
    w, _ = logged()
    with transaction_log() as txlog:
        session_with(w, whole)
        record = only_record(txlog)
    assert (record["result"], record["error_src"]) == ("failed", "proxy"), record


def test_error_src_proxy_when_willi_stops(logged) -> None:
    w, _ = logged()
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.ehlo()
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
            w.service.stop(timeout=0.5)  # drain waits for the transaction, then forces it
            code, lines = client.reply()
            assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
        finally:
            client.close()
        record = only_record(txlog)
    assert (record["result"], record["error_src"], record["error"]) == ("aborted", "proxy", "Willi is stopping")


def test_one_line_per_transaction_on_one_connection(logged) -> None:
    w, _ = logged(rcpt_replies={"gone@example.com": "550 5.1.1 gone"})
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.ehlo()
            transaction(client, "a@sender.example", ["b@example.com"])  # accepted
            transaction(client, "a@sender.example", ["nobody@elsewhere.example"])  # 503 at DATA: MAIL stays
            assert client.cmd("RSET")[0] == 250  # rejected: its line now
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            assert client.cmd("RSET")[0] == 250  # MAIL alone got nowhere: no line (documented)
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            assert client.cmd("RCPT TO:<c@example.com>")[0] == 250
            assert client.cmd("RSET")[0] == 250  # aborted
            transaction(client, "a@sender.example", ["gone@example.com", "d@example.com"])  # accepted, one refused
            assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            assert client.cmd("RCPT TO:<e@example.com>")[0] == 250
            assert client.cmd("QUIT")[0] == 221  # aborted
        finally:
            client.close()
        records = txlog.wait(5)
        time.sleep(0.3)
        records = txlog.records()
    assert [(r["result"], r.get("to"), r.get("refused")) for r in records] == [
        ("accepted", "<b@example.com>", None),
        ("rejected", None, "<nobody@elsewhere.example>:554"),
        ("aborted", "<c@example.com>", None),
        ("accepted", "<d@example.com>", "<gone@example.com>:550"),
        ("aborted", "<e@example.com>", None),
    ], txlog.messages
    assert len({r["sid"] for r in records}) == 1


def test_log_line_is_one_line_whatever_the_client_sent(logged) -> None:
    w, _ = logged()
    with transaction_log() as txlog:
        client = w.raw()
        try:
            client.expect(220)
            client.send("EHLO evil\x1b[31m\u2028\u202e.example\r\n".encode())
            client.expect(250)
            transaction(client, "a\u00e9@sender.example", ["b@example.com"])  # no SMTPUTF8: 553 at MAIL
            transaction(client, "a@sender.example", ["b@example.com"])
        finally:
            client.close()
        [record] = txlog.wait(1)
        [message] = txlog.messages
    assert "\n" not in message and "\x1b" not in message and "\u2028" not in message and "\u202e" not in message
    assert record["helo"] == "evil\\x1b[31m\\u2028\\u202e.example", record


# ---------------------------------------------------------------- passwords


SECRET = f"Pw-{secrets.token_hex(8)}"


def sql_mapping(password_line: str, port: int) -> str:
    return ('[[mappings]]\ntype = "sql"\nhost = "127.0.0.1"\n'
            f'port = {port}\nuser = "willi"\n{password_line}\ndatabase = "mail"\n'
            'query = "SELECT server FROM routes WHERE pattern = ?"\nconnect_timeout = "1s"\nread_timeout = "1s"\n')


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text", [
    '[[mappings]]\ntype = "sql"\nquery = "x ?"\ndatabase = "d"\nuser = "u"\npassword = 12345678\n',
    f'[[mappings]]\ntype = "sql"\nquery = "x ?"\ndatabase = "d"\nuser = "u"\npassword = "{SECRET}\n',
    f'[[mappings]]\ntype = "sql"\nquery = "x ?"\ndatabase = "d"\nuser = "u"\npassword = "{SECRET}"\nunknown = 1\n',
    f'[[mappings]]\ntype = "sql"\nquery = "x ?"\ndatabase = "d"\nuser = "u"\npassword = "{SECRET}"\n'
    f'password_file = "pw"\n',
    f'[[mappings]]\ntype = "sql"\nquery = "x ?"\ndatabase = "d"\nuser = "u"\npassword = ["{SECRET}"]\n',
], ids=["wrong-type", "toml-syntax", "unknown-key", "both-passwords", "list"])
def test_config_errors_never_show_the_password(tmp_path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, str(tmp_path / "w.toml"), base=tmp_path)
    assert SECRET not in str(info.value) and "12345678" not in str(info.value), info.value
    path = tmp_path / "w.toml"
    path.write_text(text)
    status, lines = run_willi("-c", str(path), "--check")
    assert status == 1 and not any(SECRET in line or "12345678" in line for line in lines), lines


@pytest.mark.parametrize("source", ["password", "password_file"])
def test_password_in_no_log_and_no_output(willi, tmp_path, source: str) -> None:
    """A database that cannot be reached: the 451, the error log (debug), --check, --lookup, repr(config)."""
    if source == "password":
        line = f'password = "{SECRET}"'
    else:
        (tmp_path / "pw").write_text(SECRET + "\n")
        line = f'password_file = "{tmp_path / "pw"}"'
    mappings = sql_mapping(line, dead_port())
    config_file = tmp_path / "w.toml"
    config_file.write_text('listen = "127.0.0.1:0"\ndomain = "mx.willi.test"\nloglevel = "debug"\n' + mappings)
    cfg = parse_config(config_file.read_text(), str(config_file), base=tmp_path)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    w = willi(config=dataclasses.replace(cfg, client_name_lookup=False))
    with all_logs() as logs, transaction_log():
        client = w.raw()
        try:
            client.ehlo()
            replies, _ = transaction(client, "a@sender.example", ["b@example.com"])
            assert replies[1][0] == 451 and replies[1][1][0].startswith("4.3.0"), replies
            client.cmd("QUIT")
        finally:
            client.close()
        time.sleep(0.3)
    assert logs.messages and any("sql" in m for m in logs.messages), logs.messages
    assert not [m for m in logs.messages if SECRET in m]
    for mode in (["--check"], ["--lookup", "b@example.com"], ["--probe", "b@example.com"]):
        status, lines = run_willi("-c", str(config_file), *mode)
        assert status != 0 and not [entry for entry in lines if SECRET in entry], (mode, lines)


@pytest.mark.mysql
def test_wrong_password_against_the_real_database_is_never_shown(willi, system_mariadb, tmp_path) -> None:
    db = system_mariadb
    mappings = sql_mapping(f'password = "{SECRET}"', db.port).replace('user = "willi"', f'user = "{db.user}"') \
        .replace('database = "mail"', f'database = "{db.name}"').replace('host = "127.0.0.1"', f'host = "{db.host}"')
    cfg = parse_config('listen = "127.0.0.1:0"\ndomain = "mx.willi.test"\nclient_name_lookup = false\n' + mappings,
                       str(tmp_path / "w.toml"))
    w = willi(config=cfg)
    with all_logs() as logs:
        client = w.raw()
        try:
            client.ehlo()
            replies, _ = transaction(client, "a@sender.example", ["b@example.com"])
            assert replies[1][0] == 451, replies
        finally:
            client.close()
        time.sleep(0.3)
    assert any("Access denied" in m for m in logs.messages), logs.messages
    assert not [m for m in logs.messages if SECRET in m or db.password in m]


# ---------------------------------------------------------------- upstream timeouts vs. the client's patience

#: RFC 5321 4.5.3.2: how long a client waits for each reply.
CLIENT_PATIENCE = {"greeting": 300.0, "MAIL": 300.0, "RCPT": 300.0, "DATA": 120.0, "dot": 600.0}


def rcpt_worst_case(config: Config) -> float:
    """The longest one upstream address may take, each step within its own deadline, before Willi answers a RCPT.

    The first RCPT of a transaction: connect and greeting (upstream_connect_timeout each), EHLO, STARTTLS,
    the TLS handshake, EHLO, XCLIENT, EHLO, then MAIL and RCPT (upstream_command_timeout each).
    """
    return 2 * config.upstream_connect_timeout + 8 * config.upstream_command_timeout


def defaults() -> Config:
    return parse_config('[[mappings]]\ntype = "static"\nserver = "mx.example.net"\n')


def test_upstream_timeouts_are_shorter_than_the_clients_by_default() -> None:
    c = defaults()
    assert c.upstream_command_timeout < CLIENT_PATIENCE["MAIL"] and c.upstream_command_timeout < CLIENT_PATIENCE["DATA"]
    assert c.upstream_data_timeout < CLIENT_PATIENCE["dot"]
    assert c.upstream_connect_timeout < c.read_timeout and c.upstream_command_timeout < c.read_timeout
    assert rcpt_worst_case(c) < CLIENT_PATIENCE["RCPT"], rcpt_worst_case(c)


def test_failover_keeps_the_rcpt_within_the_clients_patience_by_default() -> None:
    """Failover could multiply the per-step deadlines (upstream_address_limit addresses, each up to
    rcpt_worst_case()); recipient_timeout caps the whole RCPT, below the client's patience."""
    c = defaults()
    assert c.recipient_timeout < CLIENT_PATIENCE["RCPT"] < c.upstream_address_limit * rcpt_worst_case(c)


# ---------------------------------------------------------------- more of design.md with no test elsewhere


def test_a_stalled_client_does_not_hold_up_another(willi, fake_upstream, tmp_path) -> None:
    """A thread per client: one client sitting in DATA does not delay another's whole transaction."""
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    slow = w.raw()
    try:
        slow.ehlo()
        slow.send("MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        slow.expect(250)
        slow.expect(250)
        slow.expect(354)
        slow.send(b"Subject: slow\r\n\r\nhalf")
        started = time.monotonic()
        fast = w.raw()
        try:
            fast.ehlo()
            _, final = transaction(fast, "c@sender.example", ["d@example.com"])
            assert final is not None and final[0] == 250, final
        finally:
            fast.close()
        assert time.monotonic() - started < 3.0
        slow.send(b" done\r\n.\r\n")
        assert slow.reply()[0] == 250
    finally:
        slow.close()


@pytest.mark.parametrize("local", ['"a%b"', "a!b", '"a@b"', "a\uff05b", '"user@evil.example"'])
def test_routing_syntax_in_a_local_part_is_refused_and_never_forwarded(willi, fake_upstream, tmp_path,
                                                                         local: str) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<a@sender.example> SMTPUTF8")[0] == 250
        code, lines = client.cmd(f"RCPT TO:<{local}@example.com>")
        assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
    finally:
        client.close()
    time.sleep(0.2)
    assert upstream.sessions == [], "the upstream would have been contacted at this RCPT"


def test_allow_untrusted_routing_lets_it_through(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)], allow_untrusted_routing=True))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<a@sender.example>")[0] == 250
        assert client.cmd('RCPT TO:<"a%b"@example.com>')[0] == 250
    finally:
        client.close()


def test_body_parameter_dropped_towards_an_upstream_without_8bitmime(willi, fake_upstream, tmp_path) -> None:
    """Willi never converts content: BODY= goes where 8BITMIME is offered, and is left out elsewhere."""
    from fakeupstream import without

    plain, eight = fake_upstream(extensions=without("8BITMIME")), fake_upstream()
    for upstream, expected in ((plain, "MAIL FROM:<a@sender.example>"),
                               (eight, "MAIL FROM:<a@sender.example> BODY=8BITMIME")):
        w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
        client = w.raw()
        try:
            client.ehlo()
            assert client.cmd("MAIL FROM:<a@sender.example> BODY=8BITMIME")[0] == 250
            assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
        finally:
            client.close()
        assert upstream.wait_for(lambda u=upstream: bool(u.sessions) and u.sessions[0].closed)
        assert [c for c in upstream.sessions[0].commands if verb(c) == "MAIL"] == [expected]
        assert upstream.refused_commands == []


@pytest.mark.parametrize(("host", "sni"), [("localhost", "localhost"), ("127.0.0.1", None)])
def test_upstream_starttls_sets_sni_to_the_host_name(willi, fake_upstream, pki, tmp_path, host: str,
                                                      sni: str | None) -> None:
    seen: list[str | None] = []
    context = pki.server_context()
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    upstream = fake_upstream(tls_context=context)
    mapping = {"type": "static", "server": f"{host}:{upstream.port}", "tls": "verify"}
    w = willi(config=make_config(tmp_path, [mapping], upstream_tls_ca=pki.ca_file))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "a@sender.example", ["b@example.com"])
        assert final is not None and final[0] == 250, final
    finally:
        client.close()
    assert seen == [sni]


class InterjectingUpstream:
    """An upstream that answers DATA with 354 and then, while the message streams, says 554 unasked."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.sendall(b"220 interjecting.test ESMTP\r\n")
            state = "commands"  # then "data", then "spoken" (554 sent; everything after is only recorded)
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    self.received += chunk
                    if state == "data" and b"first part" in self.received:
                        conn.sendall(b"554 5.7.1 I have seen enough\r\n")
                        state = "spoken"
                    if state != "commands":
                        continue
                    for line in chunk.split(b"\r\n"):
                        word = line[:4].upper()
                        if word == b"EHLO":
                            conn.sendall(b"250-interjecting.test\r\n250 PIPELINING\r\n")
                        elif word in (b"MAIL", b"RCPT"):
                            conn.sendall(b"250 2.0.0 Ok\r\n")
                        elif word == b"DATA":
                            conn.sendall(b"354 go ahead\r\n")
                            state = "data"
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_upstream_speaking_during_the_data_phase_gets_no_dot(willi, tmp_path) -> None:
    upstream = InterjectingUpstream()
    try:
        w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
        client = w.raw()
        try:
            client.ehlo()
            client.send("MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            client.expect(250)
            client.expect(250)
            client.expect(354)
            client.send(b"Subject: x\r\n\r\n" + b"first part\r\n" * 10)
            deadline = time.monotonic() + 5
            while b"first part" not in upstream.received:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # its 554 is on the way back to Willi
            client.send(b"the rest\r\n.\r\n")
            code, lines = client.reply()
            assert code == 451 and lines[0].startswith("4.5.0"), (code, lines)
        finally:
            client.close()
    finally:
        upstream.close()
    assert b"\r\n.\r\n" not in bytes(upstream.received)


def test_debug_log_shows_the_dialog(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    with all_logs() as logs:
        client = w.raw()
        try:
            client.ehlo()
            transaction(client, "a@sender.example", ["b@example.com"])
            client.cmd("QUIT")
        finally:
            client.close()
        time.sleep(0.2)
    text = "\n".join(logs.messages)
    for fragment in ("C: MAIL FROM:<a@sender.example>", "S: 250 2.1.0 Ok", "C: RCPT TO:<b@example.com>",
                     f"upstream=127.0.0.1:{upstream.port} C: MAIL FROM:<a@sender.example>",
                     f"upstream=127.0.0.1:{upstream.port} S: 250 2.0.0 Ok: queued as FAKE1"):
        assert fragment in text, fragment


@pytest.mark.parametrize(("text", "shown"), [
    ("plain", "plain"),
    ("two words", '"two words"'),
    ('quote " and \\ backslash', '"quote \\" and \\\\ backslash"'),
    ("tab\tnewline\ncr\r", '"tab\\tnewline\\ncr\\r"'),
    ("esc\x1b[0m", '"esc\\x1b[0m"'),  # C0
    ("nel\x85", '"nel\\x85"'),  # C1
    ("del\x7f", '"del\\x7f"'),
    ("ls\u2028ps\u2029", '"ls\\u2028ps\\u2029"'),
    ("bidi\u202eevil\u2066", '"bidi\\u202eevil\\u2066"'),
    ("zwsp\u200b", '"zwsp\\u200b"'),
    (b"not utf-8 \xff".decode("utf-8", "surrogateescape"), '"not utf-8 \\xff"'),
    ("caf\u00e9", "caf\u00e9"),  # printable non-ASCII stays readable
    ("", '""'),
])
def test_logfmt_values_keep_one_line(text: str, shown: str) -> None:
    from willi.log import logfmt, logfmt_value

    assert logfmt_value(text) == shown
    line = logfmt({"helo": text, "result": "accepted"})
    assert line.isprintable() and "\n" not in line
    assert line.encode("utf-8")  # always encodable, whatever the client sent


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./run-tests\.sh\b", ci, re.M), ci
    script = (ROOT / "run-tests.sh").read_text()
    assert re.search(r"python -m pytest \"\$@\"", script)
    assert "./run-tests.sh" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- tests/README.md names real tests

README = Path(__file__).with_name("README.md")
#: Rules whose tests are on branches not merged yet (branch: file); each row says **pending**. Empty it as
#: they are merged, by naming their tests in tests/README.md instead.
PENDING_ROWS: dict[str, str] = {}
REFERENCE = re.compile(r"`?(tests/[\w/]+\.py)::([\w:]+)`?")


def defined_tests(path: Path) -> set[str]:
    """`name` and `Class::name` for every test function of a module."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


def table_rows() -> list[tuple[str, str]]:
    """(rule, tests cell) of every row of the promise tables (between the markers)."""
    text = README.read_text()
    body = text.split("<!-- promises -->", 1)[1].split("<!-- /promises -->", 1)[0]
    rows = []
    for line in body.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0].lower() in ("rule", "point") or len(cells) < 2:
            continue
        rows.append((cells[0], cells[-1]))
    return rows


def test_every_test_named_in_the_readme_exists() -> None:
    references = REFERENCE.findall(README.read_text())
    assert len(references) > 100, "the map names the tests of every promise"
    missing = []
    cache: dict[str, set[str]] = {}
    for file, name in references:
        path = ROOT / file
        if file not in cache:
            assert path.is_file(), f"{file} (named in tests/README.md) does not exist"
            cache[file] = defined_tests(path)
        if name not in cache[file]:
            missing.append(f"{file}::{name}")
    assert not missing, f"tests/README.md names tests that do not exist: {missing}"


def test_every_promise_row_names_a_test() -> None:
    rows = table_rows()
    assert len(rows) > 80
    untested = {rule for rule, tests in rows if not REFERENCE.search(tests)}
    assert untested == set(PENDING_ROWS), (
        f"rows with no test that are not pending: {sorted(untested - set(PENDING_ROWS))}; "
        f"pending rows that now have tests or vanished: {sorted(set(PENDING_ROWS) - untested)}")
    for rule, tests in rows:
        assert ("**pending**" in tests) is (rule in PENDING_ROWS), rule


def test_this_module_is_in_the_map() -> None:
    """The map itself names the tests above, so removing one shows as a missing row."""
    named = {name for file, name in REFERENCE.findall(README.read_text()) if file == "tests/test_promises.py"}
    own = {name for name in defined_tests(Path(__file__)) if name.startswith("test_")}
    meta = {"test_every_test_named_in_the_readme_exists", "test_every_promise_row_names_a_test",
            "test_this_module_is_in_the_map"}
    assert own - meta <= named, f"tests of this module missing from tests/README.md: {sorted(own - meta - named)}"


def test_session_handlers_cover_the_reply_table() -> None:
    """Every command of design.md's reply table has a handler or a fixed refusal (a row cannot silently vanish)."""
    table_verbs = {"EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "VRFY", "NOOP", "RSET", "HELP", "QUIT"}
    assert table_verbs <= set(SmtpSession.HANDLERS)
    assert {"AUTH", "BDAT", "XCLIENT", "XFORWARD", "ETRN", "EXPN", "TURN"} == set(session_module.REFUSED_VERBS)

"""A postmaster's first hour (issue 10, points 2, 4, 7, 14): warnings and refusals that name what to fix.

Everything here is seen the way an operator sees it: `willi.py` run as a
process (`--check`, `-f`, SIGHUP) with its standard output and standard
error merged and buffered as in a pipe or a journal, or `--lookup` through
`cli.main`.
"""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import socket
import time
from pathlib import Path

import pytest
from certs import TestPKI
from daemon_helpers import free_port
from postmaster_support import ROOT, all_logs, foreground, run_willi, shared_directory, system_user
from proxy_helpers import csv_mapping, make_config, write_csv

from willi.cli import build_parser, main
from willi.config import domain_warning, parse_config
from willi.mappings.csv import CsvFormatError, parse_csv
from willi.supervisor import RESTART_KEYS

HEADER = "pattern;server;tls_verify\n"
MAN_PAGE = ROOT / "packaging" / "willi.8"


def write_config(directory: Path, body: str, *, domain: str | None = "mx.willi.test", listen: str = "127.0.0.1:0",
                 name: str = "willi.toml") -> Path:
    head = f'listen = "{listen}"\nclient_name_lookup = false\n'
    if domain is not None:
        head += f'domain = "{domain}"\n'
    path = directory / name
    path.write_text(head + body)
    return path


def csv_body(csv: Path, reload_interval: str = "1h") -> str:
    return f'[[mappings]]\ntype = "csv"\nfile = "{csv}"\nreload_interval = "{reload_interval}"\n'


# ---------------------------------------------------------------- point 2: a domain that is not a dotted name


@pytest.mark.parametrize(("domain", "warned"), [
    ("mailhost", True), ("localhost", True), ("localhost.localdomain", True), ("mx", True),
    ("mx.example.com", False), ("mail.willi.test", False),
])
def test_domain_warning_names_the_key(tmp_path, domain: str, warned: bool) -> None:
    config = parse_config(f'domain = "{domain}"\n[[mappings]]\ntype = "static"\nserver = "x.test"\n',
                          str(tmp_path / "w.toml"))
    warning = domain_warning(config)
    assert (warning is not None) is warned, warning
    if warned:
        assert repr(domain) in warning and "domain = " in warning and str(tmp_path / "w.toml") in warning


def test_domain_absent_defaults_to_the_fqdn_and_warns_when_it_is_not_dotted(tmp_path) -> None:
    """`domain` unset: the host's FQDN (here, in a container, usually `localhost`), warned about if not dotted."""
    config = parse_config('[[mappings]]\ntype = "static"\nserver = "x.test"\n', str(tmp_path / "w.toml"))
    fqdn = socket.getfqdn()
    assert config.domain == fqdn
    dotted = "." in fqdn.strip(".") and not fqdn.startswith("localhost")
    assert (domain_warning(config) is None) is dotted
    status, lines = run_willi("-c", str(write_config(tmp_path, '[[mappings]]\ntype = "static"\nserver = "x.test"\n',
                                                      domain=None)), "--check")
    assert status == 0, lines
    assert any("warning:" in line and "domain = " in line for line in lines) is not dotted, lines


def test_check_warns_about_the_domain(tmp_path) -> None:
    config = write_config(tmp_path, '[[mappings]]\ntype = "static"\nserver = "x.test"\n', domain="mailhost")
    status, lines = run_willi("-c", str(config), "--check")
    assert status == 0, lines
    [warning] = [line for line in lines if "warning:" in line]
    assert "'mailhost'" in warning and "domain = " in warning, warning
    assert lines[-1] == "check passed", lines


def test_check_says_nothing_about_a_good_domain(tmp_path) -> None:
    config = write_config(tmp_path, '[[mappings]]\ntype = "static"\nserver = "x.test"\n')
    status, lines = run_willi("-c", str(config), "--check")
    assert status == 0 and not [line for line in lines if "warning" in line], lines


def test_foreground_start_warns_about_the_domain(tmp_path) -> None:
    config = write_config(tmp_path, '[[mappings]]\ntype = "static"\nserver = "x.test"\n', domain="mailhost")
    with foreground(config) as willi:
        started = willi.wait_line("started in the foreground", timeout=30)
        warning = willi.wait_line("'mailhost'")
        assert "level=warning" in warning and "domain = " in warning, warning
        assert willi.log().index(warning) < willi.log().index(started), "warn before serving"
        willi.signal(signal.SIGTERM)
        assert willi.wait() == 0


# ---------------------------------------------------------------- point 4: --check as the configured user


@pytest.fixture(scope="module")
def service_user():
    with system_user() as name:
        yield name


PARTS = ["csv", "tls_cert", "tls_key", "upstream_tls_ca", "config"]


@pytest.mark.parametrize("unreadable", PARTS)
def test_check_reads_every_file_as_the_service_user(service_user: str, pki: TestPKI, unreadable: str) -> None:
    """Root can read everything; the service user cannot read one file: --check fails naming it and the user."""
    with shared_directory() as directory:
        files = {"csv": directory / "routes.csv", "tls_cert": directory / "cert.pem",
                 "tls_key": directory / "key.pem", "upstream_tls_ca": directory / "ca.pem"}
        files["csv"].write_text(HEADER + "example.com;127.0.0.1:2526;false\n")
        shutil.copyfile(pki.cert_file, files["tls_cert"])
        shutil.copyfile(pki.key_file, files["tls_key"])
        shutil.copyfile(pki.ca_file, files["upstream_tls_ca"])
        files["config"] = write_config(directory, (
            f'user = "{service_user}"\ntls_cert = "{files["tls_cert"]}"\ntls_key = "{files["tls_key"]}"\n'
            f'upstream_tls_ca = "{files["upstream_tls_ca"]}"\n' + csv_body(files["csv"])))
        for path in files.values():
            path.chmod(0o644)
        files[unreadable].chmod(0o600)  # root-owned: root reads it, the service user does not

        status, lines = run_willi("-c", str(files["config"]), "--check")
        assert status == 1, lines
        assert f"checking as user {service_user}" in lines, lines
        blamed = [line for line in lines if str(files[unreadable]) in line and service_user in line]
        assert blamed, f"no line names {files[unreadable]} and {service_user}: {lines}"
        others = [str(p) for part, p in files.items() if part not in (unreadable, "config")]
        for line in blamed:
            assert not any(other in line for other in others), f"blames more than the unreadable file: {line}"
        assert "check FAILED" in lines[-1], f"the verdict must be the last line: {lines}"
        assert not any("check passed" in line for line in lines), lines

        files[unreadable].chmod(0o644)
        status, lines = run_willi("-c", str(files["config"]), "--check")
        assert status == 0, lines
        assert lines[-1] == "check passed", lines
        assert not any("FAILED" in line for line in lines), lines


def test_check_verdict_is_the_last_line_with_several_problems(service_user: str, tmp_path) -> None:
    """Output buffered as in a pipe: no line of a later part may follow the verdict."""
    with shared_directory() as directory:
        good = directory / "good.csv"
        good.write_text(HEADER + "example.com;127.0.0.1:2526;false\n")
        bad = directory / "bad.csv"
        bad.write_text(HEADER + "@b.test;127.0.0.1:2526\n")
        good.chmod(0o600)
        config = write_config(directory, f'user = "{service_user}"\n' + csv_body(good) + csv_body(bad)
                              + '[[mappings]]\ntype = "static"\nserver = "x.test"\n', domain="mailhost")
        config.chmod(0o644)
        status, lines = run_willi("-c", str(config), "--check")
    assert status == 1
    assert lines[-1] == "willi: check FAILED: 2 problems", lines
    assert lines.index(f"checking as user {service_user}") < len(lines) - 1
    assert any("mappings[2] static:x.test:25" in line for line in lines), lines


# ---------------------------------------------------------------- point 7: CSV patterns that can never match

BAD_ROWS = [
    pytest.param("@b.test;127.0.0.1:2526", "'@domain' is not a pattern", id="at-domain"),
    pytest.param("*.c.test;127.0.0.1:2526", "wildcards are not supported", id="wildcard"),
    pytest.param("a b.test;127.0.0.1:2526", "white space", id="space"),
    pytest.param("user@exa mple.test;127.0.0.1:2526", "white space", id="space-in-domain"),
    pytest.param("example.com;", "empty server", id="empty-server"),
    pytest.param("example.com; ;true", "empty server", id="blank-server"),
    pytest.param("bob;127.0.0.1:2526", "bare local part", id="bare-local-part"),
    pytest.param("bob@;127.0.0.1:2526", "empty domain", id="local-part-and-at"),
    pytest.param(".[192.0.2.1];127.0.0.1:2526", "no subdomains", id="literal-subdomains"),
]


@pytest.mark.parametrize(("row", "fragment"), BAD_ROWS)
def test_parse_csv_refuses_patterns_that_never_match(row: str, fragment: str) -> None:
    with pytest.raises(CsvFormatError) as info:
        parse_csv(f"# routes\n{HEADER}example.org;127.0.0.1:2526\n{row}\n", source="/etc/routes.csv")
    message = str(info.value)
    assert message.startswith("/etc/routes.csv:4: "), message
    assert fragment in message, message


@pytest.mark.parametrize(("row", "fragment"), BAD_ROWS[:4] + BAD_ROWS[6:7])
def test_check_reports_file_line_and_reason(tmp_path, row: str, fragment: str) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{HEADER}{row}\n")
    status, lines = run_willi("-c", str(write_config(tmp_path, csv_body(csv))), "--check")
    assert status == 1, lines
    [line] = [line for line in lines if f"{csv}:2: " in line]
    assert fragment in line, line
    assert "check FAILED" in lines[-1], lines


def test_foreground_start_refuses_a_bad_csv(tmp_path) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{HEADER}example.org;127.0.0.1:2526\n*.c.test;127.0.0.1:2526\n")
    with foreground(write_config(tmp_path, csv_body(csv))) as willi:
        assert willi.wait(30) == 1
    assert any(f"{csv}:3: " in line and "wildcards" in line for line in willi.log()), willi.log()
    assert not any("started in the foreground" in line for line in willi.log())


def test_sighup_with_a_bad_csv_keeps_the_old_table(tmp_path, fake_upstream) -> None:
    upstream = fake_upstream()
    csv = tmp_path / "routes.csv"
    write_csv(csv, [("example.com", f"127.0.0.1:{upstream.port}")])
    port = free_port()
    config = write_config(tmp_path, csv_body(csv), listen=f"127.0.0.1:{port}")

    def send() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.ehlo("client.example")
            client.mail("a@sender.example")
            assert client.rcpt("b@example.com")[0] == 250
            return client.data(b"Subject: x\r\n\r\nhello\r\n")[0]

    with foreground(config) as willi:
        willi.started()
        assert send() == 250
        csv.with_name("new.csv").write_text(f"{HEADER}example.com;127.0.0.1:{upstream.port}\n@b.test;x.test\n")
        csv.with_name("new.csv").replace(csv)
        mark = willi.mark()
        willi.signal(signal.SIGHUP)
        line = willi.wait_line("reload failed", start=mark)
        assert "keeping the running configuration" in line and f"{csv}:3: " in line and "'@b.test'" in line, line
        assert send() == 250, "the old table must stay in service"
        assert upstream.wait_for(lambda: len(upstream.completed_transactions) == 2)
        willi.signal(signal.SIGTERM)
        assert willi.wait() == 0


def test_timed_reload_with_a_bad_csv_logs_file_line_and_keeps_the_table(tmp_path, willi, fake_upstream) -> None:
    upstream = fake_upstream()
    csv = tmp_path / "routes.csv"
    write_csv(csv, [("example.com", f"127.0.0.1:{upstream.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(csv, reload_interval="50ms")]))
    resolver = w.service.runtime.resolver
    assert resolver.resolve("b@example.com").route is not None
    with all_logs() as logs:
        tmp = csv.with_name("tmp.csv")
        tmp.write_text(f"{HEADER}example.com;127.0.0.1:1\nexample.net;\n")
        tmp.replace(csv)
        deadline = 50
        while not any("keeping the previous table" in m for m in logs.messages) and deadline:
            deadline -= 1
            assert resolver.resolve("b@example.com").route.hops[0].port == upstream.port
            time.sleep(0.05)
    [line] = [m for m in logs.messages if "keeping the previous table" in m][:1]
    assert f"{csv}:3: empty server" in line, line


# ---------------------------------------------------------------- point 7: .example.com and the lookup order

ROUTES = {
    "full": "user+ext@sub.example.com;127.0.0.1:2601",
    "base": "user@sub.example.com;127.0.0.1:2602",
    "domain": "sub.example.com;127.0.0.1:2603",
    "parent": ".example.com;127.0.0.1:2604",
    "top": ".com;127.0.0.1:2605",
}


@pytest.mark.parametrize(("present", "winner"), [
    (["full", "base", "domain", "parent", "top"], "user+ext@sub.example.com"),
    (["base", "domain", "parent", "top"], "user@sub.example.com"),
    (["domain", "parent", "top"], "sub.example.com"),
    (["parent", "top"], ".example.com"),
    (["top"], ".com"),
])
def test_lookup_order_full_base_domain_parents(capsys, tmp_path, present: list[str], winner: str) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text(HEADER + "".join(f"{ROUTES[k]}\n" for k in reversed(present)))
    status = main(["-c", str(write_config(tmp_path, csv_body(csv))), "--lookup", "User+Ext@Sub.Example.COM"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0, out
    assert out[0] == ("User+Ext@Sub.Example.COM: keys tried in order: user+ext@sub.example.com, "
                      "user@sub.example.com, sub.example.com, .example.com, .com")
    assert f" key={winner} " in out[1], out[1]


@pytest.mark.parametrize(("address", "routed"), [
    ("a@sub.example.com", True), ("a@deep.sub.example.com", True), ("a@example.com", False),
    ("a@notexample.com", False), ("a@example.com.evil.test", False),
])
def test_dot_domain_matches_every_subdomain_and_not_the_domain(capsys, tmp_path, address: str,
                                                                 routed: bool) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text(f"{HEADER}.Example.COM;127.0.0.1:2604\n")
    status = main(["-c", str(write_config(tmp_path, csv_body(csv))), "--lookup", address])
    out = capsys.readouterr().out
    if routed:
        assert status == 0 and "key=.example.com server=127.0.0.1:2604" in out, out
    else:
        assert status == 1 and "554 5.7.1" in out, out


def test_dot_domain_routes_a_real_transaction(tmp_path, willi, fake_upstream) -> None:
    sub, apex = fake_upstream(), fake_upstream()
    csv = tmp_path / "routes.csv"
    write_csv(csv, [(".example.com", f"127.0.0.1:{sub.port}"), ("example.com", f"127.0.0.1:{apex.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(csv)]))
    for recipient in ("a@x.example.com", "b@example.com"):
        with w.smtp() as client:
            assert client.sendmail("s@sender.example", [recipient], b"Subject: x\r\n\r\nx\r\n") == {}
    assert sub.wait_for(lambda: len(sub.completed_transactions) == 1)
    assert apex.wait_for(lambda: len(apex.completed_transactions) == 1)
    assert sub.completed_transactions[0].rcpts == ["RCPT TO:<a@x.example.com>"]
    assert apex.completed_transactions[0].rcpts == ["RCPT TO:<b@example.com>"]


# ---------------------------------------------------------------- point 14: the manual page


def man_text() -> str:
    """The page without roff escapes that matter for searching (\\- is a hyphen)."""
    return MAN_PAGE.read_text().replace("\\-", "-").replace("\\&", "")


def man_section(name: str) -> str:
    text = man_text()
    match = re.search(rf'^\.SH "?{re.escape(name)}"?\n(.*?)(?=^\.SH )', text, re.S | re.M)
    assert match, f"no section {name} in {MAN_PAGE}"
    return match.group(1)


def test_man_page_documents_every_option() -> None:
    options = man_section("OPTIONS")
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert re.search(rf"\b{re.escape(flag)}\b", options.replace("\n.BR ", " ").replace("\n.BI ", " ")
                             .replace('"', "")) or flag in options, f"{flag} is not in OPTIONS of {MAN_PAGE}"


def test_man_page_probe_and_from_as_implemented() -> None:
    options = man_section("OPTIONS")
    probe = options[options.index("--probe"):options.index("--from")]
    assert "ADDRESS" in probe and "Nothing is delivered" in probe
    assert re.search(r"0 when .*accepted.*1 when .*refused.*2 on a temporary failure", " ".join(probe.split())), probe
    sender = options[options.index("--from"):options.index("--version")]
    assert "SENDER" in sender and "null sender" in sender and "<>" in sender, sender
    assert build_parser().parse_args(["--probe", "a@b.test"]).sender == "", "--from defaults to the null sender"
    items = man_section("EXIT STATUS").split(".TP\n")[1:]
    blocks = {item.split("\n", 1)[0]: " ".join(item.split()) for item in items}
    assert "the recipient was accepted" in blocks[".B 0"], blocks
    assert "a refused recipient" in blocks[".B 1"], blocks
    assert "answered 4xx" in blocks[".B 2"] and "--probe" in blocks[".B 2"], blocks


def test_man_page_names_every_setting_a_reload_cannot_change() -> None:
    hup = man_section("SIGNALS")
    hup = hup[hup.index(".B HUP"):hup.index(".B USR1")]
    for key in RESTART_KEYS:
        assert re.search(rf"\b{key}\b", hup), f"{key} needs a restart (supervisor.RESTART_KEYS) but HUP omits it"


def test_man_page_lookup_order_includes_parent_domains() -> None:
    description = " ".join(man_section("DESCRIPTION").split())
    assert "parent domain" in description, description

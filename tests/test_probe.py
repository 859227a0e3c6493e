"""`willi --probe ADDRESS [--from SENDER]` (issue 10 point 11), against the real Postfix and the fake upstream.

The probe routes ADDRESS through the configured mappings and walks the
upstream dialog up to RCPT and back, one line per step with its timing;
exit 0 accepted, 1 refused (or unmapped), 2 temporary. It never sends DATA:
Postfix's maildir stays empty. Against Postfix the probe runs as the real
command (`willi.py`), whose output the README shows.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import TestPKI
from postfix_harness import PostfixInstance, postfix_upstream
from postmaster_support import run_willi

from willi.cli import main

STEP = re.compile(r" \(\d+\.\d ms\)$")


def probe_config(directory: Path, server: str, *, extra: str = "", name: str = "probe.toml",
                 mapping_extra: str = "") -> Path:
    path = directory / name
    path.write_text(f'domain = "mx.willi.test"\nclient_name_lookup = false\n{extra}\n'
                    f'[[mappings]]\ntype = "static"\nserver = "{server}"\n{mapping_extra}')
    return path


def probe(capsys, config: Path, *args: str) -> tuple[int, list[str]]:
    status = main(["-c", str(config), "--probe", *args])
    captured = capsys.readouterr()
    return status, (captured.out + captured.err).splitlines()


def line(lines: list[str], prefix: str) -> str:
    found = [entry for entry in lines if entry.startswith(prefix)]
    assert found, f"no line starting with {prefix!r}:\n" + "\n".join(lines)
    return found[0]


def maildir_files(postfix: PostfixInstance) -> list[Path]:
    return [p for sub in ("new", "cur", "tmp") for p in (postfix.maildir / sub).glob("*")] \
        if postfix.maildir.is_dir() else []


# ---------------------------------------------------------------- against the real Postfix


@pytest.fixture(scope="module")
def postfix(pki: TestPKI) -> Iterator[PostfixInstance]:
    """XCLIENT authorized for loopback, STARTTLS with the test CA's certificate for localhost."""
    with postfix_upstream(pki.cert_file, pki.key_file) as instance:
        yield instance


@pytest.fixture(scope="module")
def postfix_without_xclient(pki: TestPKI) -> Iterator[PostfixInstance]:
    """Willi's address is not in smtpd_authorized_xclient_hosts: XCLIENT is not offered to it."""
    with postfix_upstream(pki.cert_file, pki.key_file, xclient_hosts="192.0.2.1") as instance:
        yield instance


def verified_route(directory: Path, postfix: PostfixInstance, pki: TestPKI, **kwargs: str) -> Path:
    return probe_config(directory, f"localhost:{postfix.port}", extra=f'upstream_tls_ca = "{pki.ca_file}"',
                        mapping_extra='tls = "verify"\n', **kwargs)


@pytest.mark.postfix
def test_probe_postfix_xclient_accepted_tls_verified(tmp_path, postfix, pki) -> None:
    config = verified_route(tmp_path, postfix, pki)
    status, lines = run_willi("-c", str(config), "--probe", "bob@example.com")
    print("\n$ willi -c probe.toml --probe bob@example.com\n" + "\n".join(lines) + f"\n(exit {status})")
    assert status == 0, lines
    assert re.match(rf"route: mapping=static:localhost:{postfix.port} key=bob@example.com "
                    rf"upstreams=localhost:{postfix.port} tls=verify \(from the mapping\) -> starttls=required "
                    r"verified xclient=on \(", lines[0]), lines[0]
    assert line(lines, "connect: ").startswith(f"connect: localhost:{postfix.port} (127.0.0.1:{postfix.port}) ok")
    assert line(lines, "greeting: ").startswith("greeting: 220 postfix.willi.test ESMTP willi-test-postfix")
    assert "STARTTLS" in line(lines, "EHLO mx.willi.test: extensions ")
    tls = line(lines, "STARTTLS: ")
    assert re.match(r"STARTTLS: TLSv1\.[23] \S+, certificate .*verified \(chain and host name\)", tls), tls
    xclient = line(lines, "XCLIENT offered (")
    assert re.match(r"XCLIENT offered \([A-Z_ ]*\bADDR\b[A-Z_ ]*\); sent .*ADDR=127\.0\.0\.1.*: accepted",
                    xclient), xclient
    assert line(lines, "MAIL FROM:<>: ").startswith("MAIL FROM:<>: 250 2.1.0 Ok")
    assert line(lines, "RCPT TO:<bob@example.com>: ").startswith("RCPT TO:<bob@example.com>: 250 2.1.5 Ok")
    assert line(lines, "RSET: ").startswith("RSET: 250 2.0.0 Ok")
    assert lines[-2:] == ["QUIT", "result: accepted (nothing was delivered)"], lines
    timed = [entry for entry in lines if STEP.search(entry)]
    assert len(timed) >= 8, f"every step carries its time: {lines}"
    time.sleep(1.0)  # a message Postfix had queued would be in the maildir by now
    assert maildir_files(postfix) == [], "the probe delivered something"
    disconnect = [entry for entry in postfix.log_tail(400).splitlines() if "disconnect from" in entry][-1]
    # (Postfix 3.7 counts even an accepted XCLIENT as "xclient=0/1" in these statistics.)
    assert "xclient=" in disconnect and "rcpt=1 rset=1" in disconnect and "data=" not in disconnect, disconnect


@pytest.mark.postfix
@pytest.mark.parametrize(("recipient", "status", "reply"), [
    ("reject@example.com", 1, "550 5.1.1 <reject@example.com>: Recipient address rejected: Recipient rejected by"),
    ("defer@example.com", 2, "450 4.2.1 <defer@example.com>: Recipient address rejected: Recipient deferred by"),
])
def test_probe_postfix_refusal_is_shown_verbatim(tmp_path, postfix, pki, recipient: str, status: int,
                                                 reply: str) -> None:
    config = verified_route(tmp_path, postfix, pki)
    got, lines = run_willi("-c", str(config), "--probe", recipient, "--from", "alice@sender.example")
    assert got == status, lines
    assert line(lines, "MAIL FROM:<alice@sender.example>: ").startswith(
        "MAIL FROM:<alice@sender.example>: 250 2.1.0 Ok")
    assert line(lines, f"RCPT TO:<{recipient}>: ").startswith(f"RCPT TO:<{recipient}>: {reply}"), lines
    assert lines[-1] == f"result: {'refused' if status == 1 else 'temporary failure'} (nothing was delivered)"
    assert maildir_files(postfix) == []


@pytest.mark.postfix
def test_probe_postfix_without_xclient_authorization(tmp_path, postfix_without_xclient, pki) -> None:
    postfix = postfix_without_xclient
    config = verified_route(tmp_path, postfix, pki)
    status, lines = run_willi("-c", str(config), "--probe", "bob@example.com")
    print("\n$ willi -c probe.toml --probe bob@example.com   # Postfix without Willi in "
          "smtpd_authorized_xclient_hosts\n" + "\n".join(lines) + f"\n(exit {status})")
    assert status == 0, lines
    assert "XCLIENT: not offered: the upstream would see Willi's address, not the client's" in lines, lines
    assert lines[-1] == "result: accepted (nothing was delivered)"

    required = verified_route(tmp_path, postfix, pki, name="required.toml")
    required.write_text(required.read_text().replace('client_name_lookup = false\n',
                                                     'client_name_lookup = false\nxclient = "required"\n'))
    status, lines = run_willi("-c", str(required), "--probe", "bob@example.com")
    print("\n$ willi -c required.toml --probe bob@example.com   # the same, with xclient = \"required\"\n"
          + "\n".join(lines) + f"\n(exit {status})")
    assert status == 2, lines
    assert line(lines, "XCLIENT: not offered, but xclient = \"required\"").endswith("(a client would get 451 4.7.0)")
    assert not any(entry.startswith("MAIL FROM") for entry in lines), lines


# ---------------------------------------------------------------- against the fake upstream


def test_probe_fake_refusing_xclient(capsys, tmp_path, fake_upstream) -> None:
    upstream = fake_upstream(xclient="NAME ADDR PORT PROTO HELO",
                             replies={"xclient": "550 5.7.0 Error: insufficient authorization"})
    status, lines = probe(capsys, probe_config(tmp_path, f"127.0.0.1:{upstream.port}"), "bob@example.com")
    print("\n$ willi -c probe.toml --probe bob@example.com   # an upstream answering 550 to XCLIENT\n"
          + "\n".join(lines) + f"\n(exit {status})")
    assert status == 2, lines
    failed = line(lines, "xclient: failed: ")
    assert "550 5.7.0 Error: insufficient authorization" in failed and failed.endswith(
        "-> a client would get 451 4.4.0 Upstream server refused XCLIENT, try again later" + STEP.search(failed)[0])
    assert lines[-1] == "result: no upstream could be used (a client would get a 4xx and retry)"
    assert not [c for s in upstream.sessions for c in s.commands if c.upper().startswith(("MAIL", "DATA"))]


def test_probe_fake_accepted_with_sender_never_sends_data(capsys, tmp_path, fake_upstream) -> None:
    upstream = fake_upstream(xclient="ADDR HELO")
    status, lines = probe(capsys, probe_config(tmp_path, f"127.0.0.1:{upstream.port}"), "bob@example.com",
                          "--from", "alice@sender.example")
    assert status == 0, lines
    assert line(lines, "XCLIENT offered (ADDR HELO); sent HELO=mx.willi.test ADDR=127.0.0.1: accepted")
    assert upstream.wait_for(lambda: upstream.sessions and upstream.sessions[0].closed)
    commands = [c.split(" ", 1)[0].upper() for c in upstream.sessions[0].commands]
    assert commands == ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "RSET", "QUIT"], commands
    assert upstream.sessions[0].commands[3] == "MAIL FROM:<alice@sender.example>"
    assert upstream.all_transactions[0].data == b"" and upstream.refused_commands == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_unreachable_exits_2(capsys, tmp_path) -> None:
    status, lines = probe(capsys, probe_config(tmp_path, f"127.0.0.1:{closed_port()}",
                                               extra='upstream_connect_timeout = "2s"'), "bob@example.com")
    assert status == 2, lines
    assert line(lines, "connect: failed: connecting to ")
    assert lines[-1] == "result: no upstream could be used (a client would get a 4xx and retry)"


def test_probe_unmapped_exits_1(capsys, tmp_path) -> None:
    csv = tmp_path / "routes.csv"
    csv.write_text("pattern;server;tls_verify\nexample.com;127.0.0.1:25;false\n")
    config = tmp_path / "csv.toml"
    config.write_text(f'domain = "mx.willi.test"\n[[mappings]]\ntype = "csv"\nfile = "{csv}"\n')
    status, lines = probe(capsys, config, "bob@elsewhere.example")
    assert status == 1, lines
    assert lines[-1].startswith("route: no mapping knows bob@elsewhere.example (a client would get 554 5.7.1")


def test_probe_lookup_failure_exits_2(capsys, tmp_path) -> None:
    config = tmp_path / "csv.toml"
    config.write_text(f'domain = "mx.willi.test"\n[[mappings]]\ntype = "csv"\nfile = "{tmp_path / "none.csv"}"\n')
    status, lines = probe(capsys, config, "bob@example.com")
    assert status == 2 and "a client would get 451 4.3.0" in lines[-1], lines


@pytest.mark.parametrize("address", ['"a%b"@example.com', "a!b@example.com"])
def test_probe_routing_syntax_exits_1(capsys, tmp_path, address: str) -> None:
    status, lines = probe(capsys, probe_config(tmp_path, "127.0.0.1:25"), address)
    assert status == 1 and "554 5.7.1" in lines[-1], lines


def test_probe_tls_verification_failure_exits_2(capsys, tmp_path, fake_upstream, other_pki, pki) -> None:
    upstream = fake_upstream(tls_context=other_pki.server_context())
    config = probe_config(tmp_path, f"localhost:{upstream.port}", extra=f'upstream_tls_ca = "{pki.ca_file}"',
                          mapping_extra='tls = "verify"\n')
    status, lines = probe(capsys, config, "bob@example.com")
    assert status == 2, lines
    assert "-> a client would get 451 4.7.5" in line(lines, "starttls: failed: TLS handshake with ")
    assert not [c for s in upstream.sessions for c in s.commands if c.upper().startswith("MAIL")]


def test_probe_encrypt_without_starttls_exits_2(capsys, tmp_path, fake_upstream) -> None:
    upstream = fake_upstream()
    config = probe_config(tmp_path, f"127.0.0.1:{upstream.port}", mapping_extra='tls = "encrypt"\n')
    status, lines = probe(capsys, config, "bob@example.com")
    assert status == 2, lines
    assert "STARTTLS: not offered, but the route requires it (a client would get 451 4.7.5)" in lines, lines

"""Issue 7, point 1 against the real thing: a stock Postfix that trusts Willi relays routed recipients.

The Postfix here is configured as a site that puts Willi in front of it
would have it: Willi's address is in `mynetworks`, Willi is not allowed
XCLIENT (so Postfix sees Willi, not the client), relaying is
`permit_mynetworks, reject_unauth_destination`, `example.com` is a local
domain (`mydestination`), and mail for any other domain goes out through
`relayhost`, here a recording fake upstream that stands for the attacker's
`evil.test`. The address-rewriting settings are Debian's (and Postfix's)
defaults, set explicitly: `allow_percent_hack = yes` (user%site@local ->
user@site), `swap_bangpath = yes` (site!user@local -> user@site) and
`resolve_dequoted_address = yes` ("user@site"@local is resolved by what is
inside the quotes). Postfix's own `allow_untrusted_routing = no` does not
help: it applies only to clients outside mynetworks, and Willi is inside.

So the danger is real (`allow_untrusted_routing = true` in Willi lets such a
recipient through, and Postfix relays it to the evil sink), and Willi's
default (554 5.7.1, no upstream contacted) is what prevents it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from certs import TestPKI
from fakeupstream import FakeUpstream
from postfix_harness import PostfixError, PostfixInstance, free_port, require_postfix
from security_helpers import open_transaction, start
from support import RunningWilli

pytestmark = pytest.mark.postfix

#: Routed forms and where a trusting Postfix sends them.
ROUTED = {
    "victim%evil.test@example.com": "victim@evil.test",
    '"victim@evil.test"@example.com': "victim@evil.test",
    "evil.test!victim@example.com": "victim@evil.test",
}
MORE_ROUTED = [
    '"victim\\@evil.test"@example.com',
    '"victim%evil.test"@example.com',
    "VICTIM%EVIL.TEST@EXAMPLE.COM",
    "victim%evil.test%relay.test@example.com",
    "user+x%evil.test@example.com",
]


class RelayingPostfix(PostfixInstance):
    """The harness's Postfix plus an smtp(8) client, so that it can relay at all."""

    def master_cf(self) -> str:
        return super().master_cf() + "smtp      unix  - - n -     - smtp\n"


def trusting_main_cf(sink_port: int) -> dict[str, str]:
    return {
        "mydestination": "example.com",
        "local_recipient_maps": "",  # any local user: what matters is where routed addresses go
        "mynetworks": "127.0.0.0/8, [::1]/128",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "relayhost": f"[127.0.0.1]:{sink_port}",
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "smtp_tls_security_level": "none",
        # Debian's defaults, spelt out because the proof depends on them.
        "allow_percent_hack": "yes",
        "swap_bangpath": "yes",
        "resolve_dequoted_address": "yes",
        "allow_untrusted_routing": "no",
    }


@contextmanager
def trusting_postfix(pki: TestPKI, sink: FakeUpstream) -> Iterator[PostfixInstance]:
    require_postfix()
    directory = Path(tempfile.mkdtemp(prefix="willi-postfix-relay-"))
    instance = RelayingPostfix(directory, port=free_port(), cert_file=pki.cert_file, key_file=pki.key_file,
                               xclient_hosts="", domains=("example.net",),
                               extra_main_cf=trusting_main_cf(sink.port))
    try:
        for attempt in range(3):
            try:
                instance.start()
                break
            except PostfixError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                instance.port = free_port()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def evil_sink() -> Iterator[FakeUpstream]:
    """Where mail for evil.test ends up: Postfix's relayhost."""
    sink = FakeUpstream()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def postfix(pki: TestPKI, evil_sink: FakeUpstream) -> Iterator[PostfixInstance]:
    with trusting_postfix(pki, evil_sink) as instance:
        yield instance


@pytest.fixture(autouse=True)
def empty_sink(evil_sink: FakeUpstream) -> Iterator[None]:
    with evil_sink._lock:
        evil_sink.sessions.clear()
    yield


def willi_before(postfix: PostfixInstance, tmp_path: Path, **settings: object) -> RunningWilli:
    """Willi with a static default route to the Postfix and otherwise default security settings."""
    mapping = {"type": "static", "server": f"127.0.0.1:{postfix.port}", "tls_verify": False}
    return start(tmp_path, [mapping], upstream_command_timeout="20s", **settings)


def send(w: RunningWilli, recipient: str) -> tuple[int, list[str], tuple[int, list[str]] | None]:
    """MAIL <> (no bounce can reach the sink), one RCPT, and DATA if it was accepted."""
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<>")[0] == 250
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        final = None
        if code == 250:
            assert client.cmd("DATA")[0] == 354
            client.send(b"Subject: routed\r\n\r\nroute me\r\n.\r\n")
            final = client.reply()
        client.cmd("QUIT")
        return code, lines, final
    finally:
        client.close()


def test_postfix_itself_relays_for_willi_whatever_it_is_told(postfix: PostfixInstance, evil_sink: FakeUpstream,
                                                            tmp_path: Path) -> None:
    """The premise: Postfix trusts Willi, so a plain evil.test recipient through a static route is relayed.

    (This is why a static default route must only ever point at an upstream that does not trust Willi
    for relaying, or be used with care: Willi routes every domain there.)
    """
    w = willi_before(postfix, tmp_path)
    try:
        code, lines, final = send(w, "victim@evil.test")
    finally:
        w.stop()
    assert code == 250 and final is not None and final[0] == 250, (code, lines, final)
    assert evil_sink.wait_for(lambda: evil_sink.completed_transactions, 30), postfix.log_tail()


@pytest.mark.parametrize(("recipient", "relayed_as"), list(ROUTED.items()))
def test_the_danger_is_real_with_allow_untrusted_routing(postfix: PostfixInstance, evil_sink: FakeUpstream,
                                                         tmp_path: Path, recipient: str, relayed_as: str) -> None:
    w = willi_before(postfix, tmp_path, allow_untrusted_routing=True)
    try:
        code, lines, final = send(w, recipient)
    finally:
        w.stop()
    assert code == 250 and final is not None and final[0] == 250, (code, lines, final)
    assert evil_sink.wait_for(lambda: evil_sink.completed_transactions, 30), \
        f"Postfix did not relay {recipient}:\n{postfix.log_tail()}"
    (txn,) = evil_sink.completed_transactions
    assert txn.rcpts == [f"RCPT TO:<{relayed_as}>"], txn.rcpts
    assert b"route me" in txn.data


@pytest.mark.parametrize("recipient", [*ROUTED, *MORE_ROUTED])
def test_willi_refuses_what_postfix_would_relay(postfix: PostfixInstance, evil_sink: FakeUpstream,
                                                tmp_path: Path, recipient: str) -> None:
    log_start = len(maillog(postfix))
    w = willi_before(postfix, tmp_path)
    try:
        code, lines, _ = send(w, recipient)
        assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
        # Control through the same Willi and Postfix: a virtual-domain recipient is delivered, so the
        # path is live and Postfix's queue has run since the refusal.
        client = open_transaction(w)
        try:
            assert client.cmd("RCPT TO:<bob@example.net>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(b"Subject: control\r\n\r\ncontrol\r\n.\r\n")
            assert client.reply()[0] == 250
        finally:
            client.close()
    finally:
        w.stop()
    [message] = postfix.delivered(count=1)
    assert b"control" in message
    assert evil_sink.sessions == [], "something reached the evil sink"
    new_log = maillog(postfix)[log_start:]
    assert "evil.test" not in new_log, new_log  # Postfix never even heard of it


def maillog(postfix: PostfixInstance) -> str:
    try:
        return postfix.maillog.read_text(errors="replace")
    except OSError:
        return ""

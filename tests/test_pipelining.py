"""Pipelining towards the upstream (RFC 2920 3.1): MAIL FROM and the first RCPT TO in one write.

Willi answers the client's MAIL itself and sends it upstream with the first
recipient; where the upstream offers PIPELINING both go in one segment
(one round trip saved per message), otherwise one at a time, and a refused
MAIL is then never followed by the RCPT. What the client hears is the same
either way: a refused MAIL answers the first RCPT, as before.
"""

from __future__ import annotations

import pytest
from fakeupstream import RecordedSession, without
from proxy_helpers import BODY, make_config, static_mapping, verbs, wait_sessions_closed
from support import RunningWilli

MODES = {"pipelining": {}, "no-pipelining": {"extensions": without("PIPELINING")}}


def command_chunks(session: RecordedSession) -> list[bytes]:
    """The segments the upstream read before the message data (each holds whole command lines here)."""
    chunks = []
    for chunk in session.chunks:
        if chunk.startswith(b"Subject:"):
            break
        chunks.append(chunk)
    return chunks


def chunk_with(session: RecordedSession, needle: bytes) -> bytes:
    (found,) = [c for c in session.chunks if needle in c]
    return found


def dialog(w: RunningWilli, recipients: list[str]) -> list[tuple[int, list[str]]]:
    """EHLO, MAIL, RCPT..., DATA (+ message), QUIT, one command at a time: every reply after the EHLO."""
    client = w.raw()
    try:
        client.ehlo()
        replies = [client.cmd("MAIL FROM:<alice@sender.example>")]
        replies += [client.cmd(f"RCPT TO:<{r}>") for r in recipients]
        replies.append(client.cmd("DATA"))
        if replies[-1][0] == 354:
            client.send(BODY + b".\r\n")
            replies.append(client.reply())
        replies.append(client.cmd("QUIT"))
    finally:
        client.close()
    return replies


def test_mail_and_first_rcpt_share_one_segment(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream()
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    replies = dialog(w, ["bob@example.com", "carol@example.com"])
    assert [code for code, _ in replies] == [250, 250, 250, 354, 250, 221], replies
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    assert b"".join(session.chunks) == bytes(session.raw)  # the fake's record: raw, split as it was read
    assert chunk_with(session, b"MAIL FROM:") == b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\n"
    # later recipients are sent as the client gives them
    assert chunk_with(session, b"RCPT TO:<carol@") == b"RCPT TO:<carol@example.com>\r\n"
    assert upstream.refused_commands == []


def test_without_pipelining_commands_go_one_at_a_time(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(extensions=without("PIPELINING"))
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    replies = dialog(w, ["bob@example.com", "carol@example.com"])
    assert [code for code, _ in replies] == [250, 250, 250, 354, 250, 221], replies
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    chunks = command_chunks(session)
    assert [c.count(b"\r\n") for c in chunks] == [1] * len(chunks), chunks
    assert verbs(session)[:5] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    assert upstream.refused_commands == []


def test_without_pipelining_a_refused_mail_is_not_followed_by_rcpt(willi, fake_upstream, tmp_path) -> None:
    upstream = fake_upstream(extensions=without("PIPELINING"), replies={"mail": "553 5.7.1 <alice@sender.example>: "
                                                                                "Sender address rejected"})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>") == (
            553, ["5.7.1 <alice@sender.example>: Sender address rejected"])
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    assert "RCPT" not in verbs(upstream.sessions[0]), upstream.sessions[0].commands
    assert upstream.refused_commands == []


def test_with_pipelining_the_rcpt_behind_a_refused_mail_is_not_relayed(willi, fake_upstream, tmp_path) -> None:
    """The upstream answers the pipelined RCPT with 503 (no MAIL); the client hears the MAIL's refusal."""
    upstream = fake_upstream(replies={"mail": "553 5.7.1 Sender address rejected"})
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    client = w.raw()
    try:
        client.ehlo()
        assert client.cmd("MAIL FROM:<alice@sender.example>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.com>") == (553, ["5.7.1 Sender address rejected"])
        assert client.cmd("QUIT")[0] == 221
    finally:
        client.close()
    wait_sessions_closed(upstream, 1)
    (session,) = upstream.sessions
    assert chunk_with(session, b"MAIL FROM:").count(b"\r\n") == 2
    assert session.refused == ["RCPT TO:<bob@example.com>"]  # 503 need MAIL: the cost of pipelining, unseen


SCENARIOS = {
    "accepted": {},
    "first-rcpt-refused": {"rcpt_replies": {"bob@example.com": "550 5.1.1 <bob@example.com>: User unknown"}},
    "mail-refused": {"replies": {"mail": "553 5.7.1 Sender address rejected"}},
    "mail-421": {"replies": {"mail": "421 4.3.2 fake.upstream closing"}},
    "data-refused": {"replies": {"data": "554 5.5.1 Error: no thanks"}},
}


def replies_for(willi, fake_upstream, tmp_path, scenario: str, mode: str) -> list[tuple[int, list[str]]]:
    upstream = fake_upstream(**SCENARIOS[scenario], **MODES[mode])
    w = willi(config=make_config(tmp_path, [static_mapping(upstream.port)]))
    replies = dialog(w, ["bob@example.com", "carol@example.com"])
    w.stop()
    return replies


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_client_hears_the_same_with_and_without_pipelining(willi, fake_upstream, tmp_path, scenario) -> None:
    piped = replies_for(willi, fake_upstream, tmp_path, scenario, "pipelining")
    single = replies_for(willi, fake_upstream, tmp_path, scenario, "no-pipelining")
    assert piped == single
    first_rcpt = piped[1]
    expected = {
        "accepted": (250, ["2.1.5 Ok"]),
        "first-rcpt-refused": (550, ["5.1.1 <bob@example.com>: User unknown"]),
        "mail-refused": (553, ["5.7.1 Sender address rejected"]),
        "mail-421": (451, ["4.3.2 fake.upstream closing"]),
        "data-refused": (250, ["2.1.5 Ok"]),
    }[scenario]
    assert first_rcpt == expected, piped

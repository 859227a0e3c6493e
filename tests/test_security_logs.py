"""Issue 7, points 10 and 11: every transaction is logged, and one transaction is one line.

Point 10. A client's bytes need not be UTF-8 (`EHLO h\\xe9llo.example`):
the transaction line is written anyway, with the byte escaped (`\\xe9`), to a
file through the real handler (willi.log.ReopenableFileHandler, one write
per line) and by a real daemon with `logfile`.

Point 11. logfmt values and the dialog log escape every C0/C1 control, DEL,
the Unicode line and paragraph separators, bidi controls and other format
characters, and lone surrogates, so that a record is exactly one line (also
by `str.splitlines()`, which breaks at more than LF) and reads the same in a
terminal; a value can never forge another field.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_helpers import Reaper, WilliDaemon, free_port
from fakeupstream import FakeUpstream
from hypothesis import given, settings
from hypothesis import strategies as st
from proxy_helpers import static_mapping
from security_helpers import start
from support import RawClient, RunningWilli

from willi.log import LogfmtFormatter, ReopenableFileHandler, escape_text, logfmt, logfmt_value, setup_logging

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`log_file(level)` routes willi's logging to a file through the real handler; restored afterwards."""
    root = logging.getLogger("willi")
    saved = (list(root.handlers), root.level, root.propagate)
    handlers: list[logging.Handler] = []

    def install(level: str = "info") -> Path:
        path = tmp_path / "willi.log"
        handlers.append(setup_logging(level, handler=ReopenableFileHandler(path)))
        return path

    yield install
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    root.propagate = saved[2]


def transaction(w: RunningWilli, helo: bytes, *, rcpt: bytes = b"b@example.com", extra: bytes = b"") -> list[int]:
    """EHLO `helo`, one message; the reply codes."""
    client = w.raw()
    try:
        client.expect(220)
        codes = []
        for line in (b"EHLO " + helo, extra, b"MAIL FROM:<a@sender.example>", b"RCPT TO:<" + rcpt + b">", b"DATA"):
            if line:
                client.send(line + b"\r\n")
                codes.append(client.reply()[0])
        if codes[-1] == 354:
            client.send(b"Subject: x\r\n\r\nbody \xff bytes\r\n.\r\n")
            codes.append(client.reply()[0])
        client.send(b"QUIT\r\n")
        codes.append(client.reply()[0])
        return codes
    finally:
        client.close()


def lines_of(path: Path) -> list[str]:
    """The file's lines; the file must be UTF-8 and end each record with LF."""
    data = path.read_bytes()
    text = data.decode("utf-8")  # raises if a raw byte reached the file
    assert text.endswith("\n")
    return text[:-1].split("\n")


def transaction_records(path: Path) -> list[str]:
    return [line for line in lines_of(path) if " result=" in line]


# ---------------------------------------------------------------- point 10


@pytest.mark.parametrize(("helo", "logged"), [
    (b"h\xe9llo.example", "h\\xe9llo.example"),
    (b"\xff\xfe.example", "\\xff\\xfe.example"),
    (b"a\x80b", "a\\x80b"),
    (b"x\xed\xa0\x80y", "x\\xed\\xa0\\x80y"),             # UTF-8 for a surrogate: not UTF-8
    (b"caf\xc3\xa9.example", "caf\u00e9.example"),         # real UTF-8 stays readable
    (b"h\xe9llo\x1b[31m.example", "h\\xe9llo\\x1b[31m.example"),
])
def test_a_helo_that_is_not_utf8_is_logged_escaped(log_file, tmp_path: Path,
                                                   fake_upstream: Callable[..., FakeUpstream],
                                                   helo: bytes, logged: str) -> None:
    path = log_file("info")
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)])
    try:
        assert transaction(w, helo) == [250, 250, 250, 354, 250, 221]
        assert w.service.wait_idle(5)
    finally:
        w.stop()
    (record,) = transaction_records(path)
    assert "result=accepted" in record, record
    assert f'helo="{logged}"' in record or f"helo={logged}" in record, record
    assert len(upstream.completed_transactions) == 1


def test_a_daemon_logging_to_a_file_logs_a_non_utf8_helo(tmp_path: Path,
                                                         fake_upstream: Callable[..., FakeUpstream]) -> None:
    upstream = fake_upstream()
    port = free_port()
    config = tmp_path / "willi.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\ndomain = "mx.willi.test"\nclient_name_lookup = false\n'
        f'pidfile = "{tmp_path}/willi.pid"\nlogfile = "{tmp_path}/willi.log"\n'
        f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{upstream.port}"\ntls_verify = false\n')
    reaper = Reaper()
    daemon = WilliDaemon([sys.executable, str(ROOT / "willi.py")], config, tmp_path / "willi.pid",
                         tmp_path / "willi.log", port, reaper)
    try:
        daemon.start()
        client = RawClient("127.0.0.1", port)
        try:
            client.expect(220)
            for line, code in ((b"EHLO h\xe9llo.example", 250), (b"MAIL FROM:<a@sender.example>", 250),
                               (b"RCPT TO:<b@example.com>", 250), (b"DATA", 354)):
                client.send(line + b"\r\n")
                client.expect(code)
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            client.expect(250)
            client.send(b"QUIT\r\n")
            client.expect(221)
        finally:
            client.close()
        record = daemon.wait_log("result=accepted")
    finally:
        reaper.cleanup()
    assert 'helo="h\\xe9llo.example"' in record, record
    lines_of(tmp_path / "willi.log")  # valid UTF-8 throughout


# ---------------------------------------------------------------- point 11: the functions

HOSTILE = {
    "ESC": "\x1b", "VT": "\x0b", "FF": "\x0c", "NEL": "\x85", "LS": "\u2028", "PS": "\u2029", "RLO": "\u202e",
    "LRI": "\u2066", "PDI": "\u2069", "LRM": "\u200e", "ZWJ": "\u200d", "BOM": "\ufeff", "DEL": "\x7f",
    "NUL": "\x00", "CR": "\r", "LF": "\n", "TAB": "\t", "BS": "\x08", "BEL": "\x07", "FS": "\x1c", "GS": "\x1d",
    "RS": "\x1e", "US": "\x1f", "CSI (C1)": "\x9b", "lone high surrogate": "\ud800", "lone low surrogate": "\udfff",
    "escaped byte": "\udce9", "interlinear annotation": "\ufff9", "NBSP": "\u00a0", "ideographic space": "\u3000",
}
ESCAPED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b", "\x85": "\\x85", "\u2028": "\\u2028",
           "\u202e": "\\u202e", "\udce9": "\\xe9", "\ud800": "\\ud800", "\x00": "\\x00", "\x7f": "\\x7f"}  # noqa: F601 (ruff folds lone surrogates)


def one_line(text: str) -> bool:
    return len(text.splitlines()) <= 1 and "\n" not in text and "\r" not in text


@pytest.mark.parametrize("char", list(HOSTILE.values()), ids=list(HOSTILE))
def test_logfmt_value_escapes_each_hostile_character(char: str) -> None:
    value = logfmt_value(f"mx{char}evil.example")
    assert char not in value, value
    assert value.isprintable() and one_line(value), repr(value)
    value.encode("utf-8")  # no surrogate left
    if char in ESCAPED:
        assert ESCAPED[char] in value, value
    assert escape_text(f"a{char}b").isprintable()


def test_bidi_override_cannot_reorder_the_line() -> None:
    """`to=<...RLO...>` must not make a terminal show the rest of the line reversed."""
    line = logfmt({"to": "<admin\u202e@evil.example>", "result": "accepted"})
    assert "\u202e" not in line and "\\u202e" in line


_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=60)


@given(_ANY_TEXT)
def test_logfmt_value_is_printable_one_line_utf8(text: str) -> None:
    value = logfmt_value(text)
    assert value.isprintable(), repr(value)
    assert one_line(value), repr(value)
    value.encode("utf-8")


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: key=value, values bare or "quoted" with \\\\ and \\" escapes."""
    fields: dict[str, str] = {}
    pattern = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "=\\]*)(?: |$)')
    position = 0
    while position < len(line):
        match = pattern.match(line, position)
        assert match is not None, f"unparsable at {position}: {line[position:]!r}"
        key, raw = match.group(1), match.group(2)
        assert key not in fields, f"field {key} twice in {line!r}"
        fields[key] = raw
        position = match.end()
    return fields


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["result", "client", "helo", "from", "to", "reply", "error"]), _ANY_TEXT,
                       min_size=1))
def test_no_value_can_forge_a_field_or_a_line(fields: dict[str, str]) -> None:
    line = logfmt(fields)
    assert one_line(line) and line.isprintable(), repr(line)
    assert set(parse_logfmt(line)) == set(fields)


@given(_ANY_TEXT)
def test_a_record_written_through_the_real_handler_is_exactly_one_line(text: str) -> None:
    import os
    import tempfile

    fd, name = tempfile.mkstemp()
    os.close(fd)
    handler = ReopenableFileHandler(name)
    handler.setFormatter(LogfmtFormatter())
    try:
        record = logging.LogRecord("willi.transaction", logging.INFO, "", 0, "%s", (logfmt({"helo": text}),), None)
        handler.emit(record)
        # A message that is not logfmt at all (the dialog log, other modules) is escaped by the formatter.
        handler.emit(logging.LogRecord("willi.session", logging.DEBUG, "", 0, "sid=X C: %s", (text,), None))
        data = Path(name).read_bytes()
    finally:
        handler.close()
        os.unlink(name)
    decoded = data.decode("utf-8")
    assert decoded.count("\n") == 2 and decoded.endswith("\n")
    assert len(decoded.splitlines()) == 2, repr(decoded)
    assert all(line.isprintable() for line in decoded.splitlines())


# ---------------------------------------------------------------- point 11: through a session


@pytest.mark.parametrize("name", ["ESC", "VT", "FF", "NEL", "LS", "PS", "RLO", "LRI", "DEL", "NUL", "CR", "BEL",
                                  "CSI (C1)"])
def test_a_hostile_helo_is_one_escaped_line_in_the_file(log_file, tmp_path: Path,
                                                        fake_upstream: Callable[..., FakeUpstream], name: str) -> None:
    path = log_file("info")
    upstream = fake_upstream()
    w = start(tmp_path, [static_mapping(upstream.port)])
    helo = f"mx{HOSTILE[name]}forged result=accepted".encode("utf-8", "surrogateescape")
    try:
        assert transaction(w, helo)[-2:] == [250, 221]
        assert w.service.wait_idle(5)
    finally:
        w.stop()
    records = transaction_records(path)
    assert len(records) == 1, records
    assert HOSTILE[name] not in records[0]
    assert parse_logfmt(records[0].split(" level=info ", 1)[1])["result"] == "accepted"


def test_debug_dialog_log_escapes_a_cr_inside_a_command(log_file, tmp_path: Path,
                                                        fake_upstream: Callable[..., FakeUpstream]) -> None:
    path = log_file("debug")
    upstream = fake_upstream(rcpt_replies={"b@example.com": "250 2.1.5 ok \x1b[2J\x1b[31mcleared"})
    w = start(tmp_path, [static_mapping(upstream.port)], loglevel="debug")
    try:
        codes = transaction(w, b"client.example", extra=b"NOOP fake\rlevel=info result=accepted\x1b[1A\x85x")
        assert codes[:2] == [250, 250], codes
        assert w.service.wait_idle(5)
    finally:
        w.stop()
    lines = lines_of(path)
    dialog = [line for line in lines if " C: NOOP" in line]
    assert len(dialog) == 1, lines
    assert "NOOP fake\\rlevel=info result=accepted\\x1b[1A\\x85x" in dialog[0], dialog
    assert all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]
    upstream_lines = [line for line in lines if "upstream=" in line and " S: 250 2.1.5 ok" in line]
    assert upstream_lines and "\\x1b[2J" in upstream_lines[0], lines


def test_an_upstream_reply_with_controls_is_logged_escaped(log_file, tmp_path: Path,
                                                           fake_upstream: Callable[..., FakeUpstream]) -> None:
    path = log_file("info")
    upstream = fake_upstream(rcpt_replies={"b@example.com": "550 5.1.1 no\x1b[2J\u2028such user\x85"})
    w = start(tmp_path, [static_mapping(upstream.port)])
    try:
        client = w.raw()
        try:
            client.ehlo()
            client.cmd("MAIL FROM:<a@sender.example>")
            client.send(b"RCPT TO:<b@example.com>\r\n")
            raw = client.sock.recv(4096)
            client.cmd("QUIT")
        finally:
            client.close()
        assert w.service.wait_idle(5)
    finally:
        w.stop()
    assert raw == "550 5.1.1 no\x1b[2J\u2028such user\x85\r\n".encode(), raw  # relayed verbatim
    (record,) = transaction_records(path)
    assert "result=rejected" in record
    assert 'reply="550 5.1.1 no\\x1b[2J\\u2028such user\\x85"' in record, record

"""The pure protocol layer: parsing, formatting, xtext, and the DATA framer.

The DataFramer tests carry design.md's DATA invariants 4 and 5: only
CRLF-terminated, re-dot-stuffed lines leave Willi, only `<CRLF>.<CRLF>` ends
the data, bare CR/LF/NUL never pass, and memory stays bounded whatever the
line length or the way the client's bytes are split into packets.
"""

from __future__ import annotations

import itertools
import re
from contextlib import nullcontext
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from willi import protocol
from willi.protocol import (
    MAX_FRAGMENT,
    AddressError,
    DataFramer,
    ParameterError,
    Reply,
    dot_stuff,
    format_params,
    parse_ehlo,
    parse_params,
    parse_path,
    parse_reply_line,
    split_command,
    validate_domain,
    validate_mailbox,
    xclient_commands,
    xtext_decode,
    xtext_encode,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TERMINATOR = b"\r\n.\r\n"

# ---------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"MAIL FROM:<a@b.example>\r\n", ("MAIL", "FROM:<a@b.example>")),
        (b"mail FROM:<a@b.example>\r\n", ("MAIL", "FROM:<a@b.example>")),
        (b"rcpt To:<A@B.example> NOTIFY=NEVER\r\n", ("RCPT", "To:<A@B.example> NOTIFY=NEVER")),
        (b"QUIT\r\n", ("QUIT", "")),
        (b"quit", ("QUIT", "")),
        (b"  noop  \r\n", ("NOOP", "")),
        (b"EHLO  client.example \r\n", ("EHLO", "client.example")),
        (b"HELO a b c\r\n", ("HELO", "a b c")),
        (b"\r\n", ("", "")),
        (b"DATA\n", ("DATA", "")),
        (b"MAIL FROM:<\xff@b.example>\r\n", ("MAIL", "FROM:<\udcff@b.example>")),
        (b"EHLO X\r\n", ("EHLO", "X")),  # only CR and LF end the line
        (b"HELO a\t\r\n", ("HELO", "a\t")),
    ],
)
def test_split_command(line: bytes, expected: tuple[str, str]) -> None:
    assert split_command(line) == expected


# ---------------------------------------------------------------- paths


def _long_address(total: int) -> str:
    """A syntactically valid ASCII address of exactly `total` octets."""
    local = "l" * 64
    labels = []
    remaining = total - len(local) - 1
    while remaining > 0:
        size = min(63, remaining)
        if remaining - size == 1:  # avoid an empty last label
            size -= 2
        labels.append("d" * size)
        remaining -= size + 1
    domain = ".".join(labels)
    address = f"{local}@{domain}"
    assert len(address) == total, (len(address), total)
    return address


VALID_PATHS = [
    pytest.param("FROM:<a@example.com>", "FROM", False, ("a@example.com", ""), id="plain"),
    pytest.param("from:<a@example.com>", "FROM", False, ("a@example.com", ""), id="keyword-case"),
    pytest.param("FROM:<>", "FROM", False, ("", ""), id="null-sender"),
    pytest.param("FROM:<> SIZE=100 BODY=8BITMIME", "FROM", False, ("", "SIZE=100 BODY=8BITMIME"), id="null+params"),
    pytest.param("FROM: <a@example.com>", "FROM", False, ("a@example.com", ""), id="space-after-colon"),
    pytest.param("TO: <a@example.com> NOTIFY=NEVER", "TO", False, ("a@example.com", "NOTIFY=NEVER"),
                 id="space-after-colon+params"),
    pytest.param("TO:<a@example.com>  ORCPT=rfc822;a@example.com ", "TO", False,
                 ("a@example.com", "ORCPT=rfc822;a@example.com"), id="params-stripped"),
    pytest.param("FROM:<a@b.example> ENVID=QQX", "FROM", False, ("a@b.example", "ENVID=QQX"), id="param-ends-in-x"),
    pytest.param("TO:<Postmaster> NOTIFY=NEVERX", "TO", False, ("Postmaster", "NOTIFY=NEVERX"),
                 id="postmaster-param-ends-in-x"),
    pytest.param("TO:<a@example.com> NOTIFY=NEVER\t", "TO", False, ("a@example.com", "NOTIFY=NEVER\t"),
                 id="trailing-tab-kept-for-501"),  # only SP separates; parse_params then refuses the TAB
    pytest.param("TO:<Postmaster> NOTIFY=NEVER\t", "TO", False, ("Postmaster", "NOTIFY=NEVER\t"),
                 id="postmaster-trailing-tab-kept-for-501"),
    pytest.param("TO:<@relay.example:user@example.com>", "TO", False, ("user@example.com", ""), id="source-route"),
    pytest.param("TO:<@a.example,@b.example:user@example.com>", "TO", False, ("user@example.com", ""),
                 id="source-route-2-hops"),
    pytest.param('TO:<"john doe"@example.com>', "TO", False, ('"john doe"@example.com', ""), id="quoted-space"),
    pytest.param('TO:<"a>b"@example.com>', "TO", False, ('"a>b"@example.com', ""), id="quoted-bracket"),
    pytest.param('TO:<"a\\"b"@example.com>', "TO", False, ('"a\\"b"@example.com', ""), id="quoted-escape"),
    pytest.param('TO:<"a@b"@example.com>', "TO", False, ('"a@b"@example.com', ""), id="quoted-at"),
    pytest.param("TO:<user@[192.0.2.1]>", "TO", False, ("user@[192.0.2.1]", ""), id="ipv4-literal"),
    pytest.param("TO:<user@[IPv6:2001:db8::1]>", "TO", False, ("user@[IPv6:2001:db8::1]", ""), id="ipv6-literal"),
    pytest.param("TO:<postmaster>", "TO", False, ("postmaster", ""), id="postmaster"),
    pytest.param("TO:<Postmaster>", "TO", False, ("Postmaster", ""), id="Postmaster"),
    pytest.param("TO:<POSTMASTER> NOTIFY=NEVER", "TO", False, ("POSTMASTER", "NOTIFY=NEVER"), id="POSTMASTER+params"),
    pytest.param("TO:<postmaster@example.com>", "TO", False, ("postmaster@example.com", ""), id="postmaster@domain"),
    pytest.param("FROM:<a.b.c+tag@sub.example.com>", "FROM", False, ("a.b.c+tag@sub.example.com", ""), id="dots+plus"),
    pytest.param("FROM:<!#$%&'*+/=?^_`{|}~-@example.com>", "FROM", False,
                 ("!#$%&'*+/=?^_`{|}~-@example.com", ""), id="all-atext"),
    pytest.param("TO:<jörg@bücher.de>", "TO", True, ("jörg@bücher.de", ""), id="utf8-on"),
    pytest.param("TO:<用户@例子.广告>", "TO", True, ("用户@例子.广告", ""), id="utf8-cjk"),
    pytest.param("TO:<😀@example.com>", "TO", True, ("😀@example.com", ""), id="utf8-4-octet-emoji"),
    pytest.param("TO:<\U00020000@example.com>", "TO", True, ("\U00020000@example.com", ""),
                 id="utf8-4-octet-cjk-ext-b"),
    pytest.param("TO:<\uff46\uff55\uff4c\uff4c@example.com>", "TO", True, ("\uff46\uff55\uff4c\uff4c@example.com", ""),
                 id="utf8-fullwidth"),
    pytest.param("TO:<" + "a" * 64 + "@example.com>", "TO", False, ("a" * 64 + "@example.com", ""),
                 id="local-64-octets"),
    pytest.param("TO:<" + "ä" * 32 + "@example.com>", "TO", True, ("ä" * 32 + "@example.com", ""),
                 id="utf8-local-64-octets"),
    pytest.param("TO:<a@" + "b" * 63 + ".example>", "TO", False, ("a@" + "b" * 63 + ".example", ""), id="label-63"),
    pytest.param(f"TO:<{_long_address(254)}>", "TO", False, (_long_address(254), ""), id="path-256-octets"),
]


@pytest.mark.parametrize(("arg", "keyword", "utf8", "expected"), VALID_PATHS)
def test_parse_path_valid(arg: str, keyword: str, utf8: bool, expected: tuple[str, str]) -> None:
    assert parse_path(arg, keyword, utf8=utf8) == expected


SYNTAX_ERRORS = [
    pytest.param("FROM:a@example.com", "FROM", id="no-brackets"),
    pytest.param("FROM:<a@example.com", "FROM", id="no-closing-bracket"),
    pytest.param("FROM:<", "FROM", id="lone-opening-bracket"),
    pytest.param("FROM:<a", "FROM", id="one-character-unclosed"),
    pytest.param("FROM:  <a@example.com>", "FROM", id="two-spaces-after-colon"),
    pytest.param("FROM <a@example.com>", "FROM", id="no-colon"),
    pytest.param("FROM<a@example.com>", "FROM", id="no-colon-no-space"),
    pytest.param("TO:<a@example.com>", "FROM", id="wrong-keyword"),
    pytest.param("FROMAGE:<a@example.com>", "FROM", id="keyword-prefix"),
    pytest.param("FROM:<a@example.com>SIZE=1", "FROM", id="no-space-before-params"),
    pytest.param("", "FROM", id="empty"),
    pytest.param("TO:", "TO", id="nothing-after-colon"),
]


@pytest.mark.parametrize(("arg", "keyword"), SYNTAX_ERRORS)
def test_parse_path_syntax_error(arg: str, keyword: str) -> None:
    """Broken syntax around the address is a 501, not a 553: a plain ValueError."""
    with pytest.raises(ValueError) as info:
        parse_path(arg, keyword, utf8=True)
    assert not isinstance(info.value, AddressError)


ADDRESS_ERRORS = [
    pytest.param("TO:<>", "TO", True, id="null-recipient"),
    pytest.param("FROM:<postmaster>", "FROM", True, id="postmaster-as-sender"),
    pytest.param("TO:<user>", "TO", True, id="no-domain"),
    pytest.param("TO:<@example.com>", "TO", True, id="empty-local"),
    pytest.param("TO:<user@>", "TO", True, id="empty-domain"),
    pytest.param("TO:<user@@example.com>", "TO", True, id="double-at"),
    pytest.param("TO:<.user@example.com>", "TO", True, id="leading-dot"),
    pytest.param("TO:<user.@example.com>", "TO", True, id="trailing-dot"),
    pytest.param("TO:<us..er@example.com>", "TO", True, id="double-dot"),
    pytest.param("TO:<john doe@example.com>", "TO", True, id="unquoted-space"),
    pytest.param("TO:<a,b@example.com>", "TO", True, id="comma"),
    pytest.param('TO:<"a"b@example.com>', "TO", True, id="half-quoted"),
    pytest.param("TO:<user@-example.com>", "TO", True, id="label-leading-hyphen"),
    pytest.param("TO:<user@example-.com>", "TO", True, id="label-trailing-hyphen"),
    pytest.param("TO:<user@exa_mple.com>", "TO", True, id="underscore-domain"),
    pytest.param("TO:<user@example..com>", "TO", True, id="empty-label"),
    pytest.param("TO:<user@example.com.>", "TO", True, id="trailing-dot-domain"),
    pytest.param("TO:<user@[300.1.1.1]>", "TO", True, id="ipv4-literal-out-of-range"),
    pytest.param("TO:<user@[192.0.2]>", "TO", True, id="ipv4-literal-short"),
    pytest.param("TO:<user@[192.0.2.1>", "TO", True, id="literal-unclosed"),
    pytest.param("TO:<user@[IPv6:zz::1]>", "TO", True, id="ipv6-literal-garbage"),
    pytest.param("TO:<user@[example.com]>", "TO", True, id="literal-hostname"),
    pytest.param("TO:<" + "a" * 65 + "@example.com>", "TO", True, id="local-65-octets"),
    pytest.param("TO:<" + "ä" * 33 + "@example.com>", "TO", True, id="utf8-local-66-octets"),
    pytest.param("TO:<a@" + "b" * 64 + ".example>", "TO", True, id="label-64"),
    pytest.param(f"TO:<{_long_address(255)}>", "TO", True, id="path-257-octets"),
    pytest.param("TO:<jörg@example.com>", "TO", False, id="utf8-local-without-smtputf8"),
    pytest.param("TO:<user@bücher.de>", "TO", False, id="utf8-domain-without-smtputf8"),
    pytest.param("TO:<\udcff@example.com>", "TO", True, id="not-utf8"),
    pytest.param("TO:<user@exa\udcffmple.com>", "TO", True, id="not-utf8-domain"),
    pytest.param("TO:<us\x00er@example.com>", "TO", True, id="nul"),
    pytest.param("TO:<us\ter@example.com>", "TO", True, id="tab"),
]


@pytest.mark.parametrize(("arg", "keyword", "utf8"), ADDRESS_ERRORS)
def test_parse_path_bad_address(arg: str, keyword: str, utf8: bool) -> None:
    with pytest.raises(AddressError):
        parse_path(arg, keyword, utf8=utf8)


def test_parse_path_from_raw_bytes_not_utf8() -> None:
    """Non-UTF-8 octets survive split_command and are refused precisely (553, not a crash)."""
    _, arg = split_command(b"RCPT TO:<j\xf6rg@example.com>\r\n")
    with pytest.raises(AddressError):
        parse_path(arg, "TO", utf8=True)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("SIZE=10", {"SIZE": "10"}),
        ("size=10 body=8BITMIME smtputf8", {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}),
        ("SIZE=10  BODY=7BIT", {"SIZE": "10", "BODY": "7BIT"}),
        ("ORCPT=rfc822;a+2Bb@example.com", {"ORCPT": "rfc822;a+2Bb@example.com"}),
        ("RET=HDRS ENVID=QQ314159", {"RET": "HDRS", "ENVID": "QQ314159"}),
        ("X-CUSTOM=1", {"X-CUSTOM": "1"}),
        ("NOTIFY=SUCCESS,FAILURE", {"NOTIFY": "SUCCESS,FAILURE"}),
    ],
)
def test_parse_params(text: str, expected: dict[str, str | None]) -> None:
    assert parse_params(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("SIZE=1 SIZE=2", id="repeated"),
        pytest.param("SIZE=1 size=2", id="repeated-other-case"),
        pytest.param("SMTPUTF8 SMTPUTF8", id="repeated-flag"),
        pytest.param("=10", id="no-keyword"),
        pytest.param("SIZE=", id="empty-value"),
        pytest.param("SIZE==10", id="double-equals"),
        pytest.param("A=b=c", id="equals-in-value"),
        pytest.param("-SIZE=1", id="leading-hyphen"),
        pytest.param("SI_ZE=1", id="underscore"),
        pytest.param("SIZE=ä", id="non-ascii-value"),
        pytest.param("SIZE=1\x00", id="nul"),
        pytest.param("SIZE=10\tBODY=8BITMIME", id="tab-between"),  # RFC 5321: parameters are separated by SP
    ],
)
def test_parse_params_malformed(text: str) -> None:
    with pytest.raises(ParameterError):
        parse_params(text)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ""),
        ({"SIZE": "10"}, "SIZE=10"),
        ({"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}, "SIZE=10 BODY=8BITMIME SMTPUTF8"),
        ({"SMTPUTF8": None}, "SMTPUTF8"),
    ],
)
def test_format_params(params: dict[str, str | None], expected: str) -> None:
    assert format_params(params) == expected
    assert parse_params(format_params(params)) == params


_LABEL = "a" * 63


@pytest.mark.parametrize(("domain", "utf8", "valid"), [
    (".".join([_LABEL] * 4), False, True),  # 255 octets: the longest domain
    (".".join([_LABEL] * 4) + "a", False, False),
    ("ex\u00e4mple.com", False, False),
    ("ex\u00e4mple.com", True, True),
    ("[192.0.2.1]", False, True),
    ("[192.0.2.1", False, False),
    ("", True, False),
])
def test_validate_domain(domain: str, utf8: bool, valid: bool) -> None:
    if valid:
        validate_domain(domain, utf8=utf8)
    else:
        with pytest.raises(AddressError):
            validate_domain(domain, utf8=utf8)


@pytest.mark.parametrize("octet", ["\udc80", "\udcbf", "\udcff"], ids=["0x80", "0xbf", "0xff"])
def test_a_mailbox_with_a_raw_octet_is_refused_even_with_smtputf8(octet: str) -> None:
    with pytest.raises(AddressError):
        validate_mailbox(f"a{octet}@b.example", utf8=True)


# ---------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"250 OK\r\n", (250, True, "OK")),
        (b"250-PIPELINING\r\n", (250, False, "PIPELINING")),
        (b"250 2.0.0 Ok: queued as 4XyZ\r\n", (250, True, "2.0.0 Ok: queued as 4XyZ")),
        (b"550 5.1.1 <a@b>: no such user", (550, True, "5.1.1 <a@b>: no such user")),
        (b"250\r\n", (250, True, "")),
        (b"250-\r\n", (250, False, "")),
        (b"250 \r\n", (250, True, "")),
        (b"421 4.4.2 bye\n", (421, True, "4.4.2 bye")),
        (b"250 a\rb\x00c\r\n", (250, True, "abc")),
        (b"250 caf\xc3\xa9\r\n", (250, True, "café")),
        (b"250 \xff\r\n", (250, True, "\udcff")),
        (b"250 2.0.0 Ok: queued as 4XX\r\n", (250, True, "2.0.0 Ok: queued as 4XX")),  # only CR and LF end it
        (b"250 ok \t \r\n", (250, True, "ok \t ")),  # trailing blanks are the upstream's text
    ],
)
def test_parse_reply_line(line: bytes, expected: tuple[int, bool, str]) -> None:
    assert parse_reply_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [b"", b"\r\n", b"25 OK\r\n", b"2500 OK\r\n", b"250OK\r\n", b"abc OK\r\n", b"150 OK\r\n",
     b"650 OK\r\n", b"250_OK\r\n", b" 250 OK\r\n", b"25\r\n", b"2 0 OK\r\n", b"250\tOK\r\n",
     b"\xd9\xa250 OK\r\n", b"250\x00OK\r\n"],
)
def test_parse_reply_line_malformed(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply_line(line)


_REPLY_LINE_REFERENCE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)


def reference_reply_line(line: bytes) -> tuple[int, bool, str] | None:
    """The reply-line grammar as one regular expression: the oracle for the hand-written parser."""
    raw = line.rstrip(b"\r\n")
    if len(raw) == 3 and raw.isdigit() and raw[:1] in b"2345":
        return int(raw), True, ""
    m = _REPLY_LINE_REFERENCE.match(raw)
    if not m:
        return None
    text = m.group(3).replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    return int(m.group(1)), m.group(2) == b" ", text.decode("utf-8", "surrogateescape")


_REPLY_ISH = st.one_of(
    st.binary(max_size=12),
    st.builds(lambda head, rest: head + rest,
              st.sampled_from([b"250", b"550", b"199", b"600", b"2 0", b"25", b"2500", b"\xd9\xa20", b"421"]),
              st.binary(max_size=10)),
    st.builds(lambda code, sep, text: code + sep + text + b"\r\n",
              st.sampled_from([b"220", b"354", b"452"]), st.sampled_from([b" ", b"-", b"\t", b"_", b""]),
              st.binary(max_size=10)),
)


@PROPERTY
@given(line=_REPLY_ISH)
def test_parse_reply_line_matches_the_grammar(line: bytes) -> None:
    try:
        got: tuple[int, bool, str] | None = parse_reply_line(line)
    except ValueError:
        got = None
    assert got == reference_reply_line(line)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply.of(250, "2.0.0 Ok"), b"250 2.0.0 Ok\r\n"),
        (Reply.of(250), b"250\r\n"),
        (Reply.of(250, "mx.example", "PIPELINING", "SIZE 1000", "8BITMIME"),
         b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"),
        (Reply.of(550, "5.1.1 first", "5.1.1 second"), b"550-5.1.1 first\r\n550 5.1.1 second\r\n"),
        (Reply.of(220, "mx ESMTP Willi"), b"220 mx ESMTP Willi\r\n"),
        (Reply.of(250, "caf\u00e9"), b"250 caf\xc3\xa9\r\n"),
    ],
)
def test_reply_encode(reply: Reply, wire: bytes) -> None:
    assert reply.encode() == wire


def test_a_reply_without_text_is_the_bare_code() -> None:
    assert Reply.of(250).encode() == b"250\r\n"
    assert Reply.of(250).lines == ("",)


@pytest.mark.parametrize(("text", "wire"), [
    ("ok ", b"250 ok \r\n"),           # the upstream's trailing blank stays
    ("\udcff", b"250 \xff\r\n"),       # a raw octet from the upstream goes back as that octet
    ("caf\u00e9", b"250 caf\xc3\xa9\r\n"),
])
def test_a_relayed_reply_line_is_encoded_verbatim(text: str, wire: bytes) -> None:
    assert Reply.of(250, text).encode() == wire


def test_reply_helpers() -> None:
    reply = Reply.of(250, "a", "b")
    assert reply.text == "a / b"
    assert str(reply) == "250 a / b"
    assert reply.is_positive
    assert Reply.of(354, "go").is_positive
    assert not Reply.of(451, "later").is_positive
    assert not Reply.of(550, "no").is_positive


_REPLY_TEXT = st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), max_size=30)


@PROPERTY
@given(code=st.integers(200, 599), lines=st.lists(_REPLY_TEXT, min_size=1, max_size=5))
def test_reply_encode_parse_round_trip(code: int, lines: list[str]) -> None:
    wire = Reply(code, tuple(lines)).encode()
    assert wire.endswith(b"\r\n")
    raw_lines = wire.split(b"\r\n")[:-1]
    assert len(raw_lines) == len(lines)
    parsed = [parse_reply_line(line) for line in raw_lines]
    assert [p[0] for p in parsed] == [code] * len(lines)
    assert [p[1] for p in parsed] == [False] * (len(lines) - 1) + [True]
    assert [p[2] for p in parsed] == lines


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (("mx.example",), {}),
        (("mx.example Hello", "PIPELINING", "SIZE 10240000", "8BITMIME", "STARTTLS", "ENHANCEDSTATUSCODES"),
         {"PIPELINING": "", "SIZE": "10240000", "8BITMIME": "", "STARTTLS": "", "ENHANCEDSTATUSCODES": ""}),
        (("mx", "xclient NAME ADDR PORT PROTO HELO", "smtputf8"),
         {"XCLIENT": "NAME ADDR PORT PROTO HELO", "SMTPUTF8": ""}),
        (("mx", "SIZE  1000 ", "", "AUTH PLAIN LOGIN"), {"SIZE": "1000", "AUTH": "PLAIN LOGIN"}),
    ],
)
def test_parse_ehlo(lines: tuple[str, ...], expected: dict[str, str]) -> None:
    assert parse_ehlo(Reply(250, lines)) == expected


# ---------------------------------------------------------------- xtext


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("", ""),
        ("mx.example.com", "mx.example.com"),
        ("[UNAVAILABLE]", "[UNAVAILABLE]"),
        ("IPV6:2001:db8::1", "IPV6:2001:db8::1"),
        ("a b", "a+20b"),
        ("a=b", "a+3Db"),
        ("a+b", "a+2Bb"),
        ("evil NAME=x", "evil+20NAME+3Dx"),
        ("tab\there", "tab+09here"),
        ("cr\r\nlf", "cr+0D+0Alf"),
        ("del\x7f", "del+7F"),
        ("ä", "+C3+A4"),
        ("\udcff", "+FF"),
    ],
)
def test_xtext(value: str, encoded: str) -> None:
    assert xtext_encode(value) == encoded
    assert xtext_decode(encoded) == value


_XTEXT_CHUNK = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


@PROPERTY
@given(st.text())
def test_xtext_property(value: str) -> None:
    encoded = xtext_encode(value)
    assert encoded.isascii()
    assert " " not in encoded and "=" not in encoded
    assert all(0x21 <= ord(c) <= 0x7E for c in encoded)
    assert _XTEXT_CHUNK.match(encoded), encoded
    assert xtext_decode(encoded) == value


@PROPERTY
@given(st.binary(max_size=200))
def test_xtext_of_raw_helo_bytes(raw: bytes) -> None:
    """Whatever octets a client puts in HELO, the xtext is safe and decodes back."""
    value = raw.decode("utf-8", "surrogateescape")
    encoded = xtext_encode(value)
    assert _XTEXT_CHUNK.match(encoded)
    assert xtext_decode(encoded).encode("utf-8", "surrogateescape") == raw


# ---------------------------------------------------------------- XCLIENT


def _items(commands: list[str]) -> list[str]:
    out = []
    for command in commands:
        verb, *items = command.split(" ")
        assert verb == "XCLIENT"
        out.extend(items)
    return out


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ([], []),
        ([("ADDR", "192.0.2.1")], ["XCLIENT ADDR=192.0.2.1"]),
        ([("ADDR", "IPV6:2001:db8::1"), ("NAME", "[UNAVAILABLE]"), ("PORT", "40312"), ("PROTO", "ESMTP"),
          ("HELO", "client.example")],
         ["XCLIENT ADDR=IPV6:2001:db8::1 NAME=[UNAVAILABLE] PORT=40312 PROTO=ESMTP HELO=client.example"]),
        ([("HELO", "x NAME=evil.example ADDR=10.0.0.1")], ["XCLIENT HELO=x+20NAME+3Devil.example+20ADDR+3D10.0.0.1"]),
        ([("HELO", "")], ["XCLIENT HELO="]),
    ],
)
def test_xclient_commands(attributes: list[tuple[str, str]], expected: list[str]) -> None:
    assert xclient_commands(attributes) == expected


def test_xclient_commands_split_many_long_attributes() -> None:
    attributes = [(f"ATTR{i}", f"{i}-" + "v" * 150) for i in range(12)]
    commands = xclient_commands(attributes)
    assert len(commands) >= 4
    for command in commands:
        assert len((command + "\r\n").encode()) <= 512
        assert command.startswith("XCLIENT ") and len(command) > len("XCLIENT ")
    assert _items(commands) == [f"{name}={xtext_encode(value)}" for name, value in attributes]


def test_xclient_commands_split_long_encoded_helo() -> None:
    """Encoding can triple a value: the packing counts encoded octets."""
    attributes = [("ADDR", "192.0.2.1"), ("NAME", "[UNAVAILABLE]"), ("HELO", "ä " * 40), ("PROTO", "ESMTP")]
    commands = xclient_commands(attributes)
    assert all(len(c) + 2 <= 512 for c in commands)
    assert _items(commands) == [f"{n}={xtext_encode(v)}" for n, v in attributes]


def test_xclient_commands_exact_boundary() -> None:
    """A command of exactly 512 octets with CRLF fits; one more octet does not."""
    fill = "v" * (512 - 2 - len("XCLIENT ") - len("A="))
    assert xclient_commands([("A", fill)]) == [f"XCLIENT A={fill}"]
    first = "v" * (512 - 2 - len("XCLIENT ") - len("A=") - len(" B=x"))
    assert xclient_commands([("A", first), ("B", "x")]) == [f"XCLIENT A={first} B=x"]
    assert xclient_commands([("A", first + "v"), ("B", "x")]) == [f"XCLIENT A={first}v", "XCLIENT B=x"]


def test_xclient_commands_single_oversized_attribute() -> None:
    """An attribute that cannot fit in 512 octets must not produce an over-long command.

    A client's HELO may be up to max_command_line long; the XCLIENT line to
    the upstream must still respect the 512-octet limit (design.md: "at most
    512 octets per command"). Dropping or truncating the attribute are both
    acceptable; the other attributes must still be sent.
    """
    attributes = [("ADDR", "192.0.2.1"), ("HELO", "h" * 600), ("PROTO", "ESMTP")]
    commands = xclient_commands(attributes)
    assert all(len(c) + 2 <= 512 for c in commands), [len(c) + 2 for c in commands]
    items = _items(commands)
    assert "ADDR=192.0.2.1" in items and "PROTO=ESMTP" in items


@pytest.mark.parametrize("char", ["h", "\u00e9", "\u20ac", "\U0001f600", "\udcff", "+"],
                         ids=["ascii", "2-octet", "3-octet", "4-octet", "raw-octet", "plus"])
@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc"])
def test_an_overlong_xclient_value_keeps_the_longest_prefix_that_fits(prefix: str, char: str) -> None:
    """Only as much of the HELO is cut as 512 octets demand, whatever the width of its characters."""
    value = prefix + char * 600
    (command,) = xclient_commands([("HELO", value)])
    assert len(command) + 2 <= 512
    kept = xtext_decode(command.removeprefix("XCLIENT HELO="))
    assert value.startswith(kept)
    longer = "XCLIENT HELO=" + xtext_encode(value[: len(kept) + 1])
    assert len(longer) + 2 > 512, "a character more would still have fitted"


@PROPERTY
@given(st.text(min_size=1, max_size=700), st.integers(min_value=40, max_value=600))
def test_a_cut_xclient_value_is_a_maximal_prefix(value: str, limit: int) -> None:
    (command,) = xclient_commands([("NAME", value)], limit=limit)
    kept = xtext_decode(command.removeprefix("XCLIENT NAME="))
    assert value.startswith(kept) and len(command) + 2 <= limit
    if kept != value:
        assert len("XCLIENT NAME=" + xtext_encode(value[: len(kept) + 1])) + 2 > limit


def test_every_xclient_command_carries_an_attribute() -> None:
    """Even an attribute whose name alone exceeds the limit never yields a bare `XCLIENT`."""
    commands = xclient_commands([("DESTADDR", "192.0.2.1"), ("ADDR", "192.0.2.2")], limit=16)
    assert "XCLIENT" not in commands and commands


_ATTR_NAME = st.sampled_from(["ADDR", "NAME", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"])


@PROPERTY
@given(st.lists(st.tuples(_ATTR_NAME, st.one_of(st.text(max_size=60), st.text(min_size=200, max_size=700))),
                max_size=12))
def test_xclient_commands_never_over_512(attributes: list[tuple[str, str]]) -> None:
    commands = xclient_commands(attributes)
    for command in commands:
        assert len((command + "\r\n").encode("utf-8", "surrogateescape")) <= 512
        assert command.isascii()
        assert command.startswith("XCLIENT ")
    # Every attribute that can fit at all is sent, in order.
    fitting = [f"{n}={xtext_encode(v)}" for n, v in attributes if len(f"XCLIENT {n}={xtext_encode(v)}\r\n") <= 512]
    items = iter(_items(commands))
    assert all(any(item == want for item in items) for want in fitting)


# ---------------------------------------------------------------- DATA framer


def run_framer(data: bytes, cuts: list[int] | None = None) -> tuple[DataFramer, bytes, bytes | None, int]:
    """Feed `data` split at `cuts`; return (framer, output, rest or None if not done, max pending).

    Also checks, after each feed, that the pending buffer stays bounded and
    that a finished framer takes no more input.
    """
    framer = DataFramer()
    bounds = [0, *sorted(set(c for c in (cuts or []) if 0 < c < len(data))), len(data)]
    out = []
    rest: bytes | None = None
    max_pending = 0
    for start, end in itertools.pairwise(bounds):
        chunk = data[start:end]
        was_done = framer.done
        produced, after = framer.feed(chunk)
        max_pending = max(max_pending, len(framer._pending))
        assert len(framer._pending) <= protocol.MAX_FRAGMENT + 1
        if was_done:
            assert produced == b"" and after == chunk
            assert rest is not None
            rest += after
            continue
        out.append(produced)
        if framer.done:
            rest = after
        else:
            assert after == b""
    return framer, b"".join(out), rest, max_pending


def expected_end(data: bytes) -> int | None:
    """Where the data ends: just after the first <CRLF>.<CRLF> (the DATA line's CRLF counts)."""
    i = (b"\r\n" + data).find(TERMINATOR)
    return None if i < 0 else i + 3


def unstuff(output: bytes) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line for line in output.splitlines(keepends=True))


def check_upstream_bytes(output: bytes, *, complete: bool) -> None:
    """Invariant 4: what the upstream may receive."""
    assert b"\x00" not in output
    assert output.count(b"\r") == output.count(b"\r\n"), "bare CR"
    assert output.count(b"\n") == output.count(b"\r\n"), "bare LF"
    assert TERMINATOR not in b"\r\n" + output, "a lone '.' line would end the upstream's DATA early"
    if complete:
        assert output == b"" or output.endswith(b"\r\n")
    for line in output.split(b"\r\n"):
        assert not line.startswith(b".") or line.startswith(b".."), f"unstuffed dot line {line!r}"


# Bodies built from the pieces that matter, so the interesting cases are common.
_PIECES = st.sampled_from([b"a", b"xyz", b".", b"..", b"\r", b"\n", b"\r\n", b"\x00", b"\r\n.", b"\n.", b"\r.",
                           b" ", b"\xff", b"\r\r\n", b"\x00\x00\x00\x00", b"\r\r\r\r\r"])
_TRICKY = st.lists(_PIECES, max_size=40).map(b"".join)
_BODY = st.one_of(_TRICKY, st.binary(max_size=200))
# Real MAX_FRAGMENT, and a tiny one so that the overlong-line path is exercised by short examples.
FRAGMENT_SIZES = [pytest.param(None, id="real-fragment"), pytest.param(3, id="fragment-3")]


def fragment_size(size: int | None):
    return nullcontext() if size is None else mock.patch.object(protocol, "MAX_FRAGMENT", size)


_CUTS = st.lists(st.integers(0, 320), max_size=12)  # run_framer ignores cuts beyond the data


@pytest.mark.parametrize("fragment", FRAGMENT_SIZES)
@PROPERTY
@given(body=_BODY, tail=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"]),
       cuts=_CUTS)
@example(body=b"\r\n\x00\x00\x00\x00\x00.\r\nx", tail=b"", cuts=[7])
def test_framer_split_does_not_matter(fragment: int | None, body: bytes, tail: bytes, cuts: list[int]) -> None:
    stream = body + TERMINATOR + tail
    end = expected_end(stream)
    assert end is not None
    with fragment_size(fragment):
        whole, whole_out, whole_rest, _ = run_framer(stream)
        split, split_out, split_rest, _ = run_framer(stream, cuts)
    assert whole.done and split.done
    assert split_out == whole_out
    assert whole_rest == split_rest == stream[end:]
    assert split.violation == whole.violation
    assert split.size == whole.size
    if end == len(body) + len(TERMINATOR):
        assert whole_rest == tail


@pytest.mark.parametrize("fragment", FRAGMENT_SIZES)
@PROPERTY
@given(stream=st.one_of(_BODY, _BODY.map(lambda b: b + TERMINATOR + b"NOOP\r\n")), cuts=_CUTS)
@example(stream=b"\r\n\r\r\r\r\r.\r\n", cuts=[7])
def test_framer_output_is_safe_for_upstream(fragment: int | None, stream: bytes, cuts: list[int]) -> None:
    with fragment_size(fragment):
        framer, output, rest, _ = run_framer(stream, cuts)
    end = expected_end(stream)
    assert framer.done == (end is not None)
    if end is not None:
        assert rest == stream[end:]
    check_upstream_bytes(output, complete=framer.done)
    if framer.done:
        assert framer.size == len(unstuff(output))


_LINE = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))
_DOT_LINE = st.one_of(_LINE, _LINE.map(lambda b: b"." + b), st.sampled_from([b".", b"..", b"...", b".\t", b""]))


@pytest.mark.parametrize("fragment", FRAGMENT_SIZES)
@PROPERTY
@given(lines=st.lists(_DOT_LINE, max_size=20), cuts=st.lists(st.integers(0, 700), max_size=12))
def test_framer_well_formed_round_trip(fragment: int | None, lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = dot_stuff(message)
    with fragment_size(fragment):
        framer, output, rest, _ = run_framer(stuffed, cuts)
    assert framer.done and rest == b""
    # The output is what the upstream gets: the message stuffed again, before Willi's own ".<CRLF>".
    assert output + b".\r\n" == stuffed
    assert unstuff(output) == message
    assert framer.violation is False
    assert framer.size == len(message)


def test_framer_empty_message() -> None:
    framer, output, rest, _ = run_framer(b".\r\nQUIT\r\n")
    assert framer.done and output == b"" and rest == b"QUIT\r\n" and framer.size == 0
    assert not framer.violation


def test_framer_stuffing_examples() -> None:
    framer, output, rest, _ = run_framer(b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n")
    assert framer.done and rest == b""
    assert output == b"..\r\n...x\r\ny\r\nz.\r\n"  # re-stuffed for the upstream
    assert unstuff(output) == b".\r\n..x\r\ny\r\nz.\r\n"
    assert framer.size == len(unstuff(output)) and not framer.violation


def test_framer_normalize_drops_exactly_the_stray_cr_and_nul() -> None:
    """Bare CR and NUL are removed, nothing put in their place, and the rest of the line kept."""
    framer, output, rest, _ = run_framer(b"a\rb\x00c\r\n\x00.d\r\n.\r\n")
    assert framer.done and rest == b"" and framer.violation
    assert output == b"abc\r\n..d\r\n"
    assert framer.size == len(b"abc\r\n.d\r\n")


def test_framer_a_lone_dot_ended_by_a_bare_lf_is_content_not_the_end() -> None:
    """`.<LF>` ends nothing and loses nothing: the upstream gets the line "." (stuffed), not an empty line."""
    framer, output, rest, _ = run_framer(b".\nx\r\n.\r\n")
    assert framer.done and rest == b"" and framer.violation
    assert output == b"..\r\nx\r\n"


@pytest.mark.parametrize(("message", "wire"), [
    (b"", b".\r\n"),
    (b"abc", b"abc\r\n.\r\n"),
    (b"abc\r\n", b"abc\r\n.\r\n"),
    (b".a\r\n.b", b"..a\r\n..b\r\n.\r\n"),
])
def test_dot_stuff_terminates_and_stuffs(message: bytes, wire: bytes) -> None:
    assert dot_stuff(message) == wire


SMUGGLING = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
    pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL-CRLF"),
    pytest.param(b"\r\r\n.\n", id="CRCRLF.LF"),
]


@pytest.mark.parametrize("fragment", FRAGMENT_SIZES)
@pytest.mark.parametrize("fake_end", SMUGGLING)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_framer_only_crlf_dot_crlf_ends(fake_end: bytes, split: str, fragment: int | None) -> None:
    smuggled = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    body = b"Subject: hello\r\n\r\ntext" + fake_end + smuggled + b"more text"
    stream = body + TERMINATOR + b"QUIT\r\n"
    cuts = list(range(len(stream))) if split == "bytewise" else []
    with fragment_size(fragment):
        framer, output, rest, _ = run_framer(stream, cuts)
    assert framer.done
    assert rest == b"QUIT\r\n", "the data must end exactly at the real terminator"
    assert framer.violation is True
    check_upstream_bytes(output, complete=True)
    assert b"MAIL FROM:<evil@attacker.example>\r\n" in output  # it is message text, not a command


@pytest.mark.parametrize("chunk_size", [1000, 4096, 65536, MAX_FRAGMENT + 1, 300_000, 2_000_000])
@pytest.mark.parametrize("first", [b"x", b"."])
def test_framer_very_long_line_bounded(chunk_size: int, first: bytes) -> None:
    content = first + b"y" * (1024 * 1024)  # 1 MiB without a newline
    stuffed = (b"." if first == b"." else b"") + content
    stream = stuffed + TERMINATOR + b"QUIT\r\n"
    framer, output, rest, max_pending = run_framer(stream, list(range(chunk_size, len(stream), chunk_size)))
    assert max_pending <= MAX_FRAGMENT + 1
    assert framer.done and rest == b"QUIT\r\n"
    assert output == stuffed + b"\r\n"
    assert not framer.violation
    assert framer.size == len(content) + 2


@pytest.mark.parametrize("junk", [b"\x00", b"\r"])
def test_framer_long_junk_prefix_then_dot(junk: bytes) -> None:
    """An overlong line of NUL/CR that is stripped away must not unstuff the '.' that follows.

    The client sends `<CRLF>` + 70000 x NUL + `.<CRLF>` in two packets. That
    is no terminator (only <CRLF>.<CRLF> is), and after NUL removal the line
    is ".", which must reach the upstream stuffed as "..", never as a lone ".".
    """
    head = b"Subject: x\r\n\r\nline\r\n" + junk * (MAX_FRAGMENT + 5000)
    stream = head + b".\r\nMAIL FROM:<evil@attacker.example>\r\n" + TERMINATOR
    whole = run_framer(stream)
    split = run_framer(stream, [len(head)])
    for framer, output, rest, _ in (whole, split):
        assert framer.done and rest == b""
        assert framer.violation
        check_upstream_bytes(output, complete=True)
    assert split[1] == whole[1]

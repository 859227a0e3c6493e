"""Pure SMTP functions: parsing commands, addresses and parameters,
formatting replies, xtext, and the streaming DATA framer.

Nothing here touches a socket, so each piece is tested in isolation
(parametrized and property tests) and the session stays readable.
"""

from __future__ import annotations

import re
from typing import NamedTuple

CRLF = b"\r\n"

# ---------------------------------------------------------------- replies


class Reply(NamedTuple):
    """An SMTP reply: one code, one or more text lines (enhanced code included).

    A named tuple rather than a frozen dataclass: a session makes a dozen of
    these per message, and a tuple is built without a __setattr__ per field.
    """

    code: int
    lines: tuple[str, ...]

    @classmethod
    def of(cls, code: int, *lines: str) -> Reply:
        return cls(code, lines or ("",))

    @property
    def text(self) -> str:
        """All lines joined, for logs."""
        return " / ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def encode(self) -> bytes:
        """Wire form: `code-line` for all but the last line, `code line` last (an empty last line: the bare code)."""
        lines = self.lines
        if len(lines) == 1:  # nearly every reply
            line = lines[0]
            text = f"{self.code} {line}\r\n" if line else f"{self.code}\r\n"
            return text.encode("utf-8", "surrogateescape")
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{line}".rstrip(" ") if not line else f"{self.code}{sep}{line}")
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


_REPLY_FIRST = frozenset(b"2345")
_REPLY_SEPARATORS = {32: True, 45: False}  # b" ": the last line, b"-": more follow


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """Split one reply line into (code, is_last, text); ValueError if malformed.

    The line is `[2-5]DD` then " " (last) or "-" (more follow) and the
    text. A bare code without text ("250") is accepted as a last line, as
    RFC 5321 4.2 allows. Stray CR, LF or NUL inside the text are removed so
    that relaying the reply can never split it into two.
    """
    raw = line.rstrip(b"\r\n")
    head = raw[:3]
    if len(head) != 3 or not head.isdigit() or head[0] not in _REPLY_FIRST:
        raise ValueError(f"malformed reply line: {raw[:80]!r}")
    if len(raw) == 3:
        return int(head), True, ""
    last = _REPLY_SEPARATORS.get(raw[3])
    if last is None:
        raise ValueError(f"malformed reply line: {raw[:80]!r}")
    text = raw[4:]
    if b"\r" in text or b"\n" in text or b"\x00" in text:
        text = text.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    return int(head), last, text.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- commands


def split_command(line: bytes) -> tuple[str, str]:
    """`b"MAIL FROM:<a@b>\\r\\n"` -> ("MAIL", "FROM:<a@b>"); verb upper-cased.

    The argument keeps its case; bytes that are not UTF-8 are kept through
    surrogateescape so that address validation can refuse them precisely.
    """
    text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    verb, _, arg = text.strip(" ").partition(" ")
    return verb.upper(), arg.strip(" ")


class AddressError(ValueError):
    """A reverse- or forward-path that is not RFC 5321 (or RFC 6531) syntax."""


class ParameterError(ValueError):
    """A MAIL/RCPT parameter that is malformed (not merely unknown)."""


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_ULABEL = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f]){0,61}(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
_DOMAIN_UTF8 = re.compile(rf"{_ULABEL}(?:\.{_ULABEL})*\Z")
_IPV4_LITERAL = re.compile(r"\[(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}\]\Z")
_IPV6_LITERAL = re.compile(r"\[IPv6:[0-9A-Fa-f:.]+\]\Z", re.I)
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def parse_path(arg: str, keyword: str, *, utf8: bool) -> tuple[str, str]:
    """Parse `FROM:<addr> params` / `TO:<addr> params` -> (address, params).

    Accepts one optional space after the colon (common in the wild) and
    strips an RFC 5321 source route. The null path `<>` yields "".
    Raises ValueError when the keyword or brackets are missing (a syntax
    error, 501) and AddressError when the address itself is bad (553).
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword.upper() + ":":
        raise ValueError(f"expected {keyword}:<address>")
    rest = arg[len(keyword) + 1 :]
    if rest.startswith(" "):
        rest = rest[1:]
    if not rest.startswith("<"):
        raise ValueError("address must be enclosed in <>")
    end = _closing_bracket(rest)
    if end < 0:
        raise ValueError("missing closing '>'")
    inner, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise ValueError("expected a space between address and parameters")
    if m := _SOURCE_ROUTE.match(inner):
        inner = inner[m.end() :]
    if keyword.upper() == "TO" and inner.lower() == "postmaster":
        return inner, params.strip(" ")  # RFC 5321 4.5.1: <Postmaster> without domain is valid
    if not inner and keyword.upper() == "TO":
        raise AddressError("empty recipient address")
    if inner:
        validate_mailbox(inner, utf8=utf8)
    return inner, params.strip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted local parts."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def validate_mailbox(address: str, *, utf8: bool) -> None:
    """Raise AddressError unless `address` is `local@domain` per RFC 5321/6531."""
    if any("\udc80" <= c <= "\udcff" for c in address):
        raise AddressError("address is not valid UTF-8")
    if not utf8 and not address.isascii():
        raise AddressError("non-ASCII address needs the SMTPUTF8 parameter")
    if len(address.encode("utf-8")) > MAX_PATH - 2:
        raise AddressError("address too long")
    local, sep, domain = address.rpartition("@")
    if not sep:
        raise AddressError("address must be local-part@domain")
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    dot_string, quoted = (_DOT_STRING_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_STRING, _QUOTED)
    if not (dot_string.match(local) or quoted.match(local)):
        raise AddressError("bad local part")
    validate_domain(domain, utf8=utf8)


def validate_domain(domain: str, *, utf8: bool) -> None:
    """Raise AddressError unless `domain` is a host name or address literal."""
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    if domain.startswith("["):
        if _IPV4_LITERAL.match(domain) or _IPV6_LITERAL.match(domain):
            return
        raise AddressError("bad address literal")
    if not (_DOMAIN_UTF8 if utf8 else _DOMAIN).match(domain):
        raise AddressError("bad domain")


_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


def parse_params(text: str) -> dict[str, str | None]:
    """`SIZE=10 BODY=8BITMIME SMTPUTF8` -> {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}.

    Keywords are upper-cased; a repeated keyword or a malformed one raises
    ParameterError (501). Which keywords are known is the caller's business.
    """
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        m = _PARAM.match(word)
        if not m:
            raise ParameterError(f"malformed parameter {word[:40]!r}")
        key = m.group(1).upper()
        if key in params:
            raise ParameterError(f"parameter {key} given twice")
        params[key] = m.group(2)
    return params


def format_params(params: dict[str, str | None]) -> str:
    """Inverse of parse_params, for the upstream's MAIL command."""
    return " ".join(k if v is None else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------- xtext

_XTEXT_SAFE = frozenset(range(33, 127)) - {ord("+"), ord("=")}


def xtext_encode(value: str) -> str:
    """RFC 3461 xtext: `+XX` for '+', '=', controls, space and every non-ASCII octet.

    This is what keeps a client's HELO from adding XCLIENT attributes: a
    space or '=' can never appear unencoded.
    """
    return "".join(chr(b) if b in _XTEXT_SAFE else f"+{b:02X}" for b in value.encode("utf-8", "surrogateescape"))


def xtext_decode(value: str) -> str:
    """Inverse of xtext_encode (used by tests and the fake upstream)."""
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "+":
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8", "surrogateescape")


def xclient_commands(attributes: list[tuple[str, str]], limit: int = 512) -> list[str]:
    """Pack `NAME=xtext` pairs into XCLIENT commands of at most `limit` octets each.

    Postfix limits a command line; several XCLIENT commands are allowed and
    each is answered with a new greeting.
    """
    commands: list[str] = []
    current = "XCLIENT"
    room = limit - len("XCLIENT ") - 2
    for name, value in attributes:
        item = _fit(name, value, room)
        if len(current) + 1 + len(item) + 2 > limit and current != "XCLIENT":
            commands.append(current)
            current = "XCLIENT"
        current += " " + item
    if current != "XCLIENT":
        commands.append(current)
    return commands


def _fit(name: str, value: str, room: int) -> str:
    """`NAME=xtext` of the longest prefix of the value (whole characters) that fits in `room`.

    Cutting characters before encoding keeps the value valid UTF-8 and never
    splits a `+XX` escape; only as much is cut as the limit demands.
    """
    item = f"{name}={xtext_encode(value)}"
    if len(item) <= room:
        return item
    kept, used = [], len(name) + 1
    for char in value:
        encoded = xtext_encode(char)  # UTF-8 encodes each character on its own
        if used + len(encoded) > room:
            break
        kept.append(encoded)
        used += len(encoded)
    return f"{name}={''.join(kept)}"


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO reply -> {"SIZE": "1000", "STARTTLS": "", "XCLIENT": "NAME ADDR ..."}."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = value.strip()
    return extensions


# ---------------------------------------------------------------- DATA framer

MAX_FRAGMENT = 64 * 1024


class DataFramer:
    """Turns the client's DATA stream into what the upstream may receive.

    Feed it raw chunks in any split. It recognises only `<CRLF>.<CRLF>` as
    the end (this defeats SMTP smuggling), removes the client's dot
    stuffing, normalises line ends, and returns bytes for the upstream in
    which every line ends in CRLF and every line starting with '.' is
    stuffed again, so a lone "." never reaches the upstream from the client.

    Bare LF ends a line of content (never the data); stray CR and NUL are
    dropped. `violation` records that any of them was seen, for the
    `bare_newline = "reject"` policy. Memory stays bounded: a line longer
    than MAX_FRAGMENT is passed on in pieces.
    """

    __slots__ = ("_at_line_start", "_emitted", "_pending", "_prev_crlf", "done", "size", "violation")

    def __init__(self) -> None:
        self._pending = b""
        self._at_line_start = True
        self._prev_crlf = True  # the DATA command's own CRLF precedes the first line
        self._emitted = False  # some content of the current line already went out
        self.done = False
        self.violation = False
        self.size = 0  # message octets after unstuffing, with CRLF line ends

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Consume `chunk`; return (bytes for upstream, bytes after the end).

        Once `done` is set, the second value holds whatever followed the
        terminator (pipelined commands) and the framer takes no more input.
        """
        if self.done:
            return b"", chunk
        buf = self._pending + chunk if self._pending else chunk
        out: list[bytes] = []
        pos = 0
        last = buf.rfind(b"\n")
        fast = True
        while pos <= last:
            # Fast path: the run of ordinary lines up to the next line that
            # starts with '.' passes through unchanged (no per-line work).
            if fast and self._at_line_start and self._prev_crlf and buf[pos : pos + 1] != b".":
                dot = buf.find(b"\n.", pos, last + 1)
                stop = last + 1 if dot < 0 else dot + 1
                block = buf[pos:stop]
                if _is_plain_block(block):
                    out.append(block)
                    self.size += len(block)
                    pos = stop
                    continue
                fast = False  # this chunk has odd line ends: go line by line
            nl = buf.find(b"\n", pos)
            line = buf[pos : nl + 1]
            pos = nl + 1
            if self._line(line, out):
                self.done = True
                self._pending = b""
                return b"".join(out), buf[pos:]
        rest = buf[pos:]
        if len(rest) > MAX_FRAGMENT:
            keep = 1 if rest.endswith(b"\r") else 0
            self._fragment(rest[: len(rest) - keep], out)
            rest = rest[len(rest) - keep :]
        self._pending = rest
        return b"".join(out), b""

    def _line(self, line: bytes, out: list[bytes]) -> bool:
        """Handle one LF-terminated line; True when it is the terminator."""
        crlf = line.endswith(b"\r\n")
        content = line[:-2] if crlf else line[:-1]
        if not crlf:
            self.violation = True
        if self._at_line_start:
            if content == b"." and crlf and self._prev_crlf:
                return True
            if content.startswith(b".") and len(content) > 1:
                content = content[1:]
        self._emit(content, out)
        out.append(CRLF)
        self.size += 2
        self._emitted = False
        self._at_line_start = True
        self._prev_crlf = crlf
        return False

    def _fragment(self, piece: bytes, out: list[bytes]) -> None:
        """Pass on part of an overlong line; the line goes on afterwards."""
        if self._at_line_start and piece.startswith(b".") and len(piece) > 1:
            piece = piece[1:]
        self._emit(piece, out)
        self._at_line_start = False
        self._prev_crlf = False

    def _emit(self, content: bytes, out: list[bytes]) -> None:
        """Clean `content` and stuff it if it is what the upstream will see first on its line.

        Stuffing depends on what was *sent* for the line, not on the raw
        input: a line whose first bytes were dropped (NUL, stray CR) and
        that continues with '.' must still be stuffed.
        """
        if b"\r" in content or b"\x00" in content:
            self.violation = True
            content = content.replace(b"\r", b"").replace(b"\x00", b"")
        if not content:
            return
        self.size += len(content)
        if not self._emitted and content.startswith(b"."):
            out.append(b".")
        self._emitted = True
        out.append(content)


def _is_plain_block(block: bytes) -> bool:
    """Every line CRLF-terminated, no stray CR, no NUL (dots are checked by the caller)."""
    lines = block.count(b"\n")
    return block.count(b"\r\n") == lines and block.count(b"\r") == lines and b"\x00" not in block


def dot_stuff(data: bytes) -> bytes:
    """Stuff and terminate a CRLF message (used by tests and the benchmark)."""
    body = data if data.endswith(CRLF) or not data else data + CRLF
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"

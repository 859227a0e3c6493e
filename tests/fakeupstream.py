"""A scriptable fake upstream SMTP server that records what the proxy sends.

Proxy tests need an upstream that behaves like a conforming, *strict* ESMTP
server, so that every test relaying through it proves that Willi sends only
what the upstream accepts; it can also be told to reject, delay or drop the
connection at any step, and it keeps the exact bytes it received so tests can
assert that Willi relays messages byte for byte.

What is advertised is what is enforced. The EHLO reply lists SIZE (when
`size` is given), STARTTLS (with `tls_context`, until TLS is up), XCLIENT
(with `xclient`) and `extensions` (default: `DEFAULT_EXTENSIONS`, the
extensions a stock Postfix offers that this fake implements; drop one with
e.g. `extensions=without("SMTPUTF8")`). The extension list that governs a
session is parsed from the EHLO reply really sent, so a scripted "ehlo" reply
changes what is accepted as well. After HELO nothing is offered.

Conformance rules (Postfix's wording where Postfix has the rule):
- MAIL needs `FROM:<path>` (501 5.1.7), RCPT `TO:<path>` (501 5.1.3), as
  Postfix with `strict_rfc821_envelopes = yes`.
- MAIL parameters: SIZE=<digits> with SIZE (else 501 5.5.4 Bad message size
  syntax; over the limit 552 5.3.4, a policy answer), BODY=7BIT|8BITMIME with
  8BITMIME, SMTPUTF8 with SMTPUTF8, RET=/ENVID= with DSN, AUTH= with AUTH.
  RCPT parameters: NOTIFY=/ORCPT= with DSN. Anything else, a parameter given
  twice, or a malformed one: 555 5.5.4 Unsupported option: <param>.
- A non-ASCII address in a transaction whose MAIL lacked SMTPUTF8: 553 5.6.7
  (RFC 6531 3.5; Postfix with `strict_smtputf8 = yes`).
- XCLIENT attributes must be among those advertised, xtext-encoded, with
  Postfix's syntax for ADDR, PORT, PROTO and NAME (501 5.5.4). Several
  XCLIENT commands in a row are fine, but as in Postfix the authorization is
  checked against the current client, real or impersonated: `xclient_hosts`
  (default loopback, like the interop Postfix's
  smtpd_authorized_xclient_hosts). Once ADDR named a host outside it,
  XCLIENT is no longer offered and gets 550 5.7.0 (XCLIENT_README: "send
  NAME and ADDR last").
- A command line longer than 2048 octets is 500 5.5.2 (Postfix would
  truncate it, which is no better); a bare CR or a NUL in a command line is
  500 5.5.2 (RFC 5321 2.3.8; Exim refuses NUL, Postfix 3.7 lets both through
  outside addresses); so is a line that is not UTF-8 while SMTPUTF8 is
  configured (Postfix 3.x). A bare LF ends a command, as in Postfix.
- Stricter than a default Postfix where RFC 5321 is on our side and no
  conforming client notices: MAIL needs HELO/EHLO first (Postfix's
  smtpd_helo_required = no lets it pass), XCLIENT and STARTTLS only after
  an EHLO reply that offered them, parameters only after EHLO.
- Any 421 (greeting or reply) closes the connection at once: nothing more is
  read as a command; bytes that still arrive are kept in `after_421`.

Every reply the fake gives because the client broke one of these rules, or
the command sequence (503), or used a command that was not offered (502), is
recorded in `RecordedSession.refused`; scripted replies never replace such a
verdict, since a real server checks syntax before policy.

Hostile upstreams (for the "upstream replies are checked, not trusted" tests):
- `unsolicited={step: text}` sends `text` right after the step's reply, in
  the same write: a second reply to one command, or data after the greeting.
- `data_interjection=(n, text)` sends `text` once `n` octets of message data
  arrived (after 354, before the final dot; bytes are sent as they are, a
  str as reply lines); the dot is answered as usual
  (script it with `replies={"dot": ...}`). `interjected` is set when it went
  out, so a test can make the client finish only afterwards.
- `dribble={step: seconds}` sends the step's reply one byte at a time, with
  `seconds` between bytes (a reply that never completes in time).

Steps, used as keys of `replies`, `delays`, `dribble`, `unsolicited` and `drop_at`: "greeting",
"ehlo", "helo", "starttls", "xclient", "mail", "rcpt", "data", "dot" (the
reply after the message's terminating ".\\r\\n"), "rset", "noop", "quit",
and the lowercase verb of any other command.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

SERVER_NAME = "fake.upstream"
XCLIENT_REPLY = f"220 {SERVER_NAME} ESMTP"
IDLE_TIMEOUT = 30.0  # seconds a connection may sit silent before we hang up
JOIN_TIMEOUT = 5.0  # upper bound for stop() to wait for all threads
LINGER_AFTER_421 = 1.0  # seconds to collect what a client still sends after a 421
CLOSE_NOTIFY_WAIT = 3.0  # seconds a TLS client has after QUIT to send its close_notify
RECV_SIZE = 65536
TERMINATOR = b".\r\n"
CRLF_TERMINATOR = b"\r\n.\r\n"
MAX_COMMAND_OCTETS = 2048  # Postfix's line_length_limit

# What a stock Postfix advertises besides SIZE, STARTTLS and XCLIENT, minus
# what this fake does not implement (VRFY, ETRN, DSN, CHUNKING).
DEFAULT_EXTENSIONS: tuple[str, ...] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")

UNSUPPORTED = "555 5.5.4 Unsupported option: {param}"
UNICODE_UNDECLARED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


def without(*keywords: str, base: Iterable[str] = DEFAULT_EXTENSIONS) -> tuple[str, ...]:
    """`base` minus the extensions named by keyword: `extensions=without("SMTPUTF8")`."""
    drop = {k.upper() for k in keywords}
    return tuple(e for e in base if e.split(" ", 1)[0].upper() not in drop)


def offered_extensions(ehlo_reply: str) -> dict[str, str]:
    """keyword -> parameters of each extension in an EHLO reply as it was sent.

    Parsed from the wire text rather than taken from the constructor so that
    a scripted "ehlo" reply governs what the session accepts, too.
    """
    offered: dict[str, str] = {}
    for line in ehlo_reply.replace("\r\n", "\n").split("\n")[1:]:
        keyword, _, value = line[4:].strip().partition(" ")
        if keyword:
            offered[keyword.upper()] = value.strip()
    return offered


# -- command syntax (pure functions, tested directly) --------------------


def strip_line_end(line: bytes) -> bytes:
    """A command line without its CRLF (or the bare LF Postfix also accepts)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


def line_error(content: bytes, *, utf8: bool) -> str | None:
    """The 500 reply a command line gets for its bytes alone, or None."""
    if len(content) > MAX_COMMAND_OCTETS:
        return "500 5.5.2 Error: line too long"
    if b"\r" in content or b"\0" in content or not content.strip():
        return "500 5.5.2 Error: bad syntax"
    if utf8:
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            return "500 5.5.2 Error: bad UTF-8 syntax"
    return None


def split_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """`FROM:<path> PARAM...` -> (path, params); None unless the path is `<...>`.

    A space after the colon is tolerated as Postfix does; a quoted local part
    may contain '>' and '<'.
    """
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    quoted = False
    i = 1
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "<":
            return None
        elif not quoted and char == ">":
            tail = rest[i + 1 :]
            if tail and not tail.startswith(" "):
                return None
            return rest[1:i], tail.split()
        i += 1
    return None


_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([^\x00-\x20=\x7f]+))?")
_XTEXT = r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})"
_XTEXT_RE = re.compile(f"{_XTEXT}*")


def _is_xtext(value: str | None) -> bool:
    return value is not None and _XTEXT_RE.fullmatch(value) is not None


def _valid_notify(value: str | None) -> bool:
    parts = (value or "").upper().split(",")
    if parts == ["NEVER"]:
        return True
    return len(set(parts)) == len(parts) and set(parts) <= {"SUCCESS", "FAILURE", "DELAY"}


def _valid_orcpt(value: str | None) -> bool:
    kind, semicolon, address = (value or "").partition(";")
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", kind)) and bool(semicolon) and _is_xtext(address)


@dataclass(frozen=True)
class ParamRule:
    """A MAIL/RCPT parameter: the extension that allows it and its value syntax."""

    extension: str
    valid: Callable[[str | None], bool]
    bad: str  # reply for a bad value; "{param}" is the parameter as sent


MAIL_PARAMS: dict[str, ParamRule] = {
    "SIZE": ParamRule("SIZE", lambda v: bool(re.fullmatch(r"[0-9]+", v or "")), "501 5.5.4 Bad message size syntax"),
    "BODY": ParamRule("8BITMIME", lambda v: (v or "").upper() in ("7BIT", "8BITMIME"), UNSUPPORTED),
    "SMTPUTF8": ParamRule("SMTPUTF8", lambda v: v is None, UNSUPPORTED),
    "RET": ParamRule("DSN", lambda v: (v or "").upper() in ("FULL", "HDRS"), "501 5.5.4 Bad RET parameter syntax"),
    "ENVID": ParamRule("DSN", lambda v: _is_xtext(v) and len(v or "") <= 100, "501 5.5.4 Bad ENVID parameter syntax"),
    "AUTH": ParamRule("AUTH", lambda v: v == "<>" or _is_xtext(v), "501 5.5.4 Bad AUTH parameter syntax"),
}
RCPT_PARAMS: dict[str, ParamRule] = {
    "NOTIFY": ParamRule("DSN", _valid_notify, "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    "ORCPT": ParamRule("DSN", _valid_orcpt, "501 5.5.4 Error: Bad ORCPT parameter syntax"),
}


def param_error(params: list[str], offered: Mapping[str, str], rules: Mapping[str, ParamRule]) -> str | None:
    """The refusal for the first parameter that was not offered or is malformed, or None.

    A parameter counts only when the EHLO reply offered its extension; one
    given twice is refused like an unknown one.
    """
    seen: set[str] = set()
    for param in params:
        match = _PARAM.fullmatch(param)
        key = match.group(1).upper() if match else ""
        rule = rules.get(key)
        if match is None or rule is None or rule.extension not in offered or key in seen:
            return UNSUPPORTED.format(param=param)
        seen.add(key)
        if not rule.valid(match.group(2)):
            return rule.bad.format(param=param)
    return None


def _param_value(params: list[str], key: str) -> str | None:
    for param in params:
        name, _, value = param.partition("=")
        if name.upper() == key:
            return value
    return None


def xtext_decode(value: str) -> str | None:
    """RFC 3461 xtext -> text (lowercase hex accepted, as Postfix does); None if malformed."""
    if not _is_xtext(value):
        return None
    raw = re.sub(rb"\+([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode("ascii"))
    return raw.decode("utf-8", "surrogateescape")


_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _valid_xclient_addr(value: str) -> bool:
    try:
        if value[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(value[5:])
        else:
            ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _valid_hostname(value: str) -> bool:
    """Postfix's valid_hostname(): dot-separated labels, not all digits."""
    labels = value.split(".")
    return (
        len(value) <= 255
        and all(_LABEL.fullmatch(label) for label in labels)
        and not value.replace(".", "").isdigit()
    )


XCLIENT_VALUES: dict[str, Callable[[str], bool]] = {
    "ADDR": _valid_xclient_addr,
    "DESTADDR": _valid_xclient_addr,
    "PORT": lambda v: v.isascii() and v.isdigit(),
    "DESTPORT": lambda v: v.isascii() and v.isdigit(),
    "PROTO": lambda v: v.upper() in ("SMTP", "ESMTP"),
    "NAME": _valid_hostname,
    "REVERSE_NAME": _valid_hostname,
}


DEFAULT_XCLIENT_HOSTS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


def xclient_authorized(address: str, hosts: Iterable[str]) -> bool:
    """Whether `address` (an XCLIENT ADDR value or a peer address) is in `hosts`.

    [UNAVAILABLE] and anything else that is not an address never is.
    """
    if address[:5].upper() == "IPV6:":
        address = address[5:]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net) for net in hosts)


def xclient_addr(arg: str) -> str | None:
    """The decoded ADDR of a valid XCLIENT argument (the last one wins), if any."""
    addr = None
    for item in arg.split():
        name, _, raw = item.partition("=")
        if name.upper() == "ADDR":
            addr = xtext_decode(raw)
    return addr


def xclient_error(arg: str, offered: str) -> str | None:
    """Postfix's 501 for an XCLIENT argument, judged against the advertised attributes."""
    allowed = {name.upper() for name in offered.split()}
    items = arg.split()
    if not items:
        return "501 5.5.4 Syntax: XCLIENT attribute=value..."
    for item in items:
        name, equals, raw = item.partition("=")
        if not equals:
            return "501 5.5.4 Error: attribute=value expected"
        if name.upper() not in allowed:
            return f"501 5.5.4 Bad XCLIENT attribute name: {name}"
        value = xtext_decode(raw)
        check = XCLIENT_VALUES.get(name.upper())
        if value is None or (value not in _UNAVAILABLE and check is not None and not check(value)):
            return f"501 5.5.4 Bad {name.upper()} syntax: {raw}"
    return None


# -- recording -------------------------------------------------------------


@dataclass
class Transaction:
    """One MAIL transaction that got a 2xx reply to MAIL."""

    mail_from: str
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""
    completed: bool = False
    reply: str = ""  # what was sent after the terminator ("" if nothing)


@dataclass
class RecordedSession:
    """Everything one client connection sent, for assertions."""

    raw: bytearray = field(default_factory=bytearray)
    commands: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    tls: bool = False
    closed: bool = False
    peer: tuple[str, int] | None = None
    # Command lines the fake refused as non-conforming (see the module doc);
    # a conforming client that reads the EHLO reply causes none.
    refused: list[str] = field(default_factory=list)
    # Bytes that arrived after the fake's 421 (never read as commands).
    after_421: bytearray = field(default_factory=bytearray)
    # What each recv() returned, in order (`raw` split at the segments read): shows which commands
    # a client sent together in one write (PIPELINING) and which one at a time.
    chunks: list[bytes] = field(default_factory=list)
    # After QUIT over TLS: did the client end TLS with close_notify (True), or just close (False)?
    tls_close_notify: bool | None = None


class _Hangup(Exception):
    """Raised inside a handler to end the connection (drop_at, QUIT, EOF)."""


class _Closed421(Exception):
    """Raised after a 421 went out: the channel closes (RFC 5321 3.8)."""


class _Reader:
    """Buffered reading from a socket that records every received byte.

    Own buffering (instead of `makefile`) so that pipelined input is handled
    and so that plaintext read ahead of STARTTLS can be thrown away.
    """

    def __init__(self, sock: socket.socket, record: Callable[[bytes], None]) -> None:
        self.sock = sock
        self._record = record
        self._buf = bytearray()

    def _fill(self) -> bool:
        """Read one chunk; False on EOF.

        A reset or timeout counts as EOF so that partial message data read
        so far is still recorded by `read_data`.
        """
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except OSError:
            return False
        if not chunk:
            return False
        self._record(chunk)
        self._buf += chunk
        return True

    def discard(self) -> None:
        """Drop buffered input (bytes pipelined after STARTTLS must be ignored)."""
        self._buf.clear()

    def readline(self) -> bytes | None:
        """One line including its LF, or None on EOF."""
        start = 0
        while True:
            idx = self._buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self._buf[: idx + 1])
                del self._buf[: idx + 1]
                return line
            start = len(self._buf)
            if not self._fill():
                return None

    def wait_for_data(self, count: int) -> None:
        """Buffer at least `count` octets, or up to the end of the message data, or EOF."""
        while len(self._buf) < count and CRLF_TERMINATOR not in self._buf and not self._buf.startswith(TERMINATOR):
            if not self._fill():
                return

    def read_data(self) -> tuple[bytes, bool]:
        """Message bytes up to CRLF "." CRLF, verbatim; (partial, False) on EOF."""
        while len(self._buf) < len(TERMINATOR) and TERMINATOR.startswith(self._buf):
            if not self._fill():
                return self._take(len(self._buf), 0), False
        if self._buf.startswith(TERMINATOR):
            return self._take(0, len(TERMINATOR)), True
        start = 0
        while True:
            idx = self._buf.find(CRLF_TERMINATOR, start)
            if idx >= 0:
                # Keep the CRLF that ends the last line; drop only ".\r\n".
                return self._take(idx + 2, len(TERMINATOR)), True
            start = max(0, len(self._buf) - len(CRLF_TERMINATOR) + 1)
            if not self._fill():
                return self._take(len(self._buf), 0), False

    def _take(self, n: int, skip: int) -> bytes:
        """Remove and return the first n bytes, then drop `skip` more."""
        data = bytes(self._buf[:n])
        del self._buf[: n + skip]
        return data


def _format(text: str) -> bytes:
    """Reply text (lines separated by CRLF or LF) as wire bytes."""
    lines = text.replace("\r\n", "\n").split("\n")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def _is_2xx(text: str) -> bool:
    return text.startswith("2")


class FakeUpstream:
    """Fake ESMTP upstream on a loopback port, one thread per connection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        tls_context: ssl.SSLContext | None = None,
        xclient: str | None = None,
        xclient_hosts: Iterable[str] = DEFAULT_XCLIENT_HOSTS,
        size: int | None = None,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        greeting: str = "220 fake.upstream ESMTP",
        replies: dict[str, str] | None = None,
        rcpt_replies: dict[str, str] | None = None,
        drop_at: str | None = None,
        delays: dict[str, float] | None = None,
        ehlo_supported: bool = True,
        unsolicited: dict[str, str] | None = None,
        data_interjection: tuple[int, str | bytes] | None = None,
        dribble: dict[str, float] | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.tls_context = tls_context
        if tls_context is not None:
            # Some Pythons (Debian's) set OP_IGNORE_UNEXPECTED_EOF by default, which would record a
            # ragged TCP close as a clean close_notify; the fake must tell them apart.
            tls_context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        self.xclient = xclient
        self.xclient_hosts = tuple(xclient_hosts)
        self.size = size
        self.extensions = tuple(extensions)
        self.greeting = greeting
        self.replies = dict(replies or {})
        self.rcpt_replies = {
            k.lower().strip("<>"): v for k, v in (rcpt_replies or {}).items()
        }
        self.drop_at = drop_at
        self.delays = dict(delays or {})
        self.ehlo_supported = ehlo_supported
        self.unsolicited = dict(unsolicited or {})
        self.data_interjection = data_interjection
        self.dribble = dict(dribble or {})
        #: Set once a `data_interjection` went out.
        self.interjected = threading.Event()
        self.sessions: list[RecordedSession] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._live: dict[int, _Conversation] = {}  # id(session) -> its conversation, while it runs
        self._queue_ids = itertools.count(1)

    # -- lifecycle -----------------------------------------------------

    def start(self) -> Self:
        """Bind to port 0 on `host` and start accepting; returns self."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, 0), family=family, backlog=64)
        # A short timeout lets the accept loop notice stop() without relying
        # on close() waking a blocked accept(), which Linux does not promise.
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fakeupstream-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join all threads."""
        self._stopping.set()
        if self._listener is not None:
            _shutdown(self._listener)  # wakes accept() at once on Linux
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        deadline = time.monotonic() + JOIN_TIMEOUT
        threads = [self._accept_thread] if self._accept_thread else []
        with self._lock:
            threads += self._threads
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` until it is true or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    @property
    def all_transactions(self) -> list[Transaction]:
        """Every transaction of every session, in session order."""
        with self._lock:
            return [t for s in self.sessions for t in s.transactions]

    @property
    def completed_transactions(self) -> list[Transaction]:
        """Transactions whose terminating ".\\r\\n" arrived."""
        return [t for t in self.all_transactions if t.completed]

    @property
    def smtputf8_enabled(self) -> bool:
        """Whether SMTPUTF8 is configured: then, as in Postfix, every command must be UTF-8."""
        return "SMTPUTF8" in {e.split(" ", 1)[0].upper() for e in self.extensions}

    @property
    def refused_commands(self) -> list[str]:
        """Every command line refused as non-conforming, in session order.

        `assert upstream.refused_commands == []` proves the client sent only
        what this upstream advertised and accepts.
        """
        with self._lock:
            return [line for s in self.sessions for line in s.refused]

    # -- server --------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            conn.settimeout(IDLE_TIMEOUT)
            session = RecordedSession(peer=(peer[0], peer[1]))
            thread = threading.Thread(
                target=self._handle, args=(conn, session), daemon=True
            )
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self.sessions.append(session)
                self._conns.add(conn)
                self._threads.append(thread)
            thread.start()

    def disconnect(self, session: RecordedSession, reply: str | None = None) -> None:
        """End an idle session from outside its conversation, as a server's own idle timeout does.

        `reply` (e.g. "421 4.4.2 fake.upstream Error: timeout exceeded") is
        sent first, unasked, as Postfix does; then the connection is shut
        down and the session ends. Meant for a session waiting for a
        command (plaintext: TLS sessions are only shut down).
        """
        with self._lock:
            conv = self._live.get(id(session))
        if conv is None:
            return
        if reply is not None and not session.tls:
            try:
                conv.sock.sendall(_format(reply))
            except OSError:
                pass
        _shutdown(conv.sock)

    def _handle(self, conn: socket.socket, session: RecordedSession) -> None:
        """Serve one connection; any socket error just ends it."""
        conv = _Conversation(self, conn, session)
        with self._lock:
            self._live[id(session)] = conv
        try:
            conv.run()
        except _Closed421:
            conv.linger()
        except (_Hangup, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conv.sock)
                self._conns.discard(conn)
                self._live.pop(id(session), None)
                session.closed = True
            _shutdown(conv.sock)
            conv.sock.close()

    def _replace_conn(self, old: socket.socket, new: socket.socket) -> None:
        with self._lock:
            self._conns.discard(old)
            self._conns.add(new)

    def _next_queue_id(self) -> str:
        with self._lock:
            return f"FAKE{next(self._queue_ids)}"


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut the fd down so a thread blocked in recv() wakes up.

    Calls the plain socket method even for SSLSocket, whose own shutdown()
    would tear down TLS state under the feet of the reading thread.
    """
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _close_after(text: str) -> None:
    """A 421 means the server closes the channel (RFC 5321 3.8): stop reading commands."""
    if text.startswith("421"):
        raise _Closed421


class _Conversation:
    """The SMTP state machine for one connection."""

    def __init__(
        self, server: FakeUpstream, sock: socket.socket, session: RecordedSession
    ) -> None:
        self.server = server
        self.sock = sock
        self.session = session
        self.reader = _Reader(sock, self._record)
        self.greeted = False
        self.offered: dict[str, str] = {}  # what the last EHLO reply listed; {} after HELO
        # XCLIENT survives its own restart (Postfix allows several in a row);
        # None once an EHLO without it or a HELO was answered.
        self.xclient_offered: str | None = None
        peer = session.peer[0] if session.peer else ""
        self.xclient_authorized = xclient_authorized(peer, server.xclient_hosts)
        self.txn: Transaction | None = None
        self.smtputf8 = False  # the current transaction's MAIL declared SMTPUTF8

    def _record(self, chunk: bytes) -> None:
        with self.server._lock:
            self.session.raw += chunk
            self.session.chunks.append(chunk)

    def _step(self, step: str, default: str) -> None:
        """Apply delay/drop for `step`, then send its (maybe scripted) reply."""
        self._reply(step, self.server.replies.get(step, default))

    def _refuse(self, step: str, line: str, text: str) -> None:
        """Answer a non-conforming command; never scripted, always recorded."""
        with self.server._lock:
            self.session.refused.append(line)
        self._reply(step, text)

    def _reply(self, step: str, text: str) -> None:
        self._send(step, text)
        _close_after(text)

    def _send(self, step: str, text: str) -> None:
        """Apply delay/drop for `step`, then send `text` (and any unsolicited extra) as it is."""
        server = self.server
        delay = server.delays.get(step)
        if delay:
            server._stopping.wait(delay)
        if server.drop_at == step or server._stopping.is_set():
            raise _Hangup
        data = _format(text)
        extra = server.unsolicited.get(step)
        if extra is not None:
            data += _format(extra)
        pause = server.dribble.get(step)
        if not pause:
            self.sock.sendall(data)
            return
        for i in range(len(data)):
            if i and server._stopping.wait(pause):
                raise _Hangup
            self.sock.sendall(data[i : i + 1])

    def _reply_for(self, step: str, default: str) -> str:
        return self.server.replies.get(step, default)

    def linger(self) -> None:
        """After a 421: send FIN at once, then only collect what still arrives.

        The half-close gives the client a clean EOF right after the 421 line
        (closing with unread input would send a RST instead); whatever it
        sends afterwards is kept in `after_421`, never answered.
        """
        _shutdown(self.sock, socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_AFTER_421
        while not self.server._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(RECV_SIZE)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            with self.server._lock:
                self.session.after_421 += chunk

    def run(self) -> None:
        self._step("greeting", self.server.greeting)
        while True:
            line = self.reader.readline()
            if line is None:
                raise _Hangup
            content = strip_line_end(line)
            text = content.decode("utf-8", "surrogateescape")
            with self.server._lock:
                self.session.commands.append(text)
            verb, _, arg = text.partition(" ")
            step = verb.lower() if verb.isascii() and verb.isalpha() else ""
            problem = line_error(content, utf8=self.server.smtputf8_enabled)
            if problem is not None:
                self._refuse(step, text, problem)
                continue
            handler = getattr(self, f"_cmd_{step}", None) if step else None
            if handler is not None:
                handler(text, arg.strip())
                continue
            scripted = self.server.replies.get(step) if step else None
            if scripted is not None:
                self._reply(step, scripted)
            else:
                self._refuse(step, text, "502 5.5.2 Error: command not recognized")

    def _reset(self) -> None:
        self.txn = None
        self.smtputf8 = False

    def _restart(self) -> None:
        """After STARTTLS or XCLIENT the client must say EHLO again."""
        self.greeted = False
        self.offered = {}
        self._reset()

    def _size_limit(self) -> int | None:
        """The advertised SIZE value, else the configured `size`."""
        value = self.offered.get("SIZE")
        if value is not None:
            return int(value) if value.isdigit() else None
        return self.server.size

    def _ehlo_lines(self) -> list[str]:
        lines = [SERVER_NAME]
        if self.server.size is not None:
            lines.append(f"SIZE {self.server.size}")
        if self.server.tls_context is not None and not self.session.tls:
            lines.append("STARTTLS")
        if self.server.xclient is not None and self.xclient_authorized:
            lines.append(f"XCLIENT {self.server.xclient}".rstrip())
        lines.extend(self.server.extensions)
        return lines

    # -- commands ------------------------------------------------------

    def _cmd_ehlo(self, line: str, arg: str) -> None:
        if not self.server.ehlo_supported:
            self._step("ehlo", "502 5.5.2 Error: command not recognized")
            return
        if not arg:
            self._refuse("ehlo", line, "501 5.5.4 Syntax: EHLO hostname")
            return
        lines = self._ehlo_lines()
        default = "\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{item}"
            for i, item in enumerate(lines)
        )
        text = self._reply_for("ehlo", default)
        if _is_2xx(text):
            self.greeted = True
            self.offered = offered_extensions(text)
            self.xclient_offered = self.offered.get("XCLIENT")
            self._reset()
        self._reply("ehlo", text)

    def _cmd_helo(self, line: str, arg: str) -> None:
        if not arg:
            self._refuse("helo", line, "501 5.5.4 Syntax: HELO hostname")
            return
        text = self._reply_for("helo", f"250 {SERVER_NAME}")
        if _is_2xx(text):
            self.greeted = True
            self.offered = {}  # a HELO client gets no extensions
            self.xclient_offered = None
            self._reset()
        self._reply("helo", text)

    def _cmd_starttls(self, line: str, arg: str) -> None:
        ctx = self.server.tls_context
        if ctx is None or self.session.tls or "STARTTLS" not in self.offered:
            self._refuse("starttls", line, "502 5.5.1 Error: command not implemented")
            return
        if arg:
            self._refuse("starttls", line, "501 5.5.4 Syntax: STARTTLS")
            return
        if self.txn is not None:
            self._refuse("starttls", line, "503 5.5.1 Error: MAIL transaction in progress")
            return
        text = self._reply_for("starttls", "220 2.0.0 Ready to start TLS")
        self._reply("starttls", text)
        if not text.startswith("220"):
            return
        self.reader.discard()
        old = self.sock
        # Register the TLS socket before the handshake so stop() can
        # interrupt a client that never completes it.
        tls_sock = ctx.wrap_socket(
            old, server_side=True, do_handshake_on_connect=False
        )
        self.sock = tls_sock
        self.reader.sock = tls_sock
        self.server._replace_conn(old, tls_sock)
        tls_sock.do_handshake()
        with self.server._lock:
            self.session.tls = True
        self._restart()

    def _cmd_xclient(self, line: str, arg: str) -> None:
        if self.server.xclient is not None and not self.xclient_authorized:
            self._refuse("xclient", line, "550 5.7.0 Error: insufficient authorization")
            return
        offered = self.xclient_offered
        if offered is None:
            self._refuse("xclient", line, "502 5.5.2 Error: command not recognized")
            return
        if self.txn is not None:
            self._refuse("xclient", line, "503 5.5.1 Error: MAIL transaction in progress")
            return
        problem = xclient_error(arg, offered)
        if problem is not None:
            self._refuse("xclient", line, problem)
            return
        text = self._reply_for("xclient", XCLIENT_REPLY)
        if text.startswith("220"):
            self._restart()
            addr = xclient_addr(arg)
            if addr is not None:
                self.xclient_authorized = xclient_authorized(addr, self.server.xclient_hosts)
        self._reply("xclient", text)

    def _cmd_mail(self, line: str, arg: str) -> None:
        if not self.greeted:
            self._refuse("mail", line, "503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.txn is not None:
            self._refuse("mail", line, "503 5.5.1 Error: nested MAIL command")
            return
        parsed = split_path(arg, "FROM:")
        if parsed is None:
            self._refuse("mail", line, "501 5.1.7 Bad sender address syntax")
            return
        path, params = parsed
        problem = param_error(params, self.offered, MAIL_PARAMS)
        smtputf8 = any(p.upper() == "SMTPUTF8" for p in params)
        if problem is None and not path.isascii() and not smtputf8:
            problem = UNICODE_UNDECLARED
        if problem is not None:
            self._refuse("mail", line, problem)
            return
        declared = _param_value(params, "SIZE")
        limit = self._size_limit()
        if limit and declared is not None and int(declared) > limit:
            self._step("mail", "552 5.3.4 Message size exceeds fixed limit")
            return
        text = self._reply_for("mail", "250 2.1.0 Ok")
        if _is_2xx(text):
            txn = Transaction(mail_from=line)
            with self.server._lock:
                self.session.transactions.append(txn)
            self.txn = txn
            self.smtputf8 = smtputf8
        self._reply("mail", text)

    def _cmd_rcpt(self, line: str, arg: str) -> None:
        txn = self.txn
        if txn is None:
            self._refuse("rcpt", line, "503 5.5.1 Error: need MAIL command")
            return
        parsed = split_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            self._refuse("rcpt", line, "501 5.1.3 Bad recipient address syntax")
            return
        path, params = parsed
        problem = param_error(params, self.offered, RCPT_PARAMS)
        if problem is None and not path.isascii() and not self.smtputf8:
            problem = UNICODE_UNDECLARED
        if problem is not None:
            self._refuse("rcpt", line, problem)
            return
        text = self.server.rcpt_replies.get(path.lower())
        if text is None:
            text = self._reply_for("rcpt", "250 2.1.5 Ok")
        if _is_2xx(text):
            with self.server._lock:
                txn.rcpts.append(line)
        self._reply("rcpt", text)

    def _cmd_data(self, line: str, arg: str) -> None:
        txn = self.txn
        if txn is None:
            self._refuse("data", line, "503 5.5.1 Error: need MAIL command")
            return
        if not txn.rcpts:
            self._step("data", "554 5.5.1 Error: no valid recipients")
            return
        text = self._reply_for("data", "354 End data with <CR><LF>.<CR><LF>")
        self._reply("data", text)
        if not text.startswith("3"):
            return
        interjection = self.server.data_interjection
        if interjection is not None:
            count, extra = interjection
            self.reader.wait_for_data(count)
            self.sock.sendall(extra if isinstance(extra, bytes) else _format(extra))
            self.server.interjected.set()
        data, completed = self.reader.read_data()
        with self.server._lock:
            txn.data = data
            txn.completed = completed
        self._reset()
        if not completed:
            raise _Hangup
        limit = self._size_limit()
        if limit and len(data) > limit:
            default = "552 5.3.4 Message size exceeds fixed limit"
        else:
            default = f"250 2.0.0 Ok: queued as {self.server._next_queue_id()}"
        text = self._reply_for("dot", default)
        self._send("dot", text)
        with self.server._lock:
            txn.reply = text
        _close_after(text)

    def _cmd_rset(self, line: str, arg: str) -> None:
        self._reset()
        self._step("rset", "250 2.0.0 Ok")

    def _cmd_noop(self, line: str, arg: str) -> None:
        self._step("noop", "250 2.0.0 Ok")

    def _cmd_quit(self, line: str, arg: str) -> None:
        self._step("quit", "221 2.0.0 Bye")
        if self.session.tls:
            self._await_close_notify()
        raise _Hangup

    def _await_close_notify(self) -> None:
        """A polite TLS client answers our close_notify with its own: record whether it did."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.settimeout(CLOSE_NOTIFY_WAIT)
            self.sock.unwrap()
            clean = True
        except (OSError, ValueError):  # ssl.SSLError (e.g. EOF in violation of protocol) is an OSError
            clean = False
        with self.server._lock:
            self.session.tls_close_notify = clean

"""The upstream side of a transaction: an smtplib-style client used from the session's thread.

Small primitives as in CPython's smtplib (`command`, `read_reply`), on a
`Channel` so that replies are kept verbatim (every line of a multi-line
reply), each reply has a deadline for the whole reply, and DATA is
streamed. Every failure becomes an UpstreamError carrying the reply the
client must hear (design.md: 451 4.4.1 unreachable, 451 4.7.5 TLS, 451
4.4.2 closed, 451 4.5.0 protocol error); a reply the upstream really sent is
relayed as it is.

Upstream replies are checked, not trusted: a line must parse, every line of
a reply carries the same code, a reply has a bounded size, and the upstream
must be silent when it has nothing to answer. Anything it sends unasked
(after a reply, during the message data) is a protocol error: the
connection is dropped and can never deliver a verdict the client hears.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from willi.dns import TEMPUNAVAIL
from willi.netio import Channel, ChannelError, Closed, LineTooLong, TimedOut, set_kernel_timeouts
from willi.protocol import Reply, format_params, parse_ehlo, parse_reply_line, xclient_commands
from willi.route import Hop

log = logging.getLogger("willi.upstream")

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 65536
#: NAME and ADDR last: when the attributes need several XCLIENT commands, Postfix re-checks its
#: authorization against the client ADDR/NAME name, so after them it refuses every further XCLIENT.
XCLIENT_ATTRIBUTES = ("PORT", "PROTO", "HELO", "DESTADDR", "DESTPORT", "NAME", "ADDR")
QUIT_WAIT = 2.0


class UpstreamError(Exception):
    """The upstream could not be used; `reply` is what the client is told.

    `stage` names the step that failed (connect, greeting, ehlo, starttls,
    xclient, command, data, reply), for logs, metrics and failover.
    """

    def __init__(self, reply: Reply, reason: str, stage: str = "command") -> None:
        self.reply, self.reason, self.stage = reply, reason, stage
        super().__init__(reason)


class UpstreamRefused(UpstreamError):
    """The upstream itself answered with a failure during setup (greeting, EHLO, XCLIENT)."""


def unreachable(reason: str, stage: str = "connect") -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.4.1 Upstream server unreachable, try again later"), reason, stage)


def closed(reason: str, stage: str = "command") -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.4.2 Upstream connection lost, try again later"), reason, stage)


def tls_failed(reason: str) -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.7.5 TLS with the upstream server failed, try again later"), reason,
                         "starttls")


def protocol_error(reason: str, stage: str = "reply") -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.5.0 Upstream protocol error, try again later"), reason, stage)


@dataclass(frozen=True)
class Timeouts:
    """How long each kind of upstream step may take, whole (design.md: shorter than the client's patience)."""

    connect: float = 15.0  # TCP connect and the greeting
    command: float = 30.0
    data: float = 300.0  # the reply to the final dot


@dataclass(frozen=True)
class TlsPolicy:
    """STARTTLS towards one upstream: `none`, `may` (when offered) or `required`, and verification."""

    mode: str
    verify: bool
    context: ssl.SSLContext | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ClientIdentity:
    """What XCLIENT tells the upstream about the real client."""

    addr: str
    port: int
    helo: str
    esmtp: bool
    tls: bool
    dest_addr: str = ""
    dest_port: int = 0
    #: The verified reverse name; looked up only when the upstream asks for NAME.
    name: Callable[[], str] = field(default=lambda: TEMPUNAVAIL, compare=False)

    @property
    def ehlo_name(self) -> str:
        """The name for the EHLO after XCLIENT: Postfix records *that* name, not HELO=.

        It must be one token of printable ASCII; anything else becomes '?',
        as Postfix itself neuters XCLIENT values.
        """
        name = "".join(c if "!" <= c <= "~" else "?" for c in self.helo)
        return name or "[UNAVAILABLE]"

    def attributes(self, offered: set[str]) -> list[tuple[str, str]]:
        """The XCLIENT attributes the upstream listed, in a fixed order."""
        def v6(addr: str) -> str:
            return f"IPV6:{addr}" if ":" in addr else addr

        values: dict[str, Callable[[], str]] = {
            "NAME": self.name,
            "ADDR": lambda: v6(self.addr),
            "PORT": lambda: str(self.port),
            "PROTO": lambda: "ESMTP" if self.esmtp else "SMTP",
            "HELO": lambda: self.helo or "[UNAVAILABLE]",
            "DESTADDR": lambda: v6(self.dest_addr) if self.dest_addr else "",
            "DESTPORT": lambda: str(self.dest_port) if self.dest_port else "",
        }
        result = []
        for key in XCLIENT_ATTRIBUTES:
            if key in offered:
                value = values[key]()
                if value:
                    result.append((key, value))
        return result


class UpstreamConnection:
    """One SMTP connection to one upstream address, set up and ready for MAIL."""

    def __init__(self, hop: Hop, *, local_name: str, timeouts: Timeouts, session_id: str = "") -> None:
        self.hop = hop
        self.local_name = local_name
        self.timeouts = timeouts
        self.sid = session_id
        self.channel: Channel | None = None
        self.address = ""  # the IP address connected to
        self.extensions: dict[str, str] = {}
        self.tls_info = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384 verified"
        self.xclient = False
        self.in_transaction = False
        self.transactions = 0  # completed MAIL..dot exchanges on this connection
        self.faulted = False  # an error, a timeout or a 421: never reuse
        self.idle_since = 0.0
        #: While set, no step may end later than this (the recipient_timeout of the RCPT in hand).
        self.cap: float | None = None
        self.debug = log.isEnabledFor(logging.DEBUG)

    @property
    def endpoint(self) -> str:
        return self.hop.endpoint

    # ---------------------------------------------------------- primitives

    def _deadline(self, timeout: float | None) -> float:
        """The end of a step: its own timeout, but never past `cap` (the deadline of the RCPT being answered)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeouts.command)
        return deadline if self.cap is None or deadline < self.cap else self.cap

    def send(self, data: bytes | memoryview, timeout: float | None = None) -> None:
        if self.channel is None:
            raise closed("upstream connection not open")
        try:
            self.channel.send(data, self._deadline(timeout))
        except TimedOut:
            self.close(polite=False)
            raise closed(f"timeout sending to {self.endpoint}") from None
        except ChannelError as exc:
            self.close(polite=False)
            raise closed(f"sending to {self.endpoint}: {exc}") from None

    def read_reply(self, timeout: float | None = None, stage: str = "reply") -> Reply:
        """Read one whole (possibly multi-line) reply within the deadline; closes the connection on any fault."""
        if self.channel is None:
            raise closed("upstream connection not open", stage)
        deadline = self._deadline(timeout)
        lines: list[str] = []
        code = 0
        size = 0
        try:
            while True:
                raw = self.channel.readline(MAX_REPLY_LINE, deadline)
                size += len(raw)
                line_code, last, text = parse_reply_line(raw)
                if lines and line_code != code:
                    raise ValueError(f"reply lines with different codes ({code}, {line_code})")
                code = line_code
                lines.append(text)
                if last:
                    break
                if len(lines) >= MAX_REPLY_LINES or size > MAX_REPLY_BYTES:
                    raise ValueError(f"reply longer than {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} octets")
        except TimedOut:
            self.close(polite=False)
            raise closed(f"timeout waiting for {self.endpoint}", stage) from None
        except LineTooLong:
            self.close(polite=False)
            raise protocol_error(f"reply line from {self.endpoint} longer than {MAX_REPLY_LINE} octets",
                                 stage) from None
        except Closed as exc:
            self.close(polite=False)
            raise closed(f"{self.endpoint}: {exc}", stage) from None
        except ValueError as exc:
            self.close(polite=False)
            raise protocol_error(f"{self.endpoint}: {exc}", stage) from None
        reply = Reply(code, tuple(lines))
        if self.debug:
            log.debug("sid=%s upstream=%s S: %s", self.sid, self.endpoint, reply)
        if code == 421:
            self.close(polite=False)  # RFC 5321 3.8: the server is closing the channel, whatever the command
        return reply

    def expect_silence(self, stage: str = "reply") -> None:
        """Nothing may follow a reply we did not ask for: unsolicited data is a protocol error."""
        if self.channel is not None and self.channel.buffer:
            extra = bytes(self.channel.buffer[:60])
            self.close(polite=False)
            raise protocol_error(f"{self.endpoint} sent data nobody asked for: {extra!r}", stage)

    def command(self, line: str, timeout: float | None = None, stage: str = "command") -> Reply:
        """Send one command line and return the upstream's reply (which must be all it sends)."""
        if self.debug:
            log.debug("sid=%s upstream=%s C: %s", self.sid, self.endpoint, line)
        self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        reply = self.read_reply(timeout, stage)
        if self.channel is not None:
            self.expect_silence(stage)
        return reply

    def pipeline(self, lines: Sequence[str], stage: str = "command") -> list[Reply]:
        """Send several commands in one write (RFC 2920) and read their replies in order.

        Stops early when the connection closes (a 421): fewer replies than
        commands then come back.
        """
        if self.debug:
            for line in lines:
                log.debug("sid=%s upstream=%s C: %s", self.sid, self.endpoint, line)
        self.send(b"".join(line.encode("utf-8", "surrogateescape") + b"\r\n" for line in lines))
        replies = []
        for _ in lines:
            replies.append(self.read_reply(stage=stage))
            if self.channel is None:
                return replies
        self.expect_silence(stage)
        return replies

    # ---------------------------------------------------------- setup

    def connect(self, family: int, sockaddr: tuple, deadline: float) -> None:
        """TCP connect to one address of the hop, within `deadline`.

        A blocking connect bounded by SO_SNDTIMEO (Linux applies it to
        connect): one system call, where a Python socket timeout would add a
        poll(), a getsockopt() and two fcntl()s to every new connection.
        """
        self.address = sockaddr[0]
        remaining = deadline - time.monotonic()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if remaining <= 0:
                raise TimeoutError("no time left")
            set_kernel_timeouts(sock, remaining, remaining)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            timed_out = isinstance(exc, (TimeoutError, BlockingIOError)) or exc.errno == errno.EINPROGRESS
            what = "timed out" if timed_out else (exc.strerror or str(exc))
            raise unreachable(f"connecting to {self.endpoint} ({sockaddr[0]}): {what}") from None
        self.channel = Channel(sock, remaining, remaining)

    def setup(self, family: int, sockaddr: tuple, tls: TlsPolicy, identity: ClientIdentity | None,
              xclient_mode: str) -> None:
        """Connect, greeting, EHLO, STARTTLS (policy), XCLIENT (policy), EHLO again.

        Raises UpstreamError naming the stage; nothing of a transaction has
        reached the client at any of these points, so the caller may try the
        next upstream.
        """
        deadline = self._deadline(self.timeouts.connect)  # one budget for the connect and the greeting
        self.connect(family, sockaddr, deadline)
        greeting = self.read_reply(deadline - time.monotonic(), stage="greeting")
        self.expect_silence("greeting")
        if greeting.code != 220:
            self.close(polite=False)
            raise UpstreamRefused(greeting, f"{self.endpoint} greeted with {greeting}", "greeting")
        self.hello(self.local_name)
        if tls.mode != "none":
            if "STARTTLS" in self.extensions and tls.context is not None:
                self.starttls(tls)
            elif tls.mode == "required":
                self.close()
                raise UpstreamRefused(
                    Reply.of(451, "4.7.5 Upstream server does not offer STARTTLS, try again later"),
                    f"{self.endpoint} does not offer STARTTLS, which its route requires", "starttls")
        if xclient_mode == "off" or identity is None:
            return
        if "XCLIENT" not in self.extensions:
            if xclient_mode == "required":
                self.close()
                raise UpstreamRefused(
                    Reply.of(451, "4.7.0 Upstream server does not accept XCLIENT, try again later"),
                    f"{self.endpoint} does not offer XCLIENT, which xclient = \"required\" demands", "xclient")
            return
        self.send_xclient(identity)

    def hello(self, name: str) -> None:
        reply = self.command(f"EHLO {name}", stage="ehlo")
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return
        if reply.code // 100 == 4 or self.channel is None:
            self.close(polite=False)
            raise UpstreamRefused(reply, f"{self.endpoint} refused EHLO: {reply}", "ehlo")
        reply = self.command(f"HELO {name}", stage="ehlo")
        if reply.code != 250:
            self.close(polite=False)
            raise UpstreamRefused(reply, f"{self.endpoint} refused HELO: {reply}", "ehlo")
        self.extensions = {}

    def starttls(self, tls: TlsPolicy) -> None:
        reply = self.command("STARTTLS", stage="starttls")
        if reply.code != 220:
            if tls.mode == "required" or self.channel is None:
                self.close()
                raise tls_failed(f"{self.endpoint} refused STARTTLS: {reply}")
            # Nothing was negotiated: the connection is still clean plaintext.
            log.info("sid=%s upstream=%s starttls refused: %s; continuing without TLS", self.sid, self.endpoint,
                     reply)
            return
        assert self.channel is not None and tls.context is not None
        # An address literal is matched against the certificate's IP SANs; Python sends no SNI for it (RFC 6066).
        server_hostname = self.hop.host.split("%", 1)[0] if self.hop.is_address else self.hop.host
        try:
            self.channel.start_tls(tls.context, self._deadline(None), server_side=False,
                                   server_hostname=server_hostname)
        except ChannelError as exc:
            self.close(polite=False)
            raise tls_failed(f"TLS handshake with {self.endpoint}: {exc}") from None
        sock = self.channel.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        self.tls_info = f"{sock.version()} {cipher[0] if cipher else '?'} " + (
            "verified" if tls.verify else "unverified")
        self.hello(self.local_name)

    def send_xclient(self, identity: ClientIdentity) -> None:
        offered = set(self.extensions.get("XCLIENT", "").upper().split())
        commands = xclient_commands(identity.attributes(offered))
        for line in commands:
            reply = self.command(line, stage="xclient")
            if reply.code // 100 != 2:  # Postfix greets anew (220); smtp-sink says 250
                self.close()
                raise UpstreamRefused(
                    Reply.of(451, "4.4.0 Upstream server refused XCLIENT, try again later"),
                    f"{self.endpoint} refused {line!r}: {reply}", "xclient")
        if commands:
            self.xclient = True
            self.hello(identity.ehlo_name)

    # ---------------------------------------------------------- transaction

    def mail_and_rcpt(self, sender: str, params: dict[str, str | None], recipient: str) -> tuple[Reply, Reply | None]:
        """MAIL FROM and the first RCPT TO, in one write when the upstream offers PIPELINING.

        Returns the MAIL reply and the RCPT reply (None when MAIL was refused).
        """
        text = format_params(params)
        mail = f"MAIL FROM:<{sender}>" + (f" {text}" if text else "")
        rcpt = f"RCPT TO:<{recipient}>"
        if "PIPELINING" in self.extensions:
            replies = self.pipeline([mail, rcpt])
        else:
            replies = [self.command(mail)]
            if replies[0].code // 100 == 2 and self.channel is not None:
                replies.append(self.command(rcpt))
        mail_reply = replies[0]
        self.in_transaction = mail_reply.code == 250 and self.channel is not None
        rcpt_reply = replies[1] if len(replies) > 1 and mail_reply.code == 250 else None
        if mail_reply.code == 250 and rcpt_reply is None:
            raise closed(f"{self.endpoint} closed the connection after MAIL")
        return mail_reply, rcpt_reply

    def rcpt(self, recipient: str) -> Reply:
        return self.command(f"RCPT TO:<{recipient}>")

    def data(self) -> Reply:
        """DATA: 354, or a 4xx/5xx refusal. Anything else (a 2xx) cannot be an answer to DATA (RFC 5321
        4.3.2): it is a reply meant for an earlier command, so the replies are out of step with the commands
        and none of them can be relayed."""
        reply = self.command("DATA")
        if reply.code != 354 and reply.code // 100 not in (4, 5):
            self.close(polite=False)
            raise protocol_error(f"{self.endpoint} answered DATA with {reply}", "data")
        return reply

    def send_data(self, chunk: bytes) -> None:
        """Stream message bytes that the DataFramer already made safe."""
        self.send(chunk)

    def end_data(self, last: bytes = b"") -> Reply:
        """Send the rest and the terminator; the verdict is the reply to that dot and nothing else.

        Whatever the upstream sent during the data phase (an early 250, a
        554) is a protocol error: the connection is dropped without the dot,
        so the client can never hear a verdict on a message the upstream
        did not answer as a whole.
        """
        if self.channel is None:
            raise closed("upstream connection not open", "data")
        if self.channel.pending():
            self.close(polite=False)
            raise protocol_error(f"{self.endpoint} spoke during the message data", "data")
        self.send(last + b".\r\n")
        self.in_transaction = False
        reply = self.read_reply(self.timeouts.data, stage="dot")
        if self.channel is not None and self.channel.buffer:  # what arrived with the reply (no extra syscall)
            self.close(polite=False)
            raise protocol_error(f"{self.endpoint} sent more than one reply to the final dot", "dot")
        self.transactions += 1
        return reply

    def rset(self) -> None:
        """Abort the upstream transaction; a failure just closes the connection."""
        try:
            reply = self.command("RSET")
        except UpstreamError:
            return
        if reply.code != 250:
            self.close(polite=False)
        self.in_transaction = False

    def quit(self) -> None:
        """Polite goodbye that never raises and never waits long: QUIT, then close."""
        if self.channel is None:
            return
        try:
            self.channel.send(b"QUIT\r\n", time.monotonic() + QUIT_WAIT)
        except ChannelError:
            pass
        self.close()

    def close(self, *, polite: bool = True) -> None:
        """Drop the connection (after a refused or partial DATA, without a word)."""
        channel, self.channel = self.channel, None
        self.in_transaction = False
        if channel is not None:
            if not polite:
                self.faulted = True
            channel.close(polite=polite)

    def abort(self) -> None:
        """Break the connection under a thread blocked on it (forced stop); the owner closes it."""
        channel = self.channel
        if channel is not None:
            self.faulted = True
            channel.abort()

    @property
    def alive(self) -> bool:
        return self.channel is not None

    def upstream_params(self, params: dict[str, str | None]) -> dict[str, str | None] | None:
        """MAIL parameters to pass on; None when a required one cannot be.

        SIZE and BODY are dropped when not offered (the data still passes
        unchanged; Willi never converts 8-bit content). SMTPUTF8 cannot be
        dropped: None tells the caller to refuse the recipient.
        """
        result: dict[str, str | None] = {}
        for key, value in params.items():
            if key == "SMTPUTF8":
                if "SMTPUTF8" not in self.extensions:
                    return None
                result[key] = value
            elif key == "SIZE" and "SIZE" in self.extensions:
                result[key] = value
            elif key == "BODY" and "8BITMIME" in self.extensions:
                result[key] = value
        return result

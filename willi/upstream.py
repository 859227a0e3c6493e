"""The upstream side: an smtplib-style client used from the session's thread.

Small primitives (`_send`, `_read_reply`) as in CPython's smtplib, but on a
raw socket with our own buffer so that replies are kept verbatim (every
line of a multi-line reply), timeouts are per step, and DATA is streamed.
Every failure becomes an UpstreamError carrying the reply the client
must hear (design.md: 451 4.4.1 unreachable, 451 4.7.5 TLS, 451 4.4.2
closed); a reply the upstream really sent is relayed as it is.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass

from willi.protocol import Reply, format_params, parse_ehlo, parse_reply_line, xclient_commands
from willi.route import Route

log = logging.getLogger("willi.upstream")

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "DESTADDR", "DESTPORT")


class UpstreamError(Exception):
    """The upstream could not be used; `reply` is what the client is told."""

    def __init__(self, reply: Reply, reason: str) -> None:
        self.reply, self.reason = reply, reason
        super().__init__(reason)


class UpstreamRefused(UpstreamError):
    """The upstream itself answered with a failure reply during setup."""


def unreachable(reason: str) -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.4.1 Upstream server unreachable, try again later"), reason)


def closed(reason: str) -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.4.2 Upstream connection lost, try again later"), reason)


def tls_failed(reason: str) -> UpstreamError:
    return UpstreamError(Reply.of(451, "4.7.5 TLS with the upstream server failed, try again later"), reason)


@dataclass(frozen=True)
class ClientIdentity:
    """What XCLIENT tells the upstream about the real client."""

    addr: str
    port: int
    helo: str
    esmtp: bool
    name: str  # verified reverse name, "[UNAVAILABLE]" or "[TEMPUNAVAIL]"
    tls: bool
    dest_addr: str = ""
    dest_port: int = 0

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
        addr = f"IPV6:{self.addr}" if ":" in self.addr else self.addr
        values = {
            "NAME": self.name,
            "ADDR": addr,
            "PORT": str(self.port),
            "PROTO": "ESMTP" if self.esmtp else "SMTP",
            "HELO": self.helo or "[UNAVAILABLE]",
            "DESTADDR": (f"IPV6:{self.dest_addr}" if ":" in self.dest_addr else self.dest_addr),
            "DESTPORT": str(self.dest_port),
        }
        return [(k, values[k]) for k in XCLIENT_ATTRIBUTES if k in offered and values[k]]


class UpstreamConnection:
    """One SMTP connection to an upstream, set up and ready for MAIL."""

    def __init__(self, route: Route, *, local_name: str, connect_timeout: float, command_timeout: float,
                 data_timeout: float, tls_context: ssl.SSLContext | None, client: ClientIdentity | None,
                 session_id: str = "") -> None:
        self.route = route
        self.local_name = local_name
        self.connect_timeout, self.command_timeout, self.data_timeout = connect_timeout, command_timeout, data_timeout
        self.tls_context = tls_context
        self.client = client
        self.sid = session_id
        self.sock: socket.socket | None = None
        self._buf = b""
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.xclient = False
        self.in_transaction = False

    # ---------------------------------------------------------- primitives

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise closed("upstream connection not open")
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise closed(f"sending to {self.route.endpoint}: {exc}") from None

    def _readline(self) -> bytes:
        assert self.sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[: nl + 1], self._buf[nl + 1 :]
                return line
            if len(self._buf) > MAX_REPLY_LINE:
                raise closed(f"reply line from {self.route.endpoint} longer than {MAX_REPLY_LINE} octets")
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise closed(f"timeout waiting for {self.route.endpoint}") from None
            except (OSError, ssl.SSLError) as exc:
                raise closed(f"reading from {self.route.endpoint}: {exc}") from None
            if not data:
                raise closed(f"{self.route.endpoint} closed the connection")
            self._buf += data

    def _read_reply(self, timeout: float | None = None) -> Reply:
        """Read one (possibly multi-line) reply; closes the connection on any fault."""
        if self.sock is None:
            raise closed("upstream connection not open")
        self.sock.settimeout(timeout or self.command_timeout)
        lines: list[str] = []
        try:
            while True:
                code, last, text = parse_reply_line(self._readline())
                lines.append(text)
                if last:
                    break
                if len(lines) >= MAX_REPLY_LINES:
                    raise closed(f"reply from {self.route.endpoint} has too many lines")
        except ValueError as exc:
            self.close()
            raise UpstreamError(Reply.of(451, "4.5.0 Upstream protocol error, try again later"), str(exc)) from None
        except UpstreamError:
            self.close()
            raise
        reply = Reply(code, tuple(lines))
        log.debug("sid=%s upstream=%s S: %s", self.sid, self.route.endpoint, reply)
        if code == 421:
            self.close()  # RFC 5321 3.8: the server is closing the channel, whatever the command
        return reply

    def command(self, line: str, timeout: float | None = None) -> Reply:
        """Send one command line and return the upstream's reply."""
        log.debug("sid=%s upstream=%s C: %s", self.sid, self.route.endpoint, line)
        self._send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self._read_reply(timeout)

    # ---------------------------------------------------------- setup

    def open(self, want_tls: bool) -> None:
        """Connect, greet, EHLO, STARTTLS (policy), XCLIENT, EHLO again."""
        try:
            self.sock = socket.create_connection((self.route.host, self.route.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise unreachable(f"connecting to {self.route.endpoint}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = self._read_reply()
        if greeting.code != 220:
            self.close()
            raise UpstreamRefused(greeting, f"{self.route.endpoint} greeted with {greeting}")
        self._hello()
        if want_tls and "STARTTLS" in self.extensions and self.tls_context is not None:
            self._starttls()
        if self.client is not None and "XCLIENT" in self.extensions:
            self._xclient(self.client)

    def _hello(self, name: str | None = None) -> None:
        name = name or self.local_name
        reply = self.command(f"EHLO {name}")
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return
        if reply.code == 421:
            self.close()
            raise UpstreamRefused(reply, f"{self.route.endpoint} refused EHLO: {reply}")
        reply = self.command(f"HELO {name}")
        if reply.code != 250:
            self.close()
            raise UpstreamRefused(reply, f"{self.route.endpoint} refused HELO: {reply}")
        self.extensions = {}

    def _starttls(self) -> None:
        reply = self.command("STARTTLS")
        if reply.code != 220:
            # Nothing was negotiated: the connection is still clean plaintext.
            log.info("sid=%s upstream=%s starttls refused: %s; continuing without TLS",
                     self.sid, self.route.endpoint, reply)
            return
        assert self.sock is not None and self.tls_context is not None
        self._buf = b""  # anything sent before the handshake is not trusted
        server_hostname = self.route.host
        try:
            self.sock.settimeout(self.command_timeout)
            self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=server_hostname)
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            self.close()
            raise tls_failed(f"TLS handshake with {self.route.endpoint}: {exc}") from None
        self.tls = True
        self._hello()

    def _xclient(self, client: ClientIdentity) -> None:
        offered = set(self.extensions.get("XCLIENT", "").upper().split())
        commands = xclient_commands(client.attributes(offered))
        for line in commands:
            reply = self.command(line)
            if reply.code // 100 != 2:  # Postfix greets anew (220); smtp-sink says 250
                self.close()
                raise UpstreamRefused(
                    Reply.of(451, "4.4.0 Upstream server refused XCLIENT, try again later"),
                    f"{self.route.endpoint} refused {line!r}: {reply}",
                )
        if commands:
            self.xclient = True
            self._hello(client.ehlo_name)

    # ---------------------------------------------------------- transaction

    def mail(self, sender: str, params: dict[str, str | None]) -> Reply:
        """MAIL FROM with the parameters this upstream supports (see `upstream_params`)."""
        if self.in_transaction:
            self.rset()
        text = format_params(params)
        reply = self.command(f"MAIL FROM:<{sender}>" + (f" {text}" if text else ""))
        self.in_transaction = reply.code == 250
        return reply

    def rcpt(self, recipient: str) -> Reply:
        return self.command(f"RCPT TO:<{recipient}>")

    def data(self) -> Reply:
        return self.command("DATA")

    def send_data(self, chunk: bytes) -> None:
        """Stream message bytes that the DataFramer already made safe."""
        if self.sock is not None:
            self.sock.settimeout(self.command_timeout)
        self._send(chunk)

    def end_data(self) -> Reply:
        """Send the terminator and wait (longer) for the verdict on the message."""
        self._send(b".\r\n")
        self.in_transaction = False
        return self._read_reply(self.data_timeout)

    def rset(self) -> None:
        """Abort the upstream transaction; a failure just closes the connection."""
        try:
            reply = self.command("RSET")
        except UpstreamError:
            return
        if reply.code != 250:
            self.close()
        self.in_transaction = False

    def quit(self) -> None:
        """Polite goodbye; never raises."""
        if self.sock is None:
            return
        try:
            self.command("QUIT", timeout=min(self.command_timeout, 5.0))
        except UpstreamError:
            pass
        self.close()

    def close(self) -> None:
        """Drop the connection without a word (after a refused or partial DATA)."""
        sock, self.sock = self.sock, None
        self.in_transaction = False
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self.sock is not None

    def upstream_params(self, params: dict[str, str | None]) -> dict[str, str | None] | None:
        """MAIL parameters to pass on; None when a required one cannot be.

        SIZE and BODY are dropped when not offered (the data still passes
        unchanged; Willi never converts 8-bit content). SMTPUTF8 cannot be
        dropped: None tells the session to refuse the recipient.
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

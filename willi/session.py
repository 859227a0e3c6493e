"""The server-side SMTP dialog: one blocking session per client thread.

One `smtp_VERB` method per command, found through a dispatch table built
once. Replies are buffered and flushed whenever the client has no complete
command waiting, so PIPELINING costs one write per batch and every reply
still goes out in order.
"""

from __future__ import annotations

import base64
import logging
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from willi.log import TRANSACTION_LOGGER, logfmt
from willi.mappings.base import MappingError
from willi.protocol import (
    AddressError,
    DataFramer,
    ParameterError,
    Reply,
    parse_params,
    parse_path,
    split_command,
)
from willi.resolver import LookupFailed
from willi.route import Route
from willi.upstream import ClientIdentity, UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from willi.server import Runtime

log = logging.getLogger("willi.session")
txlog = logging.getLogger(TRANSACTION_LOGGER)

READ_CHUNK = 65536
INTERRUPT_POLL = 1.0
NAME_LOOKUP_WAIT = 5.0
REFUSED_VERBS = frozenset({"AUTH", "BDAT", "XCLIENT", "XFORWARD", "ETRN", "EXPN", "TURN"})


class ClientGone(Exception):
    """The client closed the connection or the socket failed."""


class ClientTimeout(Exception):
    """The client said nothing for `read_timeout`."""


class Interrupted(Exception):
    """An idle wait ended because Willi is shutting down."""


class LineTooLong(Exception):
    """A command line over the limit (already discarded up to its end)."""


class ClientStream:
    """Buffered reading and writing on the client socket.

    Our own buffer (not a makefile) so that STARTTLS can throw away every
    plaintext byte read ahead, and DATA can hand back what follows the
    terminator to the command reader.
    """

    def __init__(self, sock: socket.socket, read_timeout: float, write_timeout: float) -> None:
        self.sock = sock
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self.buffer = bytearray()
        self.out: list[bytes] = []
        #: Polled about once a second while waiting; True ends the wait (shutdown).
        self.interrupt: Callable[[], bool] = lambda: False

    def _recv(self) -> bytes:
        deadline = time.monotonic() + self.read_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientTimeout()
            self.sock.settimeout(min(remaining, INTERRUPT_POLL))
            try:
                data = self.sock.recv(READ_CHUNK)
                break
            except socket.timeout:
                if self.interrupt():
                    raise Interrupted() from None
            except (OSError, ssl.SSLError) as exc:
                raise ClientGone(str(exc)) from None
        if not data:
            raise ClientGone("connection closed by client")
        return data

    def has_line(self) -> bool:
        return b"\n" in self.buffer

    def readline(self, limit: int) -> bytes:
        """Next command line; LineTooLong after discarding an overlong one."""
        skipping = False
        while True:
            nl = self.buffer.find(b"\n")
            if nl >= 0:
                line = bytes(self.buffer[: nl + 1])
                del self.buffer[: nl + 1]
                if skipping or len(line) > limit:
                    raise LineTooLong()
                return line
            if len(self.buffer) > limit:
                skipping = True
                self.buffer.clear()
            self.flush()
            self.buffer += self._recv()

    def read_some(self) -> bytes:
        """Whatever is buffered, else the next chunk from the socket."""
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data
        return self._recv()

    def unread(self, data: bytes) -> None:
        self.buffer[:0] = data

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        self.sock.settimeout(self.write_timeout)
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise ClientGone(str(exc)) from None

    def starttls(self, context: ssl.SSLContext) -> None:
        """Discard the plaintext read ahead (RFC 3207 section 4.2), then handshake."""
        self.buffer.clear()
        self.sock.settimeout(self.read_timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            raise ClientGone(f"TLS handshake failed: {exc}") from None


@dataclass
class Transaction:
    """The envelope of one MAIL..DATA exchange and what became of it."""

    sender: str
    params: dict[str, str | None]
    started: float = field(default_factory=time.monotonic)
    recipients: list[str] = field(default_factory=list)
    route: Route | None = None
    refused: list[str] = field(default_factory=list)
    last_refusal: tuple[Reply, str] | None = None  # (reply, who decided) for the log
    smtputf8: bool = False
    broken: Reply | None = None  # the upstream transaction died after a recipient was accepted


class NameLookup:
    """Forward-confirmed reverse DNS of the client, started at connect time.

    Runs in a helper thread so the dialog never waits for DNS unless XCLIENT
    needs the name, and then only up to NAME_LOOKUP_WAIT.
    """

    def __init__(self, addr: str, enabled: bool) -> None:
        self.addr = addr
        self.name = "[UNAVAILABLE]" if not enabled else "[TEMPUNAVAIL]"
        self._done = threading.Event()
        if enabled:
            threading.Thread(target=self._run, name=f"rdns-{addr}", daemon=True).start()
        else:
            self._done.set()

    def _run(self) -> None:
        try:
            host = socket.gethostbyaddr(self.addr)[0]
            forward = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
            self.name = host if self.addr in forward else "[UNAVAILABLE]"
        except socket.herror:
            self.name = "[UNAVAILABLE]"
        except socket.gaierror as exc:
            self.name = "[TEMPUNAVAIL]" if exc.errno == socket.EAI_AGAIN else "[UNAVAILABLE]"
        except OSError:
            self.name = "[TEMPUNAVAIL]"
        finally:
            self._done.set()

    def result(self) -> str:
        self._done.wait(NAME_LOOKUP_WAIT)
        return self.name


def new_session_id() -> str:
    """Six characters for grepping logs; one urandom call, not one per character."""
    return base64.b32encode(secrets.token_bytes(5)).decode()[:6]


class SmtpSession:
    """The dialog with one client, from greeting to QUIT."""

    def __init__(self, sock: socket.socket, peer: tuple, runtime: Runtime,
                 draining: threading.Event | None = None) -> None:
        self.runtime = runtime
        self.draining = draining or threading.Event()
        self.waiting_idle = False
        self.config = runtime.config
        self.peer_addr, self.peer_port = peer[0], peer[1]
        try:
            local = sock.getsockname()
            self.local_addr, self.local_port = local[0], local[1]
        except OSError:
            self.local_addr, self.local_port = "", 0
        if self.peer_addr.startswith("::ffff:"):
            self.peer_addr = self.peer_addr[7:]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are whole batches already
        except OSError:
            pass
        self.stream = ClientStream(sock, self.config.read_timeout, self.config.write_timeout)
        self.stream.interrupt = lambda: self.waiting_idle and self.draining.is_set()
        self.sid = new_session_id()
        self.names = NameLookup(self.peer_addr, self.config.client_name_lookup)
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.tx: Transaction | None = None
        self.upstream: UpstreamConnection | None = None
        self.errors = 0
        self.closing = False
        self.in_data = False

    # ---------------------------------------------------------- plumbing

    @property
    def client(self) -> str:
        return f"[{self.peer_addr}]:{self.peer_port}" if ":" in self.peer_addr else f"{self.peer_addr}:{self.peer_port}"

    def reply(self, code: int, text: str) -> None:
        self.own_reply(Reply.of(code, text))

    def own_reply(self, reply: Reply) -> None:
        """Willi's own reply (not relayed); its 5xx count towards `max_errors`."""
        self.send_reply(reply)
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= self.config.max_errors and not self.closing:
                self.send_reply(Reply.of(421, f"4.7.0 {self.config.domain} Too many errors, closing connection"))
                self.closing = True

    def send_reply(self, reply: Reply) -> None:
        log.debug("sid=%s S: %s", self.sid, reply)
        self.stream.write(reply.encode())

    def relay(self, reply: Reply) -> None:
        """Pass an upstream reply on verbatim; only 421 becomes 451.

        A 421 from Willi would tell the client that *this* connection
        closes, while only the upstream's did; 451 with the upstream's own
        text keeps the meaning (try later) without that lie.
        """
        if reply.code == 421:
            reply = Reply(451, reply.lines)
        self.send_reply(reply)

    def run(self) -> None:
        """Serve the client until QUIT, a fatal error, or the connection ends."""
        try:
            self.send_reply(Reply.of(220, f"{self.config.domain} ESMTP Willi"))
            while not self.closing:
                self.waiting_idle = self.tx is None and not self.stream.has_line()
                if self.waiting_idle and self.draining.is_set():
                    self._say_shutdown()
                    return
                try:
                    line = self.stream.readline(self.config.max_command_line)
                except LineTooLong:
                    self.reply(500, "5.5.2 Line too long")
                    continue
                except Interrupted:
                    self._say_shutdown()
                    return
                finally:
                    self.waiting_idle = False
                self.dispatch(line)
            self.stream.flush()
        except ClientTimeout:
            self._safe_final(Reply.of(421, f"4.4.2 {self.config.domain} Timeout, closing connection"))
            self.end_transaction("aborted", error="client timeout", error_src="client")
        except ClientGone as exc:
            self.end_transaction("aborted", error=f"client disconnected: {exc}", error_src="client")
        except Exception:
            log.exception("sid=%s client=%s unexpected error", self.sid, self.client)
            self._safe_final(Reply.of(451, "4.3.0 Internal error, try again later"))
            self.end_transaction("failed", error="internal error", error_src="proxy")
        finally:
            if self.upstream is not None:
                self.upstream.quit() if not self.in_data else self.upstream.close()
                self.upstream = None
            try:
                self.stream.sock.close()
            except OSError:
                pass

    def _say_shutdown(self) -> None:
        self._safe_final(Reply.of(421, f"4.3.2 {self.config.domain} Service shutting down, try again later"))

    def _safe_final(self, reply: Reply) -> None:
        try:
            self.send_reply(reply)
            self.stream.flush()
        except ClientGone:
            pass

    def dispatch(self, line: bytes) -> None:
        verb, arg = split_command(line)
        log.debug("sid=%s C: %s", self.sid, line.rstrip(b"\r\n")[:200].decode("utf-8", "replace"))
        handler = self.HANDLERS.get(verb)
        if handler is not None:
            try:
                handler(self, arg)
            except (ClientGone, ClientTimeout, Interrupted):
                raise
            except Exception:
                if self.in_data:
                    raise  # the rest of the message must never be read as commands: close
                log.exception("sid=%s client=%s unexpected error in %s", self.sid, self.client, verb)
                self._drop_upstream(polite=False)
                self.end_transaction("failed", error=f"internal error in {verb}", error_src="proxy")
                self.send_reply(Reply.of(451, "4.3.0 Internal error, try again later"))
        elif verb in REFUSED_VERBS:
            self.reply(502, "5.5.1 Command not implemented")
        else:
            self.reply(500, "5.5.2 Command unrecognized")

    # ---------------------------------------------------------- session commands

    def smtp_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def smtp_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def _greet(self, arg: str, *, esmtp: bool) -> None:
        if not arg:
            self.reply(501, "5.5.4 Syntax: EHLO hostname" if esmtp else "5.5.4 Syntax: HELO hostname")
            return
        if len(arg.encode("utf-8", "surrogateescape")) > 255:
            self.reply(501, "5.5.4 HELO name longer than 255 octets")
            return
        self.abort_transaction("new HELO/EHLO")
        self._drop_upstream()  # its XCLIENT HELO would be stale
        self.helo, self.esmtp = arg, esmtp
        if not esmtp:
            self.send_reply(Reply.of(250, self.config.domain))
            return
        lines = [self.config.domain, "PIPELINING", f"SIZE {self.config.max_message_bytes}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if self.config.smtputf8:
            lines.append("SMTPUTF8")
        if self.runtime.server_tls is not None and not self.tls:
            lines.append("STARTTLS")
        self.send_reply(Reply(250, tuple(lines)))

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: STARTTLS")
        elif self.tls:
            self.reply(503, "5.5.1 Already in TLS")
        elif self.runtime.server_tls is None:
            self.reply(454, "4.7.0 TLS not available")
        else:
            self.send_reply(Reply.of(220, "2.0.0 Ready to start TLS"))
            self.stream.flush()
            self.stream.starttls(self.runtime.server_tls)
            self.tls = True
            self.abort_transaction("STARTTLS")
            self._drop_upstream()
            self.helo, self.esmtp = None, False

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: RSET")
            return
        self.abort_transaction("RSET")
        if self.upstream is not None and self.upstream.in_transaction:
            self.upstream.rset()
        self.reply(250, "2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            self.reply(501, "5.5.4 Syntax: VRFY address")
        else:
            self.reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, arg: str) -> None:
        self.reply(214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")

    def smtp_QUIT(self, arg: str) -> None:
        self.abort_transaction("QUIT")
        self.send_reply(Reply.of(221, f"2.0.0 {self.config.domain} Bye"))
        self.closing = True

    # ---------------------------------------------------------- transaction commands

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self.reply(503, "5.5.1 Send EHLO or HELO first")
            return
        if self.tx is not None:
            self.reply(503, "5.5.1 Nested MAIL command")
            return
        parsed = self._parse_path(arg, "FROM", utf8=self.config.smtputf8)
        if parsed is None:
            return
        sender, params = parsed
        utf8 = "SMTPUTF8" in params and self.config.smtputf8
        if not utf8 and not sender.isascii():
            self.reply(553, "5.1.7 Bad sender address: non-ASCII address needs the SMTPUTF8 parameter")
            return
        problem = self._check_mail_params(params)
        if problem is not None:
            self.reply(*problem)
            return
        if not self.esmtp and params:
            self.reply(555, "5.5.4 Parameters need EHLO")
            return
        self.tx = Transaction(sender=sender, params=params, smtputf8=utf8)
        self.reply(250, "2.1.0 Ok")

    def _parse_path(self, arg: str, keyword: str, *, utf8: bool) -> tuple[str, dict[str, str | None]] | None:
        """Address and parameters of MAIL/RCPT, or None after telling the client what is wrong.

        A bad address is 553 with 5.1.7 (sender) or 5.1.3 (recipient); any
        other syntax error is 501 5.5.4.
        """
        sender = keyword == "FROM"
        command, role, code = ("MAIL FROM", "sender", "5.1.7") if sender else ("RCPT TO", "recipient", "5.1.3")
        try:
            address, raw_params = parse_path(arg, keyword, utf8=utf8)
            return address, parse_params(raw_params)
        except AddressError as exc:
            self.reply(553, f"{code} Bad {role} address: {exc}")
        except (ValueError, ParameterError) as exc:
            self.reply(501, f"5.5.4 Syntax: {command}:<address> [parameters]: {exc}")
        return None

    def _check_mail_params(self, params: dict[str, str | None]) -> tuple[int, str] | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return 501, "5.5.4 Bad SIZE parameter"
                if int(value) > self.config.max_message_bytes:
                    return 552, f"5.3.4 Message size exceeds limit of {self.config.max_message_bytes} octets"
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return 501, "5.5.4 BODY must be 7BIT or 8BITMIME"
                params[key] = value.upper()
            elif key == "SMTPUTF8" and self.config.smtputf8:
                if value is not None:
                    return 501, "5.5.4 SMTPUTF8 takes no value"
            else:
                return 555, f"5.5.4 Unsupported parameter {key}"
        return None

    def smtp_RCPT(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            self.reply(503, "5.5.1 Need MAIL before RCPT")
            return
        parsed = self._parse_path(arg, "TO", utf8=tx.smtputf8)
        if parsed is None:
            return
        recipient, params = parsed
        if params:
            self.reply(555, f"5.5.4 Unsupported parameter {next(iter(params))}")
            return
        if recipient.lower() == "postmaster":
            recipient = f"postmaster@{self.config.domain}"  # RFC 5321 4.5.1: always accepted syntax
        reply, source = self._route_recipient(tx, recipient)
        if reply.code // 100 != 2:
            tx.refused.append(recipient)
            tx.last_refusal = (reply, source)
        if source == "upstream":
            self.relay(reply)
        else:
            self.own_reply(reply)

    def _route_recipient(self, tx: Transaction, recipient: str) -> tuple[Reply, str]:
        """The reply for one recipient and who decided it: proxy, lookup or upstream."""
        if tx.broken is not None:
            return tx.broken, "upstream"
        if len(tx.recipients) >= self.config.max_recipients:
            return Reply.of(452, "4.5.3 Too many recipients"), "proxy"
        try:
            resolution = self.runtime.resolver.resolve(recipient)
        except (LookupFailed, MappingError) as exc:
            log.error("sid=%s lookup failed: %s", self.sid, exc)
            return Reply.of(451, "4.3.0 Recipient lookup failed, try again later"), "lookup"
        route = resolution.route
        if route is None:
            return Reply.of(554, f"5.7.1 <{recipient}>: Relay access denied"), "lookup"
        if tx.route is not None and not route.same_upstream(tx.route):
            return Reply.of(452, "4.5.3 Recipient routed elsewhere: send it in a separate transaction"), "proxy"
        return self._upstream_rcpt(tx, route, recipient), "upstream"

    def _upstream_rcpt(self, tx: Transaction, route: Route, recipient: str) -> Reply:
        """Open (or reuse) the upstream and its transaction, then ask it about `recipient`."""
        try:
            if tx.route is None:
                failure = self._open_upstream_transaction(tx, route)
                if failure is not None:
                    return failure
            assert self.upstream is not None
            reply = self.upstream.rcpt(recipient)
        except UpstreamError as exc:
            log.warning("sid=%s upstream=%s %s", self.sid, route.endpoint, exc.reason)
            self._drop_upstream(polite=False)
            if tx.recipients:
                # Recipients already accepted went down with the connection:
                # the client must hear a 4xx at DATA and retry the whole message.
                tx.broken = exc.reply
            return exc.reply
        if reply.code // 100 == 2:
            tx.recipients.append(recipient)
            tx.route = route
        return reply

    def _open_upstream_transaction(self, tx: Transaction, route: Route) -> Reply | None:
        """Ensure a connection to `route` with MAIL accepted; a Reply when refused."""
        for attempt in (1, 2):
            reused = self.upstream is not None and self.upstream.alive and route.same_upstream(self.upstream.route)
            if not reused:
                self._drop_upstream()
                self.upstream = self._connect(route)
            assert self.upstream is not None
            params = self.upstream.upstream_params(tx.params)
            if params is None:
                return Reply.of(550, "5.6.7 Upstream server does not support SMTPUTF8")
            try:
                reply = self.upstream.mail(tx.sender, params)
            except UpstreamError:
                if reused and attempt == 1:
                    self._drop_upstream(polite=False)  # it closed while idle: connect afresh once
                    continue
                raise
            return None if reply.code == 250 else reply
        raise AssertionError("unreachable")

    def _connect(self, route: Route) -> UpstreamConnection:
        config = self.config
        policy = config.upstream_starttls
        want_tls = policy == "always" or (policy == "client" and self.tls)
        identity = None
        if config.xclient:
            identity = ClientIdentity(
                addr=self.peer_addr, port=self.peer_port, helo=self.helo or "", esmtp=self.esmtp,
                name=self.names.result(), tls=self.tls, dest_addr=self.local_addr, dest_port=self.local_port,
            )
        conn = UpstreamConnection(
            route, local_name=config.domain, connect_timeout=config.upstream_connect_timeout,
            command_timeout=config.upstream_command_timeout, data_timeout=config.upstream_data_timeout,
            tls_context=self.runtime.upstream_tls.for_route(route.tls_verify), client=identity, session_id=self.sid,
        )
        conn.open(want_tls)
        return conn

    def _drop_upstream(self, *, polite: bool = True) -> None:
        if self.upstream is not None:
            self.upstream.quit() if polite else self.upstream.close()
            self.upstream = None

    def smtp_DATA(self, arg: str) -> None:
        tx = self.tx
        if arg:
            self.reply(501, "5.5.4 Syntax: DATA")
            return
        if tx is None:
            self.reply(503, "5.5.1 Need MAIL before DATA")
            return
        if tx.broken is not None:
            self.send_reply(tx.broken)
            self.end_transaction("failed", reply=tx.broken, error="upstream connection lost", error_src="upstream")
            return
        if not tx.recipients or self.upstream is None:
            self.reply(503, "5.5.1 No valid recipients")
            return
        upstream = self.upstream
        try:
            reply = upstream.data()
        except UpstreamError as exc:
            self._drop_upstream(polite=False)
            self.send_reply(exc.reply)
            self.end_transaction("failed", reply=exc.reply, error=exc.reason, error_src="upstream")
            return
        if reply.code != 354:
            self.relay(reply)
            self.end_transaction("rejected", reply=reply, error="upstream refused DATA", error_src="upstream")
            if upstream.alive:
                upstream.rset()
            return
        self.send_reply(reply)
        self.stream.flush()
        self._stream_data(tx, upstream)

    def _stream_data(self, tx: Transaction, upstream: UpstreamConnection) -> None:
        """Copy the message through the framer; the dot goes upstream only if all went well."""
        framer = DataFramer()
        failure: Reply | None = None
        error, error_src = "", ""
        reject_bare = self.config.bare_newline == "reject"
        limit = self.config.max_message_bytes
        self.in_data = True
        try:
            while not framer.done:
                out, rest = framer.feed(self.stream.read_some())
                if failure is None:
                    if framer.size > limit:
                        failure = Reply.of(552, f"5.3.4 Message exceeds size limit of {limit} octets")
                        error, error_src = "message too large", "client"
                    elif reject_bare and framer.violation:
                        failure = Reply.of(550, "5.5.2 Bare CR, bare LF or NUL in message; use CRLF line ends")
                        error, error_src = "bare newline", "client"
                    elif out:
                        try:
                            upstream.send_data(out)
                        except UpstreamError as exc:
                            failure, error, error_src = exc.reply, exc.reason, "upstream"
                    if failure is not None:
                        self._drop_upstream(polite=False)  # no final dot, ever
                if framer.done:
                    self.stream.unread(rest)
        except (ClientGone, ClientTimeout):
            self._drop_upstream(polite=False)
            self.in_data = False
            raise
        self.in_data = False
        if failure is not None:
            self.send_reply(failure)
            self.end_transaction("rejected" if error_src == "client" else "failed", reply=failure, size=framer.size,
                                 error=error, error_src=error_src)
            return
        try:
            reply = upstream.end_data()
        except UpstreamError as exc:
            self._drop_upstream(polite=False)
            self.send_reply(exc.reply)
            self.end_transaction("failed", reply=exc.reply, size=framer.size, error=exc.reason, error_src="upstream")
            return
        self.relay(reply)
        result = "accepted" if reply.code // 100 == 2 else "rejected"
        self.end_transaction(result, reply=reply, size=framer.size,
                             error=None if result == "accepted" else "upstream refused message",
                             error_src=None if result == "accepted" else "upstream")

    # ---------------------------------------------------------- transaction record

    def abort_transaction(self, why: str) -> None:
        """Forget the envelope (RSET, QUIT, STARTTLS, HELO), logging it if it got anywhere."""
        tx = self.tx
        if tx is not None and tx.recipients:
            self.end_transaction("aborted", error=f"client sent {why}", error_src="client")
        elif tx is not None and tx.last_refusal is not None:
            reply, source = tx.last_refusal
            self.end_transaction("rejected", reply=reply, error="no recipient accepted", error_src=source)
        self.tx = None

    def end_transaction(self, result: str, *, reply: Reply | None = None, size: int | None = None,
                        error: str | None = None, error_src: str | None = None) -> None:
        """Write the one logfmt line for this transaction and reset the envelope."""
        tx, self.tx = self.tx, None
        if tx is None:
            return
        upstream = self.upstream
        fields: dict[str, object] = {
            "result": result,
            "client": self.client,
            "helo": self.helo,
            "tls": self.tls,
            "from": f"<{tx.sender}>",
            "to": ",".join(f"<{r}>" for r in tx.recipients) or None,
            "refused": ",".join(f"<{r}>" for r in tx.refused) or None,
            "upstream": tx.route.endpoint if tx.route else None,
            "upstream_tls": upstream.tls if upstream is not None and tx.route else None,
            "xclient": upstream.xclient if upstream is not None and tx.route else None,
            "size": size,
            "reply": str(reply) if reply is not None else None,
            "duration_ms": int((time.monotonic() - tx.started) * 1000),
            "sid": self.sid,
            "error": error,
            "error_src": error_src,
        }
        txlog.info("%s", logfmt(fields))

    HANDLERS: dict[str, Callable[[SmtpSession, str], None]] = {}


SmtpSession.HANDLERS = {
    name[len("smtp_"):]: func for name, func in vars(SmtpSession).items() if name.startswith("smtp_")
}

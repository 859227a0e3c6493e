"""The server-side SMTP dialog: one blocking session per client thread.

One `smtp_VERB` method per command, found through a dispatch table built
once. Replies are buffered and flushed whenever the client has no complete
command waiting, so PIPELINING costs one write per batch and every reply
still goes out in order. Where recipients go and what the upstream says is
the relay's business (`relay.py`); this module decides what the client may
do next and what it hears.

Deadlines (design.md: every wait has a deadline for the whole step): a
command line must arrive whole within `read_timeout` (`stress_read_timeout`
when Willi is near `max_connections`, as Postfix's `${stress?...}`); the
message data must keep up at least `min_data_rate` bytes per second after
the first `read_timeout`, as Postfix's smtpd_min_data_rate. A client
dribbling a byte every few seconds therefore loses its slot, while a slow
but honest sender keeps it.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from willi.dns import UNAVAILABLE
from willi.lifecycle import Lifecycle
from willi.log import TRANSACTION_LOGGER, logfmt
from willi.netio import Channel, Closed, LineTooLong, TimedOut, Woken
from willi.peer import Peer
from willi.protocol import AddressError, ParameterError, Reply, parse_params, parse_path, split_command
from willi.relay import Relay, Transaction
from willi.upstream.client import ClientIdentity

if TYPE_CHECKING:
    from willi.runtime import Runtime

log = logging.getLogger("willi.session")
txlog = logging.getLogger(TRANSACTION_LOGGER)

DATA_CHUNK = 65536  # below malloc's mmap threshold: no mmap/munmap per read
FLUSH_AT = 16384  # replies buffered beyond this are written even while commands are waiting
NAME_LOOKUP_WAIT = 5.0
#: RCPTs past max_recipients that are answered 452 before each further one counts as an error (Postfix's
#: smtpd_recipient_overshoot_limit).
RECIPIENT_OVERSHOOT = 1000
JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})
REFUSED_VERBS = frozenset({"AUTH", "BDAT", "XCLIENT", "XFORWARD", "ETRN", "EXPN", "TURN"})


class ClientGone(Exception):
    """The client closed the connection or the socket failed."""


class ClientTimeout(Exception):
    """The client did not finish a step (a command line, the message) in time."""


class Shutdown(Exception):
    """A wait ended because Willi is stopping (or draining, for an idle client)."""


class Admission(Protocol):
    """What the server lends a session: its connection slot."""

    def rekey(self, ip: str) -> str | None: ...
    def stressed(self) -> bool: ...


class _Unlimited:
    def rekey(self, ip: str) -> str | None:
        return None

    def stressed(self) -> bool:
        return False


_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # workers must not repeat each other's ids


def new_session_id() -> str:
    """Six characters for grepping logs: 30 random bits, no system call (they need not be secret)."""
    return base64.b32encode(_ids.getrandbits(40).to_bytes(5, "big")).decode()[:6]


class SmtpSession:
    """The dialog with one client, from greeting to QUIT."""

    # Thousands of idle connections each hold one of these: no per-instance __dict__.
    __slots__ = ("_name", "admission", "channel", "closing", "config", "debug", "errors", "esmtp", "helo", "idle",
                 "junk", "lifecycle", "out", "out_size", "peer", "relay", "runtime", "sid", "tls", "tx")

    def __init__(self, sock: socket.socket, peer: Peer, runtime: Runtime, lifecycle: Lifecycle | None = None,
                 admission: Admission | None = None, timeouts: tuple[float, float] = (0.0, 0.0)) -> None:
        """`timeouts`: the kernel receive and send timeouts the socket inherited from its listener."""
        self.runtime = runtime
        self.config = runtime.config
        self.lifecycle = lifecycle or Lifecycle()
        self.admission: Admission = admission or _Unlimited()
        self.peer = peer
        # TCP_NODELAY and the kernel timeouts come from the listener (Linux copies them to accepted sockets).
        self.channel = Channel(sock, *timeouts)
        self.out: list[bytes] = []
        self.out_size = 0
        self.sid = new_session_id()
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None  # the TLS version with the client, when in TLS
        self.tx: Transaction | None = None
        self.relay = Relay(runtime, self.sid, self._identity, lambda: self.tls is not None)
        self.errors = 0
        self.junk = 0
        self.closing = False
        self.idle = False
        self._name: str | None = None
        self.debug = log.isEnabledFor(logging.DEBUG)  # the dialog log, decided once per session

    # ---------------------------------------------------------- who the client is

    @property
    def client(self) -> str:
        return self.peer.endpoint

    def _client_name(self) -> str:
        """The verified reverse name for XCLIENT NAME, looked up once, only when an upstream asks."""
        if self._name is None:
            if not self.config.client_name_lookup:
                self._name = UNAVAILABLE
            else:
                self._name = self.runtime.dns.reverse(self.peer.addr, NAME_LOOKUP_WAIT)
        return self._name

    def _identity(self) -> ClientIdentity:
        p = self.peer
        return ClientIdentity(addr=p.addr, port=p.port, helo=self.helo or "", esmtp=self.esmtp,
                              tls=self.tls is not None, dest_addr=p.local_addr, dest_port=p.local_port,
                              name=self._client_name)

    # ---------------------------------------------------------- replies

    def respond(self, reply: Reply, *, own: bool = True) -> None:
        """Queue a reply. Willi's own 5xx replies (not relayed ones) count towards `max_errors`."""
        if self.debug:
            log.debug("sid=%s S: %s", self.sid, reply)
        data = reply.encode()
        self.out.append(data)
        self.out_size += len(data)
        if own and reply.code >= 500:
            self._count_error()
        if self.out_size >= FLUSH_AT:
            self.flush()

    def _count_error(self) -> None:
        """One more client error; at `max_errors` the connection ends with 421."""
        self.errors += 1
        if self.errors >= self.config.max_errors and not self.closing:
            self.closing = True
            self.respond(Reply.of(421, f"4.7.0 {self.config.domain} Too many errors, closing connection"))

    def reply(self, code: int, text: str) -> None:
        self.respond(Reply.of(code, text))

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
        self.out.clear()
        self.out_size = 0
        timeout = self.config.write_timeout
        if self.admission.stressed():  # a client that does not read its replies must not hold a slot either
            timeout = min(timeout, self.config.stress_read_timeout)
        try:
            self.channel.send(data, time.monotonic() + timeout)
        except TimedOut:
            raise ClientGone("write timed out") from None
        except Closed as exc:
            raise ClientGone(str(exc)) from None

    def _final(self, reply: Reply) -> None:
        """A last word before closing; the client may already be gone."""
        try:
            self.respond(reply)
            self.flush()
        except ClientGone:
            pass

    # ---------------------------------------------------------- the loop

    def run(self) -> None:
        """Serve the client until QUIT, a fatal error, or the connection ends."""
        metrics = self.runtime.metrics
        metrics.connection_opened()  # every accepted connection counts, one with a bad PROXY header too
        try:
            if not self._proxy_expected() or self._read_proxy_header():
                self._serve()
        finally:
            metrics.connection_closed()
            if self.relay.in_data:
                self.relay.drop(polite=False)
            else:
                self.relay.finish()
            self.channel.close(polite=not self.lifecycle.stopping)

    def _serve(self) -> None:
        try:
            self.respond(Reply.of(220, f"{self.config.domain} ESMTP Willi"))
            while not self.closing:
                line = self._next_command()
                if line is None:
                    return
                self.dispatch(line)
            self.flush()
            # Closed for too many errors in the middle of a transaction: it still gets its log line.
            self.abort_transaction("too many errors")
        except ClientTimeout:
            self._final(Reply.of(421, f"4.4.2 {self.config.domain} Timeout, closing connection"))
            self.end_transaction("aborted", error="client timeout", error_src="client")
        except Shutdown:
            self._say_shutdown()
            self.end_transaction("aborted", error="Willi is stopping", error_src="proxy")
        except ClientGone as exc:
            self.end_transaction("aborted", error=f"client disconnected: {exc}", error_src="client")
        except Exception:
            log.exception("sid=%s client=%s unexpected error", self.sid, self.client)
            self._final(Reply.of(451, "4.3.0 Internal error, try again later"))
            self.end_transaction("failed", error="internal error", error_src="proxy")

    def _say_shutdown(self) -> None:
        self._final(Reply.of(421, f"4.3.2 {self.config.domain} Service shutting down, try again later"))

    def _command_deadline(self) -> float:
        timeout = self.config.read_timeout
        if self.admission.stressed():
            timeout = min(timeout, self.config.stress_read_timeout)
        return time.monotonic() + timeout

    def _next_command(self) -> bytes | None:
        """The next command line; None after telling an idle client that Willi is shutting down."""
        idle = self.tx is None
        lifecycle = self.lifecycle
        while True:
            # `idle` is set before the flags are read: a drain that starts now either
            # finds this session idle (and wakes it) or is seen here.
            self.idle = idle
            if not self.channel.has_line():
                self.flush()
                if lifecycle.stopping or (idle and lifecycle.draining):
                    self.idle = False
                    self._say_shutdown()
                    self.abort_transaction("Willi is stopping", by_client=False)
                    return None
            try:
                return self.channel.readline(self.config.max_command_line, self._command_deadline(),
                                             lifecycle.idle_wake if idle else lifecycle.busy_wake)
            except LineTooLong:
                self.reply(500, "5.5.2 Line too long")
                if self.closing:
                    return None
            except TimedOut:
                raise ClientTimeout() from None
            except (Woken, Closed) as exc:
                if lifecycle.stopping or (idle and lifecycle.draining):
                    self._say_shutdown()
                    self.abort_transaction("Willi is stopping", by_client=False)
                    return None
                if isinstance(exc, Woken):
                    continue
                raise ClientGone(str(exc)) from None
            finally:
                self.idle = False

    def dispatch(self, line: bytes) -> None:
        verb, arg = split_command(line)
        if self.debug:
            log.debug("sid=%s C: %s", self.sid, line.rstrip(b"\r\n")[:200].decode("utf-8", "surrogateescape"))
        handler = self.HANDLERS.get(verb)
        if verb in JUNK_VERBS:
            self.junk += 1
            if self.junk > self.config.max_junk_commands:
                self._final(Reply.of(421, f"4.7.0 {self.config.domain} Too many {verb} commands, closing connection"))
                self.abort_transaction(verb)
                self.closing = True
                return
        if handler is not None:
            try:
                handler(self, arg)
            except (ClientGone, ClientTimeout, Shutdown):
                raise
            except Exception:
                if self.relay.in_data:
                    raise  # the rest of the message must never be read as commands: close
                log.exception("sid=%s client=%s unexpected error in %s", self.sid, self.client, verb)
                self.relay.drop(polite=False)
                self.end_transaction("failed", error=f"internal error in {verb}", error_src="proxy")
                self.respond(Reply.of(451, "4.3.0 Internal error, try again later"), own=False)
        elif verb in REFUSED_VERBS:
            self.reply(502, "5.5.1 Command not implemented")
        else:
            self.reply(500, "5.5.2 Command unrecognized")

    # ---------------------------------------------------------- PROXY protocol

    def _proxy_expected(self) -> bool:
        hosts = self.config.proxy_protocol_hosts
        if not hosts:
            return False
        from ipaddress import ip_address

        try:
            ip = ip_address(self.peer.addr)
        except ValueError:
            return False
        return any(ip in net for net in hosts)

    def _read_proxy_header(self) -> bool:
        """Read the load balancer's PROXY header before anything is sent; False: close silently."""
        from willi.proxyproto import ProxyHeaderError, parse_proxy_header

        deadline = time.monotonic() + self.config.proxy_protocol_timeout
        balancer = self.peer.endpoint
        try:
            while True:
                try:
                    header = parse_proxy_header(bytes(self.channel.buffer))
                except ProxyHeaderError as exc:
                    log.warning("proxy=%s bad PROXY header, connection closed: %s", balancer, exc)
                    return False
                if header is not None:
                    break
                self.channel.fill(deadline, self.lifecycle.busy_wake, size=512)
        except TimedOut:
            log.warning("proxy=%s no complete PROXY header within %gs, connection closed", balancer,
                        self.config.proxy_protocol_timeout)
            return False
        except (Closed, Woken) as exc:
            log.warning("proxy=%s connection ended before its PROXY header was complete: %s", balancer, exc)
            return False
        del self.channel.buffer[: header.length]
        if header.local or header.source is None:
            return True  # a health check from the balancer itself: the real peer is the client
        self.peer = self.peer.behind(header.source, header.destination)
        refusal = self.admission.rekey(self.peer.addr)
        if refusal is not None:
            log.warning("client=%s proxy=%s refused: %s", self.client, balancer, refusal)
            self._final(Reply.of(421, refusal))
            return False
        return True

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
        self.relay.new_identity()  # an XCLIENT'd upstream connection would carry the old HELO
        self.helo, self.esmtp = arg, esmtp
        if not esmtp:
            self.respond(Reply.of(250, self.config.domain))
            return
        self.respond(self.runtime.ehlo_reply(starttls=self.tls is None))

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: STARTTLS")
        elif self.tls is not None:
            self.reply(503, "5.5.1 Already in TLS")
        elif self.runtime.server_tls is None:
            self.reply(454, "4.7.0 TLS not available")
        else:
            self.respond(Reply.of(220, "2.0.0 Ready to start TLS"))
            self.flush()
            try:
                self.channel.start_tls(self.runtime.server_tls, time.monotonic() + self.config.read_timeout,
                                       server_side=True)
            except TimedOut:
                raise ClientGone("TLS handshake timed out") from None
            except Closed as exc:
                raise ClientGone(str(exc)) from None
            self.tls = getattr(self.channel.sock, "version", lambda: "TLS")() or "TLS"
            self.abort_transaction("STARTTLS")
            self.relay.new_identity()
            self.helo, self.esmtp = None, False

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply(501, "5.5.4 Syntax: RSET")
            return
        self.abort_transaction("RSET")
        self.relay.rset()
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
        self.respond(Reply.of(221, f"2.0.0 {self.config.domain} Bye"))
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
        if len(tx.recipients) >= self.config.max_recipients:
            tx.excess += 1
            reply, source = Reply.of(452, "4.5.3 Too many recipients"), "proxy"
        else:
            reply, source = self.relay.recipient(tx, recipient)
        if reply.code // 100 != 2:
            tx.refused.add(recipient, reply.code)
            tx.last_refusal = (reply, source)
        metrics = self.runtime.metrics
        if metrics.enabled:
            metrics.recipient(_recipient_result(reply))
        self.respond(reply, own=source != "upstream")
        if tx.excess > RECIPIENT_OVERSHOOT:
            self._count_error()  # like Postfix's recipient overshoot: a flood ends the connection

    def smtp_DATA(self, arg: str) -> None:
        tx = self.tx
        if arg:
            self.reply(501, "5.5.4 Syntax: DATA")
            return
        if tx is None:
            self.reply(503, "5.5.1 Need MAIL before DATA")
            return
        if tx.broken is not None:
            self.respond(tx.broken, own=False)
            self.end_transaction("failed", reply=tx.broken, error="upstream connection lost", error_src="upstream")
            return
        if not tx.recipients or self.relay.conn is None:
            self.reply(503, "5.5.1 No valid recipients")
            return
        reply = self.relay.data(tx)
        if reply.code != 354:
            self.respond(reply, own=False)
            failed = reply.code == 451 and self.relay.conn is None
            self.end_transaction("failed" if failed else "rejected", reply=reply, error="upstream refused DATA",
                                 error_src="upstream")
            return
        self.respond(reply, own=False)
        self.flush()
        outcome = self.relay.stream(tx, self._data_reader(), self._unread)
        self.respond(outcome.reply, own=outcome.error_src == "client")
        self.end_transaction(outcome.result, reply=outcome.reply, size=outcome.size, error=outcome.error,
                             error_src=outcome.error_src)

    def _unread(self, data: bytes) -> None:
        if data:
            self.channel.buffer[:0] = data

    def _data_reader(self) -> Callable[[], bytes]:
        """Chunks of the message: within `read_timeout`, then at least `min_data_rate` bytes per second."""
        timeout, rate = self.config.read_timeout, self.config.min_data_rate
        deadline = time.monotonic() + timeout
        channel, wake, lifecycle = self.channel, self.lifecycle.busy_wake, self.lifecycle

        def read() -> bytes:
            nonlocal deadline
            if channel.buffer:
                return channel.take_buffer()
            try:
                data = channel.recv(deadline, wake, DATA_CHUNK)
            except TimedOut:
                raise ClientTimeout() from None
            except (Closed, Woken) as exc:
                if lifecycle.stopping:
                    raise Shutdown() from None
                raise ClientGone(str(exc)) from None
            if not data:
                if lifecycle.stopping:
                    raise Shutdown()
                raise ClientGone("connection closed by client during DATA")
            deadline = min(time.monotonic() + timeout, deadline + len(data) / rate)
            return data

        return read

    # ---------------------------------------------------------- transaction record

    def abort_transaction(self, why: str, *, by_client: bool = True) -> None:
        """Forget the envelope (RSET, QUIT, STARTTLS, HELO; or Willi stopping), logging it if it got anywhere."""
        tx = self.tx
        if tx is not None and tx.recipients:
            if by_client:
                self.end_transaction("aborted", error=f"client sent {why}", error_src="client")
            else:
                self.end_transaction("aborted", error=why, error_src="proxy")
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
        upstream = tx.upstream or self.relay.describe()
        fields: dict[str, object] = {
            "result": result,
            "client": self.client,
            "proxy": self.peer.proxy,
            "helo": self.helo,
            "tls": self.tls or False,
            "from": f"<{tx.sender}>",
            "to": ",".join(f"<{r}>" for r in tx.recipients) or None,
            "refused": str(tx.refused) if tx.refused else None,
            "upstream": upstream.get("upstream") or (tx.route.endpoint if tx.route else None),
            "upstream_addr": upstream.get("upstream_addr"),
            "upstream_tls": upstream.get("upstream_tls") if upstream else None,
            "xclient": upstream.get("xclient") if upstream else None,
            "size": size,
            "reply": str(reply) if reply is not None else None,
            "duration_ms": int((time.monotonic() - tx.started) * 1000),
            "sid": self.sid,
            "error": error,
            "error_src": error_src,
        }
        txlog.info("%s", logfmt(fields))
        self.runtime.metrics.transaction(result)

    HANDLERS: dict[str, Callable[[SmtpSession, str], None]] = {}


def _recipient_result(reply: Reply) -> str:
    """accept, reject, tempfail or split, for willi_recipients_total."""
    if reply.code // 100 == 2:
        return "accept"
    if reply.code // 100 == 5:
        return "reject"
    if reply.code == 452 and reply.lines and reply.lines[0].startswith("4.5.3 Recipient routed elsewhere"):
        return "split"
    return "tempfail"


SmtpSession.HANDLERS = {
    name[len("smtp_"):]: func for name, func in vars(SmtpSession).items() if name.startswith("smtp_")
}

"""One client transaction towards the upstream: routing each recipient, the upstream's life, DATA.

The dialog (`session.py`) decides what the client may do next; this module
decides where its recipients go and what the upstream says about them, as
Postfix keeps smtpd.c and smtpd_proxy.c apart. Per client connection there
is at most one upstream connection at a time, and one client transaction is
at most one upstream transaction (design.md, invariant 2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from willi.address import has_routing_syntax
from willi.mappings.base import MappingError
from willi.protocol import AddressError, DataFramer, Reply
from willi.resolver import LookupFailed
from willi.route import Route
from willi.upstream.client import ClientIdentity, UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from willi.runtime import Runtime

log = logging.getLogger("willi.relay")

#: Refused recipients named in the log line; the rest are counted.
REFUSED_SHOWN = 10
LOST = Reply.of(451, "4.4.2 Upstream connection lost, try again later")
SPLIT = Reply.of(452, "4.5.3 Recipient routed elsewhere: send it in a separate transaction")


class Refusals:
    """Refused recipients of one transaction: all counted, the first few kept for the log."""

    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.count = 0
        self.items: list[tuple[str, int]] = []

    def add(self, recipient: str, code: int) -> None:
        self.count += 1
        if len(self.items) < REFUSED_SHOWN:
            self.items.append((recipient, code))

    def __bool__(self) -> bool:
        return self.count > 0

    def __str__(self) -> str:
        """`<a@x>:554,<b@y>:452` (and `,+N more` past the first few)."""
        text = ",".join(f"<{r}>:{code}" for r, code in self.items)
        return text + (f",+{self.count - len(self.items)} more" if self.count > len(self.items) else "")


@dataclass(slots=True)
class Transaction:
    """The envelope of one MAIL..DATA exchange and what became of it."""

    sender: str
    params: dict[str, str | None]
    started: float = field(default_factory=time.monotonic)
    recipients: list[str] = field(default_factory=list)
    route: Route | None = None
    refused: Refusals = field(default_factory=Refusals)
    last_refusal: tuple[Reply, str] | None = None  # (reply, who decided) for the log
    smtputf8: bool = False
    broken: Reply | None = None  # the upstream transaction died after a recipient was accepted
    excess: int = 0  # recipients past max_recipients
    upstream: dict[str, object] = field(default_factory=dict)  # upstream fields of the log line


@dataclass(frozen=True)
class Outcome:
    """How a transaction ended, for the reply and the log line."""

    result: str  # accepted, rejected, failed, aborted
    reply: Reply
    size: int | None = None
    error: str | None = None
    error_src: str | None = None


def relayable(reply: Reply) -> Reply:
    """An upstream reply as the client hears it: verbatim, except that 421 becomes 451.

    A 421 from Willi would tell the client that *its* connection closes,
    while only the upstream's did; 451 with the upstream's own text keeps
    the meaning (try later) without that lie.
    """
    return Reply(451, reply.lines) if reply.code == 421 else reply


class Relay:
    """The upstream side of one client connection."""

    __slots__ = ("client_tls", "config", "conn", "identity", "in_data", "route", "runtime", "sid")

    def __init__(self, runtime: Runtime, sid: str, identity: Callable[[], ClientIdentity],
                 client_tls: Callable[[], bool]) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.sid = sid
        self.identity = identity
        self.client_tls = client_tls
        self.conn: UpstreamConnection | None = None
        self.route: Route | None = None  # the route self.conn serves
        self.in_data = False

    # ---------------------------------------------------------- recipients

    def recipient(self, tx: Transaction, address: str) -> tuple[Reply, str]:
        """The reply for one recipient and who decided it: proxy, lookup or upstream."""
        if tx.broken is not None:
            return tx.broken, "upstream"
        local = address.rpartition("@")[0]
        if not self.config.allow_untrusted_routing and has_routing_syntax(local):
            return Reply.of(554, f"5.7.1 <{address}>: Sender-specified routing is not accepted here"), "proxy"
        started = time.monotonic()
        try:
            resolution = self.runtime.resolver.resolve(address)
        except AddressError as exc:
            return Reply.of(553, f"5.1.3 Bad recipient address: {exc}"), "proxy"
        except (LookupFailed, MappingError) as exc:
            log.error("sid=%s lookup failed: %s", self.sid, exc)
            return Reply.of(451, "4.3.0 Recipient lookup failed, try again later"), "lookup"
        metrics = self.runtime.metrics
        if metrics.enabled:
            metrics.lookup(resolution.label or "none", time.monotonic() - started)
            metrics.lookup_cache(resolution.cached)
        route = resolution.route
        if route is None:
            return Reply.of(554, f"5.7.1 <{address}>: Relay access denied"), "lookup"
        if tx.route is not None and not route.same_upstream(tx.route):
            return SPLIT, "proxy"
        return self._upstream_rcpt(tx, route, address), "upstream"

    def _upstream_rcpt(self, tx: Transaction, route: Route, address: str) -> Reply:
        """Ask the upstream about `address`, opening its transaction first when needed."""
        try:
            if self.conn is not None and self.conn.in_transaction and route.same_upstream(self.route):
                reply = self.conn.rcpt(address)
            else:
                reply = self._begin(tx, route, address)
        except UpstreamError as exc:
            log.warning("sid=%s upstream=%s %s", self.sid, route.endpoint, exc.reason)
            self.drop(polite=False)
            if tx.recipients:
                # Recipients already accepted went down with the connection:
                # the client must hear a 4xx at DATA and retry the whole message.
                tx.broken = LOST
            return relayable(exc.reply)
        if reply.code // 100 == 2:
            tx.recipients.append(address)
            tx.route = route
            tx.upstream = self.describe()
        if self.conn is None or not self.conn.alive:
            # It hung up (a 421): the recipients it had accepted are gone with it.
            self.drop(polite=False)
            if tx.recipients:
                tx.broken = LOST
        return relayable(reply)

    def _begin(self, tx: Transaction, route: Route, address: str) -> Reply:
        """Get a connection for `route` and send MAIL and the first RCPT; the RCPT's reply.

        A reused connection (pooled, or kept from this client's previous
        transaction) that turns out dead or says 421 before anything of this
        transaction was accepted is replaced once, transparently: its 421 is
        never the verdict on this message.
        """
        deadline = time.monotonic() + self.config.recipient_timeout
        for attempt in (1, 2):
            conn, reused = self._connection_for(route, deadline)
            params = conn.upstream_params(tx.params)
            if params is None:
                return Reply.of(550, "5.6.7 Upstream server does not support SMTPUTF8")
            conn.cap = deadline
            try:
                mail_reply, rcpt_reply = conn.mail_and_rcpt(tx.sender, params, address)
            except UpstreamError:
                if reused and attempt == 1:
                    self.drop(polite=False)
                    continue
                raise
            finally:
                conn.cap = None
            if mail_reply.code == 421 and reused and attempt == 1:
                self.drop(polite=False)
                continue
            if mail_reply.code != 250:
                return mail_reply  # the client's MAIL was already answered: this refusal answers the RCPT
            assert rcpt_reply is not None
            return rcpt_reply
        raise AssertionError("unreachable")

    def _connection_for(self, route: Route, deadline: float | None = None) -> tuple[UpstreamConnection, bool]:
        """(connection, reused) for `route`: the one we have when it serves the route, a pooled one, or new."""
        conn = self.conn
        if conn is not None and conn.alive and route.same_upstream(self.route):
            if conn.in_transaction:
                conn.rset()
            if conn.alive and not conn.channel.pending():  # type: ignore[union-attr]
                return conn, True
        self.drop()
        identity = self.identity()
        prefetch = None
        if self.config.client_name_lookup and self.runtime.connector.xclient_mode(route) != "off":
            def prefetch() -> None:  # a new connection may ask for NAME: overlap the lookup with connecting
                self.runtime.dns.prefetch_reverse(identity.addr)
        conn, pooled = self.runtime.connector.open(route, identity, self.client_tls(), self.sid, prefetch, deadline)
        self.conn, self.route = conn, route
        return conn, pooled

    # ---------------------------------------------------------- data

    def data(self, tx: Transaction) -> Reply:
        """Send DATA; the 354 to pass on, or the reply that ends the transaction."""
        assert self.conn is not None
        try:
            reply = self.conn.data()
        except UpstreamError as exc:
            self.drop(polite=False)
            return exc.reply
        if reply.code != 354 and self.conn is not None and self.conn.alive:
            self.conn.rset()
        return relayable(reply) if reply.code != 354 else reply

    def stream(self, tx: Transaction, read: Callable[[], bytes], unread: Callable[[bytes], None]) -> Outcome:
        """Copy the message through the framer; the dot goes upstream only if all went well.

        Client-side failures (disconnect, timeout) propagate from `read`
        after the upstream connection was dropped without the dot.
        """
        framer = DataFramer()
        failure: Reply | None = None
        error = error_src = ""
        reject_bare = self.config.bare_newline == "reject"
        limit = self.config.max_message_bytes
        conn = self.conn
        assert conn is not None
        self.in_data = True
        try:
            while True:
                out, rest = framer.feed(read())
                if failure is None:
                    if framer.size > limit:
                        failure = Reply.of(552, f"5.3.4 Message exceeds size limit of {limit} octets")
                        error, error_src = "message too large", "client"
                    elif reject_bare and framer.violation:
                        failure = Reply.of(550, "5.5.2 Bare CR, bare LF or NUL in message; use CRLF line ends")
                        error, error_src = "bare newline", "client"
                    elif framer.done:
                        break
                    elif out:
                        try:
                            conn.send_data(out)
                        except UpstreamError as exc:
                            failure, error, error_src = exc.reply, exc.reason, "upstream"
                    if failure is not None:
                        self.drop(polite=False)  # no final dot, ever
                if framer.done:
                    break
        except BaseException:
            # in_data stays set: the session must end now, never read the rest of the message as commands
            # (SmtpSession.dispatch re-raises while in_data; a client-side failure ends the session anyway).
            self.drop(polite=False)
            raise
        unread(rest)
        self.in_data = False
        if failure is not None:
            result = "rejected" if error_src == "client" else "failed"
            return Outcome(result, failure, framer.size, error, error_src)
        try:
            reply = conn.end_data(out)
        except UpstreamError as exc:
            self.drop(polite=False)
            return Outcome("failed", exc.reply, framer.size, exc.reason, "upstream")
        self.runtime.metrics.message_bytes(framer.size)
        if reply.code // 100 == 2:
            return Outcome("accepted", reply, framer.size)
        return Outcome("rejected", relayable(reply), framer.size, "upstream refused message", "upstream")

    # ---------------------------------------------------------- the connection's life

    def rset(self) -> None:
        """The client's RSET: abort the upstream transaction too."""
        if self.conn is not None and self.conn.in_transaction:
            self.conn.rset()

    def new_identity(self) -> None:
        """HELO/EHLO/STARTTLS again: a connection that carried XCLIENT now names a stale HELO/TLS."""
        if self.conn is not None and (self.conn.xclient or self.conn.in_transaction):
            self.drop()

    def drop(self, *, polite: bool = True) -> None:
        """Let go of the upstream connection: QUIT (polite) or close without a word."""
        conn, self.conn, self.route = self.conn, None, None
        if conn is not None:
            conn.quit() if polite else conn.close(polite=False)

    def finish(self) -> None:
        """The client connection is over: a clean connection goes back to the pool, others QUIT."""
        conn, route = self.conn, self.route
        self.conn = self.route = None
        if conn is None:
            return
        if self.in_data or route is None:
            conn.close(polite=False)
            return
        if conn.in_transaction:
            conn.rset()
        self.runtime.connector.release(route, conn, self.client_tls())

    def abort(self) -> None:
        """Forced stop: break the upstream connection under the session's thread."""
        if self.conn is not None:
            self.conn.abort()

    def describe(self) -> dict[str, object]:
        """The upstream fields of the log record."""
        conn = self.conn
        if conn is None:
            return {}
        return {
            "upstream": conn.endpoint,
            "upstream_addr": conn.address if not conn.hop.is_address else None,
            "upstream_tls": conn.tls_info or False,
            "xclient": conn.xclient,
        }

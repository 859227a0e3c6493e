"""Getting a usable upstream connection for a route: reuse, failover, down-marking.

A route names upstreams in order (a next-hop list; a host name with several
addresses counts as several upstreams, in the resolver's order). Willi tries
at most `upstream_address_limit` addresses, as Postfix's
smtp_mx_address_limit, and moves to the next only while nothing of the
transaction has reached the client: a refused or timed-out connection, a
greeting other than 220 (421 included), a refused EHLO, a failed or missing
STARTTLS the route requires, a refused or missing XCLIENT. When all fail,
the client hears the reply for the last failure.

An address that could not be connected to (refused, timed out, or silent
instead of greeting) is marked down for `upstream_down_time` and skipped
while another is available, so a dead host costs one client a timeout, not
every client; when every address is down they are tried anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator

from willi.config import Config
from willi.dns import DNS, DnsError, DnsPool
from willi.metrics import Metrics
from willi.route import Hop, Route, format_endpoint
from willi.tls import UpstreamTls
from willi.upstream.client import (
    ClientIdentity,
    Timeouts,
    TlsPolicy,
    UpstreamConnection,
    UpstreamError,
    unreachable,
)
from willi.upstream.pool import UpstreamPool

log = logging.getLogger("willi.upstream")

XCLIENT_WARNING_INTERVAL = 3600.0
#: Failures that mean "this address is not there": worth marking it down.
DOWN_STAGES = frozenset({"connect"})


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class DownList:
    """Addresses that failed to connect, with the time until which they are skipped."""

    def __init__(self, down_time: float) -> None:
        self.down_time = down_time
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, endpoint: str) -> None:
        with self._lock:
            self._until[endpoint] = time.monotonic() + self.down_time
            if len(self._until) > 4096:  # forget the oldest; the list only saves time
                for key in sorted(self._until, key=self._until.__getitem__)[:1024]:
                    del self._until[key]

    def clear(self, endpoint: str) -> None:
        if endpoint in self._until:
            with self._lock:
                self._until.pop(endpoint, None)

    def is_down(self, endpoint: str) -> bool:
        until = self._until.get(endpoint)
        return until is not None and until > time.monotonic()


class Connector:
    """Opens (or reuses) the connection a route's transaction goes out on."""

    def __init__(self, config: Config, tls: UpstreamTls, pool: UpstreamPool | None, metrics: Metrics,
                 dns: DnsPool = DNS) -> None:
        self.config = config
        self.tls = tls
        self.pool = pool
        self.metrics = metrics
        self.dns = dns
        self.down = DownList(config.upstream_down_time)
        self.timeouts = Timeouts(config.upstream_connect_timeout, config.upstream_command_timeout,
                                 config.upstream_data_timeout)
        self._warned: dict[str, float] = {}

    # ---------------------------------------------------------- policy

    def tls_policy(self, route: Route, client_tls: bool) -> TlsPolicy:
        """STARTTLS towards the route's upstreams: the route's `tls` level, else the global policy."""
        if route.tls is not None:
            mode, verify = {"none": ("none", False), "may": ("may", False), "encrypt": ("required", False),
                            "verify": ("required", True)}[route.tls]
        else:
            policy = self.config.upstream_starttls
            wanted = policy == "always" or (policy == "client" and client_tls)
            mode, verify = ("may" if wanted else "none"), route.tls_verify
        return TlsPolicy(mode, verify, self.tls.for_route(verify) if mode != "none" else None)

    def xclient_mode(self, route: Route) -> str:
        return route.xclient or self.config.xclient

    def pool_key(self, route: Route, tls: TlsPolicy) -> Hashable:
        return (route.key, tls.mode, tls.verify)

    # ---------------------------------------------------------- connecting

    def open(self, route: Route, identity: ClientIdentity | None, client_tls: bool, sid: str,
             before_connect: Callable[[], None] | None = None,
             deadline: float | None = None) -> tuple[UpstreamConnection, bool]:
        """A connection ready for MAIL, and whether it came from the pool.

        A pooled connection is clean (its last transaction ended with the
        final reply, which resets an SMTP server's state, or with RSET) and
        was checked for anything it said while idle; its first command is
        the final test, and the caller replaces it once if that fails.
        `before_connect` runs when a new connection is needed. No attempt
        goes on past `deadline` (the recipient_timeout of the RCPT being
        answered), however many upstreams the route lists. Raises
        UpstreamError with the reply for the last failure.
        """
        tls = self.tls_policy(route, client_tls)
        mode = self.xclient_mode(route)
        if self.pool is not None and mode != "required":
            conn = self.pool.take(self.pool_key(route, tls))
            if conn is not None:
                conn.sid = sid
                self.metrics.upstream_connect("reused")
                return conn, True
        if before_connect is not None:
            before_connect()
        return self.connect(route, tls, identity if mode != "off" else None, mode, sid, deadline), False

    def connect(self, route: Route, tls: TlsPolicy, identity: ClientIdentity | None, mode: str,
                sid: str, deadline: float | None = None) -> UpstreamConnection:
        """A new connection, failing over along the route's first `upstream_address_limit` addresses.

        The limit cuts the list first, as Postfix's smtp_mx_address_limit
        does; within it, addresses marked down are tried only after all the
        others failed.
        """
        failures: list[UpstreamError] = []
        skipped: list[tuple[Hop, int, tuple]] = []
        seen = 0
        for hop, family, sockaddr in self.addresses(route, sid, failures):
            seen += 1
            if seen > self.config.upstream_address_limit or _past(deadline):
                break
            endpoint = format_endpoint(sockaddr[0], sockaddr[1])
            if self.down.is_down(endpoint):
                skipped.append((hop, family, sockaddr))
                log.info("sid=%s upstream=%s skipped: marked down after a failed connection", sid, endpoint)
                continue
            try:
                return self._try(hop, family, sockaddr, tls, identity, mode, sid, deadline)
            except UpstreamError as exc:
                failures.append(exc)
        for hop, family, sockaddr in skipped:
            if _past(deadline):
                break
            try:
                return self._try(hop, family, sockaddr, tls, identity, mode, sid, deadline)
            except UpstreamError as exc:
                failures.append(exc)
        raise failures[-1] if failures else unreachable(f"no address to try for {route.endpoint}")

    def _try(self, hop: Hop, family: int, sockaddr: tuple, tls: TlsPolicy, identity: ClientIdentity | None,
             mode: str, sid: str, deadline: float | None = None) -> UpstreamConnection:
        endpoint = format_endpoint(sockaddr[0], sockaddr[1])
        conn = UpstreamConnection(hop, local_name=self.config.domain, timeouts=self.timeouts, session_id=sid)
        conn.cap = deadline
        started = time.monotonic()
        try:
            conn.setup(family, sockaddr, tls, identity, mode)
        except UpstreamError as exc:
            conn.close(polite=False)
            timed_out = "timeout" in exc.reason and exc.stage == "greeting"
            if exc.stage in DOWN_STAGES or timed_out:
                self.down.mark(endpoint)
            self.metrics.upstream_connect("failed")
            log.info("sid=%s upstream=%s (%s) failed at %s: %s", sid, hop.endpoint, endpoint, exc.stage, exc.reason)
            raise
        self.down.clear(endpoint)
        self.metrics.upstream_connect("ok", time.monotonic() - started)
        if mode == "on" and identity is not None and not conn.xclient:
            self._warn_no_xclient(hop.endpoint)
        return conn

    def addresses(self, route: Route, sid: str, failures: list[UpstreamError]) -> Iterator[tuple[Hop, int, tuple]]:
        """Every address of every hop, in order; a host name that does not resolve is skipped (and logged)."""
        for hop in route.hops:
            try:
                addresses = self.dns.resolve(hop.host, hop.port, self.config.upstream_connect_timeout)
            except DnsError as exc:
                log.info("sid=%s upstream=%s skipped: %s", sid, hop.endpoint, exc)
                failures.append(unreachable(f"{hop.endpoint}: {exc}"))
                continue
            for family, sockaddr in addresses:
                yield hop, family, sockaddr

    def _warn_no_xclient(self, endpoint: str) -> None:
        """Once an hour per upstream: it sees Willi's address, not the client's."""
        now = time.monotonic()
        if now - self._warned.get(endpoint, -XCLIENT_WARNING_INTERVAL) >= XCLIENT_WARNING_INTERVAL:
            self._warned[endpoint] = now
            log.warning("upstream=%s does not offer XCLIENT: it sees Willi's address, not the client's; "
                        "allow Willi in its smtpd_authorized_xclient_hosts, or set xclient = false (or "
                        "\"required\") to make the choice explicit", endpoint)

    def release(self, route: Route, conn: UpstreamConnection, client_tls: bool) -> bool:
        """The client connection is done with `conn`: back to the pool if clean, else QUIT."""
        if self.pool is None:
            conn.quit()
            return False
        return self.pool.put(self.pool_key(route, self.tls_policy(route, client_tls)), conn)


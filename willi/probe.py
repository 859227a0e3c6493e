"""`willi --probe ADDRESS`: walk a route's upstream dialog to RCPT and back, like `swaks --quit-after RCPT`.

It routes ADDRESS exactly as a transaction would (the mapping chain, the
route's upstream list and its TLS and XCLIENT policy), then talks to the
upstream step by step, one line per step with its timing: connect, greeting,
EHLO, STARTTLS (protocol, cipher, certificate, verified or not), XCLIENT
(offered? accepted? which attributes), MAIL FROM, RCPT TO with the
upstream's verbatim reply, RSET, QUIT. Nothing is ever delivered: the probe
never sends DATA.

XCLIENT names Willi's own side of the upstream connection (its address,
its domain as HELO), so the probe shows whether the upstream accepts
XCLIENT from Willi at all.

Exit status: 0 the recipient would be accepted, 1 refused, 2 a temporary
failure (lookup failed, unreachable, 4xx).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

from willi.address import has_routing_syntax
from willi.config import Config
from willi.dns import UNAVAILABLE
from willi.metrics import Metrics
from willi.protocol import AddressError, parse_path
from willi.resolver import LookupFailed, build_resolver
from willi.route import Hop, Route, format_endpoint
from willi.tls import upstream_contexts
from willi.upstream.client import ClientIdentity, TlsPolicy, UpstreamConnection, UpstreamError
from willi.upstream.connector import Connector

ACCEPTED, REFUSED, TEMPORARY = 0, 1, 2


class Probe:
    """One probe run; `say` prints a line."""

    def __init__(self, config: Config, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.started = time.monotonic()

    def step(self, what: str, started: float) -> None:
        self.say(f"{what} ({(time.monotonic() - started) * 1000:.1f} ms)")

    def run(self, address: str, sender: str = "") -> int:
        try:
            parse_path(f"TO:<{address}>", "TO", utf8=True)
            if sender:
                parse_path(f"FROM:<{sender}>", "FROM", utf8=True)
        except (ValueError, AddressError) as exc:
            self.say(f"bad address: {exc}")
            return REFUSED
        if not self.config.allow_untrusted_routing and has_routing_syntax(address.rpartition("@")[0]):
            self.say(f"route: {address} carries sender-specified routing: a client would get 554 5.7.1")
            return REFUSED
        resolver = build_resolver(self.config)
        try:
            started = time.monotonic()
            try:
                resolution = resolver.resolve(address)
            except (LookupFailed, AddressError) as exc:
                self.say(f"route: lookup failed: {exc} (a client would get 451 4.3.0)")
                return TEMPORARY
            route = resolution.route
            if route is None:
                self.step(f"route: no mapping knows {address} (a client would get 554 5.7.1 Relay access denied)",
                          started)
                return REFUSED
            connector = Connector(self.config, upstream_contexts(self.config.upstream_tls_ca), None, Metrics())
            tls = connector.tls_policy(route, client_tls=False)
            mode = connector.xclient_mode(route)
            self.step(f"route: mapping={resolution.mapping} key={resolution.key} upstreams={route.endpoint} "
                      f"{route.describe_tls(self.config.upstream_starttls)} -> starttls={tls.mode}"
                      f"{' verified' if tls.verify and tls.mode != 'none' else ''} xclient={mode}", started)
            return self._walk(connector, route, tls, mode, address, sender)
        finally:
            resolver.close()

    def _walk(self, connector: Connector, route: Route, tls: TlsPolicy, mode: str, address: str,
              sender: str) -> int:
        failures: list[UpstreamError] = []
        tried = 0
        for hop, family, sockaddr in connector.addresses(route, "probe", failures):
            if tried >= self.config.upstream_address_limit:
                break
            tried += 1
            result = self._one(connector, hop, family, sockaddr, tls, mode, address, sender)
            if result is not None:
                return result
        if not tried:
            for failure in failures:
                self.say(f"upstream: {failure.reason}")
        self.say("result: no upstream could be used (a client would get a 4xx and retry)")
        return TEMPORARY

    def _one(self, connector: Connector, hop: Hop, family: int, sockaddr: tuple, tls: TlsPolicy, mode: str,
             address: str, sender: str) -> int | None:
        """Probe one address; None when it failed before MAIL (the next one would be tried)."""
        endpoint = format_endpoint(sockaddr[0], sockaddr[1])
        conn = UpstreamConnection(hop, local_name=self.config.domain, timeouts=connector.timeouts)
        started = time.monotonic()
        try:
            conn.connect(family, sockaddr, started + self.config.upstream_connect_timeout)
            self.step(f"connect: {hop.endpoint} ({endpoint}) ok", started)
            t = time.monotonic()
            greeting = conn.read_reply(self.config.upstream_connect_timeout, stage="greeting")
            self.step(f"greeting: {greeting}", t)
            if greeting.code != 220:
                self.say("greeting refused: the next upstream would be tried")
                return None
            t = time.monotonic()
            conn.hello(self.config.domain)
            self.step(f"EHLO {self.config.domain}: extensions {' '.join(_shown(conn.extensions)) or '(none)'}", t)
            if tls.mode != "none":
                if "STARTTLS" in conn.extensions and tls.context is not None:
                    t = time.monotonic()
                    conn.starttls(tls)
                    self.step(f"STARTTLS: {self._tls_line(conn, tls)}", t)
                    self.say(f"EHLO again: extensions {' '.join(_shown(conn.extensions)) or '(none)'}")
                elif tls.mode == "required":
                    self.say("STARTTLS: not offered, but the route requires it (a client would get 451 4.7.5)")
                    return None
                else:
                    self.say("STARTTLS: not offered; the transaction would go on in plaintext")
            if mode != "off":
                if "XCLIENT" in conn.extensions:
                    identity = self._identity(conn)
                    offered = conn.extensions["XCLIENT"]
                    sent = " ".join(f"{k}={v}" for k, v in identity.attributes(set(offered.upper().split())))
                    t = time.monotonic()
                    conn.send_xclient(identity)
                    self.step(f"XCLIENT offered ({offered}); sent {sent}: accepted", t)
                elif mode == "required":
                    self.say("XCLIENT: not offered, but xclient = \"required\" (a client would get 451 4.7.0)")
                    return None
                else:
                    self.say("XCLIENT: not offered: the upstream would see Willi's address, not the client's")
            t = time.monotonic()
            mail = conn.command(f"MAIL FROM:<{sender}>")
            self.step(f"MAIL FROM:<{sender}>: {mail}", t)
            if mail.code // 100 != 2:
                self._goodbye(conn)
                return REFUSED if mail.code // 100 == 5 else TEMPORARY
            t = time.monotonic()
            rcpt = conn.rcpt(address)
            self.step(f"RCPT TO:<{address}>: {rcpt}", t)
            self._goodbye(conn)
            verdict = {2: ACCEPTED, 5: REFUSED}.get(rcpt.code // 100, TEMPORARY)
            self.say(f"result: {['accepted', 'refused', 'temporary failure'][verdict]} (nothing was delivered)")
            return verdict
        except UpstreamError as exc:
            self.step(f"{exc.stage}: failed: {exc.reason} -> a client would get {exc.reply}", started)
            conn.close(polite=False)
            return None if exc.stage in ("connect", "greeting", "ehlo", "starttls", "xclient") else TEMPORARY

    def _goodbye(self, conn: UpstreamConnection) -> None:
        t = time.monotonic()
        try:
            reply = conn.command("RSET")
            self.step(f"RSET: {reply}", t)
        except UpstreamError as exc:
            self.say(f"RSET: {exc.reason}")
        conn.quit()
        self.say("QUIT")

    def _identity(self, conn: UpstreamConnection) -> ClientIdentity:
        assert conn.channel is not None
        local = conn.channel.sock.getsockname()
        return ClientIdentity(addr=local[0], port=local[1], helo=self.config.domain, esmtp=True, tls=False,
                              name=lambda: UNAVAILABLE)

    @staticmethod
    def _tls_line(conn: UpstreamConnection, tls: TlsPolicy) -> str:
        assert conn.channel is not None
        sock = conn.channel.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        subject = "certificate not checked"
        if tls.verify:
            cert = sock.getpeercert() or {}
            parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
            subject = f"certificate {', '.join(parts) or '?'}, verified (chain and host name)"
        return f"{sock.version()} {cipher[0] if cipher else '?'}, {subject}"


def _shown(extensions: dict[str, str]) -> list[str]:
    return [f"{k} {v}".strip() for k, v in extensions.items()]


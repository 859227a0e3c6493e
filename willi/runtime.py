"""What a session needs and a reload replaces as a whole: configuration, mappings, TLS, upstream side.

Built once per (re)load, in the process that serves (a worker), as the user
it serves as; sessions keep the runtime they started with, so a reload never
changes a dialog midway. Both the server and the session import it from
here, so neither imports the other.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from willi import metrics as metrics_module
from willi.config import Config
from willi.dns import DNS, DnsPool
from willi.metrics import Metrics
from willi.protocol import Reply
from willi.resolver import Resolver, build_resolver
from willi.tls import UpstreamTls, server_context, upstream_contexts
from willi.upstream.connector import Connector
from willi.upstream.pool import UpstreamPool


@dataclass
class Runtime:
    """The loaded configuration and everything built from it."""

    config: Config
    resolver: Resolver
    server_tls: ssl.SSLContext | None
    upstream_tls: UpstreamTls
    connector: Connector
    pool: UpstreamPool | None
    metrics: Metrics
    dns: DnsPool = DNS
    _ehlo: dict[bool, Reply] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Load mappings and TLS material; raises on any unusable file."""
        server_tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        upstream_tls = upstream_contexts(config.upstream_tls_ca)
        metrics = metrics_module.METRICS
        pool = UpstreamPool(config.upstream_idle_timeout, config.upstream_max_transactions) \
            if config.upstream_reuse else None
        connector = Connector(config, upstream_tls, pool, metrics)
        runtime = cls(config, build_resolver(config), server_tls, upstream_tls, connector, pool, metrics)
        runtime._ehlo = {offer: runtime._build_ehlo(offer) for offer in (False, True)}
        return runtime

    @classmethod
    def load(cls, config: Config) -> Runtime:
        """Build, then load every mapping now (a CSV must parse), as the user that will serve."""
        from willi.mappings.base import MappingError

        runtime = cls.build(config)
        try:
            for mapping in runtime.resolver.mappings:
                mapping.refresh()
        except MappingError:
            runtime.close()
            raise
        return runtime

    def _build_ehlo(self, starttls: bool) -> Reply:
        c = self.config
        lines = [c.domain, "PIPELINING", f"SIZE {c.max_message_bytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if c.smtputf8:
            lines.append("SMTPUTF8")
        if starttls and self.server_tls is not None:
            lines.append("STARTTLS")
        return Reply(250, tuple(lines))

    def ehlo_reply(self, *, starttls: bool) -> Reply:
        """The EHLO answer, built once per runtime: STARTTLS only with a certificate and before TLS."""
        return self._ehlo[starttls]

    def close(self) -> None:
        self.resolver.close()
        if self.pool is not None:
            self.pool.close()

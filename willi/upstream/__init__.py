"""The upstream side: the client (`client`), connection reuse (`pool`), failover (`connector`)."""

from willi.upstream.client import (
    ClientIdentity,
    Timeouts,
    TlsPolicy,
    UpstreamConnection,
    UpstreamError,
    UpstreamRefused,
)
from willi.upstream.connector import Connector
from willi.upstream.pool import UpstreamPool

__all__ = ["ClientIdentity", "Connector", "Timeouts", "TlsPolicy", "UpstreamConnection", "UpstreamError",
           "UpstreamPool", "UpstreamRefused"]

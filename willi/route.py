"""The result of a mapping lookup: which upstreams a recipient goes to, and how.

A mapping's `server` is one upstream or an ordered, comma-separated list of
them, as Postfix 3.5+ writes next-hop lists: `mx1.example.net:25,
[2001:db8::5]:25, 10.0.0.7`. Willi tries them in order (design.md, "The
upstream side": fail over only before anything reached the client).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORT = 25
#: Postfix's smtp_tls_security_level names, as the per-route `tls` column takes them.
TLS_LEVELS = ("none", "may", "encrypt", "verify")
XCLIENT_MODES = ("off", "on", "required")
MAX_HOPS = 16

_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?\Z")


def format_endpoint(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets: the one way Willi writes an endpoint."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=1024)
def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class RouteSyntaxError(ValueError):
    """A `server`, `tls_verify` or `tls` value that cannot be understood."""


@dataclass(frozen=True)
class Hop:
    """One upstream: a host name or an IP address, and a port."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def endpoint(self) -> str:
        """`host:port`, IPv6 literals in brackets, as logs and CSV write it."""
        return format_endpoint(self.host, self.port)

    @property
    def is_address(self) -> bool:
        return _is_address(self.host)


@dataclass(frozen=True)
class Route:
    """Where a recipient goes: upstreams in order, and the TLS/XCLIENT policy for them.

    `tls_verify` keeps the original meaning (check the certificate whenever
    TLS is used). `tls`, when a mapping gives it, decides instead, with
    Postfix's levels. `xclient`, when a mapping gives it, overrides the
    global `xclient` setting.
    """

    hops: tuple[Hop, ...]
    tls_verify: bool = True
    tls: str | None = None
    xclient: str | None = None

    @classmethod
    def single(cls, host: str, port: int = DEFAULT_PORT, tls_verify: bool = True) -> Route:
        """A route to one upstream (what most mappings name)."""
        return cls((Hop(host, port),), tls_verify)

    @property
    def endpoint(self) -> str:
        return ", ".join(hop.endpoint for hop in self.hops)

    def same_upstream(self, other: Route | None) -> bool:
        """Two routes can share one upstream transaction when everything about the upstream agrees."""
        return other is not None and self.key == other.key

    @property
    def key(self) -> tuple[object, ...]:
        """Identity of the destination: hops (case-insensitive hosts) and policies."""
        return (tuple((h.host.lower(), h.port) for h in self.hops), self.tls_verify, self.tls, self.xclient)

    def describe_tls(self, starttls_policy: str) -> str:
        """The effective TLS policy in words, for --lookup and --probe."""
        if self.tls is not None:
            return f"tls={self.tls} (from the mapping)"
        verify = "verified" if self.tls_verify else "not verified"
        return f"tls=opportunistic (upstream_starttls={starttls_policy}, certificate {verify} when used)"


def parse_hop(text: str) -> Hop:
    """Parse `host`, `host:port`, `[v6]` or `[v6]:port`; port 25 when absent."""
    value = text.strip()
    if not value:
        raise RouteSyntaxError("empty server")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise RouteSyntaxError(f"unclosed '[' in server {text!r}")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise RouteSyntaxError(f"not an IPv6 address in brackets: {text!r}") from None
        if not rest:
            return Hop(host, DEFAULT_PORT)
        if not rest.startswith(":"):
            raise RouteSyntaxError(f"unexpected text after ']' in server {text!r}")
        return Hop(host, _parse_port(rest[1:], text))
    if value.count(":") > 1:
        raise RouteSyntaxError(f"IPv6 server must be written as [addr]:port: {text!r}")
    host, sep, port = value.partition(":")
    if not _HOSTNAME.match(host):
        raise RouteSyntaxError(f"bad host in server {text!r}")
    return Hop(host.rstrip("."), _parse_port(port, text) if sep else DEFAULT_PORT)


def parse_server(text: str) -> tuple[str, int]:
    """The first hop of a server value as (host, port); kept for callers that need one."""
    hop = parse_server_list(text)[0]
    return hop.host, hop.port


def parse_server_list(text: str) -> tuple[Hop, ...]:
    """`mx1:25, [2001:db8::5]:25, 10.0.0.7` -> three hops in that order."""
    if not text.strip():
        raise RouteSyntaxError("empty server")
    parts = text.split(",")
    if len(parts) > MAX_HOPS:
        raise RouteSyntaxError(f"more than {MAX_HOPS} upstreams in server {text!r}")
    hops = tuple(parse_hop(part) for part in parts)
    if len(set(hops)) != len(hops):
        raise RouteSyntaxError(f"an upstream is listed twice in server {text!r}")
    return hops


def _parse_port(port: str, text: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RouteSyntaxError(f"bad port in server {text!r}")
    return int(port)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_tls_verify(value: object) -> bool:
    """Accept bool, 0/1 and the usual words; absent (None or empty) means true."""
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value in (0, 1):
            return bool(value)
        raise RouteSyntaxError(f"tls_verify must be 0 or 1, not {value}")
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    text = str(value).strip().lower()
    if text == "" or text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RouteSyntaxError(f"tls_verify must be true or false, not {value!r}")


def parse_tls_level(value: object) -> str | None:
    """`none`, `may`, `encrypt`, `verify`; absent (None or empty) means "not given"."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in TLS_LEVELS:
        raise RouteSyntaxError(f"tls must be one of {', '.join(TLS_LEVELS)}, not {value!r}")
    return text


def make_route(server: str, tls_verify: object = None, tls: object = None, xclient: str | None = None) -> Route:
    """Build a Route from a mapping's raw `server`, `tls_verify` and `tls` values."""
    return Route(hops=parse_server_list(server), tls_verify=parse_tls_verify(tls_verify),
                 tls=parse_tls_level(tls), xclient=xclient)

"""The result of a mapping lookup: which upstream a recipient goes to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 25


class RouteSyntaxError(ValueError):
    """A `server` or `tls_verify` value that cannot be understood."""


@dataclass(frozen=True)
class Route:
    """An upstream SMTP server and whether its TLS certificate is verified."""

    host: str
    port: int = DEFAULT_PORT
    tls_verify: bool = True

    @property
    def endpoint(self) -> str:
        """`host:port`, with IPv6 literals in brackets, as logs and CSV write it."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def same_upstream(self, other: Route | None) -> bool:
        """Two routes share a connection when host, port and TLS policy agree."""
        return other is not None and (self.host.lower(), self.port, self.tls_verify) == (
            other.host.lower(),
            other.port,
            other.tls_verify,
        )


def parse_server(text: str) -> tuple[str, int]:
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
            return host, DEFAULT_PORT
        if not rest.startswith(":"):
            raise RouteSyntaxError(f"unexpected text after ']' in server {text!r}")
        return host, _parse_port(rest[1:], text)
    if value.count(":") > 1:
        raise RouteSyntaxError(f"IPv6 server must be written as [addr]:port: {text!r}")
    host, sep, port = value.partition(":")
    if not host or any(c.isspace() for c in host):
        raise RouteSyntaxError(f"bad host in server {text!r}")
    return host, (_parse_port(port, text) if sep else DEFAULT_PORT)


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


def make_route(server: str, tls_verify: object = None) -> Route:
    """Build a Route from a mapping's raw `server` and `tls_verify` values."""
    host, port = parse_server(server)
    return Route(host=host, port=port, tls_verify=parse_tls_verify(tls_verify))

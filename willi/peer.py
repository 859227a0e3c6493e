"""Who the client is: one value for limits, XCLIENT, logs and metrics.

Learned once per connection, from the accepted socket or, behind a load
balancer, from its PROXY header (design.md, "Behind a load balancer"); from
then on every part of Willi uses this value and never the socket's address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace

from willi.route import format_endpoint


def normalize_ip(addr: str) -> str:
    """`::ffff:192.0.2.1` -> `192.0.2.1`; other addresses in their canonical text form."""
    if ":" not in addr:
        return addr
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True, slots=True)
class Peer:
    """The client's address and port, where it connected to, and how Willi learned it."""

    addr: str
    port: int
    local_addr: str = ""
    local_port: int = 0
    #: The load balancer's endpoint when the address came from a PROXY header.
    proxy: str | None = None

    @classmethod
    def from_socket(cls, sock: socket.socket, address: tuple, listener: tuple | None = None) -> Peer:
        """The peer of an accepted socket. `listener` is the listening address: when it is not a
        wildcard it is the local address too, which saves a getsockname() per connection."""
        if listener is not None and listener[0] not in ("0.0.0.0", "::"):
            local_addr, local_port = normalize_ip(listener[0]), listener[1]
        else:
            try:
                local = sock.getsockname()
                local_addr, local_port = normalize_ip(local[0]), local[1]
            except OSError:
                local_addr, local_port = "", 0
        return cls(normalize_ip(address[0]), address[1], local_addr, local_port)

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.addr, self.port)

    def behind(self, source: tuple[str, int], destination: tuple[str, int] | None) -> Peer:
        """The real client a PROXY header named; this peer becomes the `proxy`."""
        dest_addr, dest_port = destination if destination else (self.local_addr, self.local_port)
        return replace(self, addr=normalize_ip(source[0]), port=source[1], local_addr=normalize_ip(dest_addr),
                       local_port=dest_port, proxy=self.endpoint)

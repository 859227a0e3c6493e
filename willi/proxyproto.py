"""A pure, strict parser for the PROXY protocol header, versions 1 and 2.

A load balancer in front of Willi prepends this header (HAProxy's
doc/proxy-protocol.txt) to each connection so that Willi learns the real
client's address. Willi has its own parser because no well-kept PyPI library
does this for a blocking, thread-per-connection server: the one candidate,
`proxy-protocol`, is built around asyncio streams, is marked "3 - Alpha" and
has a single maintainer. The protocol is small; a pure function over the bytes
read so far is easy to test exhaustively and keeps socket handling in the
session.

`parse_proxy_header(data)` is called again after each read: it returns None
while `data` is still a valid prefix of a header, a `ProxyHeader` once one is
complete, and raises `ProxyHeaderError` as soon as `data` can never become
one. It never looks past the header (those bytes belong to SMTP), never needs
more than `MAX_HEADER` bytes, and its error messages never quote the input.

Where the specification lets the receiver choose, the choice is the strict one:

- Version 1: the line ends at its first CR or LF, which must be a CRLF within
  the first 107 octets (107 octets without one fail at once, no more are
  waited for); a bare CR or LF anywhere is an error (the spec forbids a lone
  CR or LF as line end). Exactly one space between fields, only "TCP4",
  "TCP6" and "UNKNOWN". Partial lines are waited for (the spec recommends
  tolerance), but a wrong protocol keyword fails at once.
- Version 1 addresses: dotted-quad IPv4 without leading zeros (spec), IPv6 in
  hex/colon notation with an optional trailing dotted quad (the IPv4-mapped
  form HAProxy emits), no zone index; ports 0..65535 without sign or leading
  zero. Addresses come back in `ipaddress`'s normal form (IPv4-mapped ones
  as "::ffff:192.0.2.1", RFC 5952 section 5, whatever the Python version).
- "UNKNOWN": the rest of the line is ignored whatever it holds (spec: "must
  ignore"), apart from the CR/LF rule above; the result is local.
- Version 2, PROXY command: TCP over IPv4 (0x11) or IPv6 (0x21) gives the
  addresses. UNSPEC (0x00) is accepted as local: there are no addresses, so
  all the octets after the 16-byte header are TLVs. UNIX stream (0x31) is
  accepted as local, since a socket path is no client address; its 216-octet
  address block is skipped unread. UDP and UNIX datagram (0x12, 0x22, 0x32)
  are rejected: on a TCP listener they can only come from a misconfigured
  sender (the spec lets a receiver treat combinations it does not implement
  as UNSPEC, and lets UNSPEC be rejected). Any other family byte is rejected
  (spec).
- Version 2, LOCAL command: always local; the family byte is never rejected
  and the addresses are never read (spec: "discard the protocol block
  including the family"). The family byte only tells how many address octets
  to skip (none for UNSPEC and for values the spec does not define; HAProxy
  itself reads the TLVs of every LOCAL header right after the 16 octets); the
  rest are TLVs, checked as under PROXY. Locating TLVs the same way under both commands means a CRC
  also protects LOCAL headers, and a PROXY header whose command nibble got
  corrupted into LOCAL still fails its CRC.
- Version 2 length: always honoured; the declared address block must fit in
  it and the TLVs must fill the rest exactly. A header longer than
  MAX_HEADER (4096) octets is refused as soon as the length field arrives.
  The 16-bit field allows 64 KiB, which a broken balancer would make Willi
  buffer per connection before the greeting; the spec designs headers to fit
  in a 536-octet segment, and what Willi can use is 16 + 12 or 36 octets of
  addresses plus a few short TLVs (ALPN, authority, unique ID of at most 128
  octets, CRC, cloud endpoint IDs), far below 4096. Only a client-certificate
  TLV (PP2_SUBTYPE_SSL_CLIENT_CERT) can get near it: do not have the balancer
  send one to Willi.
- TLVs: PP2_TYPE_CRC32C must be 4 octets and match (spec), and may appear at
  most once (the spec speaks of "the checksum field"). All other TLVs are kept
  in order, uninterpreted. A CRC is optional in the spec, so a header without
  one is accepted: the CRC catches every corruption of a header that still
  carries it, not one that turned the CRC TLV's type byte into another type.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_MAX = 107  # whole v1 line incl. CRLF
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family, length
MAX_HEADER = 4096  # our bound for a v2 header (16 + length), see the docstring

LOCAL, PROXY = 0x0, 0x1
TCP4, TCP6, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x31, 0x00
PP2_TYPE_CRC32C = 0x03

# Octets of the address block for each family/protocol byte the spec defines.
_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_PROXY_FAMILIES = frozenset({UNSPEC, TCP4, TCP6, UNIX_STREAM})

_V1_KEYWORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ")
_LINE_END = re.compile(rb"[\r\n]")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"(?:" + _OCTET + rb"\.){3}" + _OCTET)
_IPV6 = re.compile(rb"[0-9A-Fa-f:]*(?:" + _IPV4.pattern + rb")?")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """A malformed header; the connection is closed silently."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a complete header says about the connection."""

    version: int  # 1 or 2
    local: bool  # v2 LOCAL command, v1 UNKNOWN, v2 AF_UNSPEC: use the real peer
    source: tuple[str, int] | None  # (address, port) of the real client; None when local
    destination: tuple[str, int] | None  # (address, port) the client connected to; None when local
    length: int  # octets the header occupies at the start of the stream
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 TLVs (type, value), in order, already validated


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse a header at the start of `data`.

    None: `data` is a valid prefix of a header and more bytes are needed.
    ProxyHeaderError: `data` can never become a valid header.
    Bytes after the header are not looked at (they belong to SMTP).
    """
    head = bytes(data[:MAX_HEADER])  # no header is longer; bounds all work below
    if head[: len(V1_PREFIX)] == V1_PREFIX[: len(head)]:
        return _parse_v1(head) if len(head) >= len(V1_PREFIX) else None
    if head[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(head)]:
        return _parse_v2(head)
    raise ProxyHeaderError("not a PROXY protocol header")


# ---------------------------------------------------------------- version 1


def _parse_v1(head: bytes) -> ProxyHeader | None:
    """Find the line's end under the CRLF and 107-octet rules, then parse it."""
    match = _LINE_END.search(head, 0, V1_MAX)
    if match is None:
        if len(head) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line without CRLF in its first 107 octets")
        return _v1_partial(head)
    end = match.start()
    if head[end] == ord("\n"):
        raise ProxyHeaderError("PROXY v1 line ends with a bare LF")
    if end + 1 >= V1_MAX:
        raise ProxyHeaderError("PROXY v1 line longer than 107 octets")
    if end + 1 == len(head):
        return _v1_partial(head[:end])
    if head[end + 1] != ord("\n"):
        raise ProxyHeaderError("PROXY v1 line contains a bare CR")
    return _v1_line(head[:end], end + 2)


def _v1_partial(line: bytes) -> None:
    """Wait for the rest of a line, unless its protocol keyword is already wrong."""
    rest = line[len(V1_PREFIX) :]
    if not any(keyword.startswith(rest[: len(keyword)]) for keyword in _V1_KEYWORDS):
        raise ProxyHeaderError("PROXY v1 line with an unknown protocol")
    return None


def _v1_line(line: bytes, length: int) -> ProxyHeader:
    """Parse one complete line (without its CRLF) into a header."""
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        return ProxyHeader(version=1, local=True, source=None, destination=None, length=length)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 line with an unknown protocol")
    if len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 line needs exactly two addresses and two ports, one space apart")
    address = _v1_ipv4 if protocol == b"TCP4" else _v1_ipv6
    return ProxyHeader(
        version=1,
        local=False,
        source=(address(fields[2]), _v1_port(fields[4])),
        destination=(address(fields[3]), _v1_port(fields[5])),
        length=length,
    )


def _v1_ipv4(text: bytes) -> str:
    if not _IPV4.fullmatch(text):
        raise ProxyHeaderError("PROXY v1 TCP4 line with an invalid IPv4 address")
    return str(ipaddress.IPv4Address(text.decode("ascii")))


def _v1_ipv6(text: bytes) -> str:
    if _IPV6.fullmatch(text):
        try:
            return _ipv6_text(ipaddress.IPv6Address(text.decode("ascii")))
        except ValueError:
            pass
    raise ProxyHeaderError("PROXY v1 TCP6 line with an invalid IPv6 address")


def _ipv6_text(address: ipaddress.IPv6Address) -> str:
    """str(), except IPv4-mapped addresses in RFC 5952's mixed notation, which
    Python only uses from 3.13 on (3.11 gives "::ffff:102:304")."""
    mapped = address.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def _v1_port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError("PROXY v1 line with an invalid port")
    return int(text)


# ---------------------------------------------------------------- version 2


def _parse_v2(head: bytes) -> ProxyHeader | None:
    """Check each field as soon as it has arrived, then the whole header."""
    if len(head) <= 12:
        return None
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError("PROXY v2 header with a version other than 2")
    if command not in (LOCAL, PROXY):
        raise ProxyHeaderError("PROXY v2 header with an unknown command")
    if len(head) == 13:
        return None
    family = head[13]
    if command == PROXY and family not in _PROXY_FAMILIES:
        raise ProxyHeaderError("PROXY v2 header with an unsupported address family or protocol")
    if len(head) < V2_FIXED:
        return None
    total = V2_FIXED + int.from_bytes(head[14:16], "big")
    if total > MAX_HEADER:
        raise ProxyHeaderError(f"PROXY v2 header longer than {MAX_HEADER} octets")
    tlv_start = V2_FIXED + _ADDRESS_SIZE.get(family, 0)
    if tlv_start > total:
        raise ProxyHeaderError("PROXY v2 address block does not fit in the header length")
    if len(head) < total:
        return None
    header = head[:total]
    tlvs = _v2_tlvs(header, tlv_start)
    if command == LOCAL or family not in (TCP4, TCP6):
        return ProxyHeader(version=2, local=True, source=None, destination=None, length=total, tlvs=tlvs)
    size = 4 if family == TCP4 else 16
    block = header[V2_FIXED:tlv_start]
    ports = block[2 * size :]
    return ProxyHeader(
        version=2,
        local=False,
        source=(_v2_address(block[:size]), int.from_bytes(ports[:2], "big")),
        destination=(_v2_address(block[size : 2 * size]), int.from_bytes(ports[2:], "big")),
        length=total,
        tlvs=tlvs,
    )


def _v2_address(packed: bytes) -> str:
    """4 octets are IPv4, 16 are IPv6, in network byte order."""
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    return _ipv6_text(ipaddress.IPv6Address(packed))


def _v2_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """Split header[offset:] into TLVs that fill it exactly; verify a CRC32C."""
    tlvs = []
    while offset < len(header):
        if offset + 3 > len(header):
            raise ProxyHeaderError("PROXY v2 TLV header runs past the end of the header")
        kind, start = header[offset], offset + 3
        offset = start + int.from_bytes(header[offset + 1 : start], "big")
        if offset > len(header):
            raise ProxyHeaderError("PROXY v2 TLV runs past the end of the header")
        value = header[start:offset]
        if kind == PP2_TYPE_CRC32C:
            if any(seen == PP2_TYPE_CRC32C for seen, _ in tlvs):
                raise ProxyHeaderError("PROXY v2 header with more than one CRC32C TLV")
            _check_crc(header, start, value)
        tlvs.append((kind, value))
    return tuple(tlvs)


def _check_crc(header: bytes, start: int, value: bytes) -> None:
    """The spec's check: the CRC of the header with the field zeroed equals the field."""
    if len(value) != 4:
        raise ProxyHeaderError("PROXY v2 CRC32C TLV is not 4 octets long")
    zeroed = header[:start] + bytes(4) + header[start + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyHeaderError("PROXY v2 header fails its CRC32C check")


# ---------------------------------------------------------------- CRC32C


def _crc32c_table() -> tuple[int, ...]:
    """The byte-at-a-time table for the reflected Castagnoli polynomial."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of `data`.

    A Python loop per byte is fine here: it runs once per connection over at
    most MAX_HEADER octets, never on the DATA path.
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC32C_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF

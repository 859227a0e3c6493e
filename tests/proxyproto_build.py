"""Build PROXY protocol headers the way a load balancer sends them, for tests.

The parser's tests and the end-to-end tests (a client that pretends to be
HAProxy) use these. The CRC here is a bitwise implementation of its own, so
that a bug in willi.proxyproto's table-driven crc32c cannot hide itself by
being on both sides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
COMMANDS = {"LOCAL": 0x20, "PROXY": 0x21}  # version 2 in the high nibble
FAMILY_TCP4, FAMILY_TCP6, FAMILY_UNSPEC = 0x11, 0x21, 0x00
TYPE_CRC32C, TYPE_NOOP = 0x03, 0x04

Tlv = tuple[int, bytes]


def _version(src: str, dst: str) -> int:
    """4 or 6, the same for both addresses (a header has one family)."""
    versions = {ipaddress.ip_address(src).version, ipaddress.ip_address(dst).version}
    if len(versions) != 1:
        raise ValueError(f"{src} and {dst} are not of the same address family")
    return versions.pop()


def build_v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v1 line; the address text is sent exactly as given (tests may pass
    uppercase or uncompressed IPv6 to check normalization)."""
    return f"PROXY TCP{_version(src, dst)} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_v1_unknown(rest: bytes = b"") -> bytes:
    """`PROXY UNKNOWN\\r\\n`, or with `rest` after one space (receivers ignore it)."""
    return b"PROXY UNKNOWN" + (b" " + rest if rest else b"") + b"\r\n"


def encode_tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def build_v2(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    command: str = "PROXY",
    tlvs: Iterable[Tlv] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header for TCP over the addresses' family, `tlvs` after the addresses
    (crc: see build_v2_raw)."""
    family = FAMILY_TCP4 if _version(src, dst) == 4 else FAMILY_TCP6
    addresses = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    body = addresses + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return build_v2_raw(COMMANDS[command], family, body, tlvs=tlvs, crc=crc)


def build_v2_local(*, tlvs: Iterable[Tlv] = (), crc: bool = False) -> bytes:
    """A LOCAL header as HAProxy sends it for health checks: UNSPEC, no addresses."""
    return build_v2_raw(COMMANDS["LOCAL"], FAMILY_UNSPEC, tlvs=tlvs, crc=crc)


def build_v2_raw(
    ver_cmd: int,
    family: int,
    body: bytes = b"",
    *,
    tlvs: Iterable[Tlv] = (),
    crc: bool = False,
    length: int | None = None,
) -> bytes:
    """Signature, the two given bytes, the length, `body`, then `tlvs`: also for
    headers no well-behaved sender builds. `length` declares another length
    than the real one.

    crc=True fills in a CRC32C TLV: the first (3, 4 bytes) TLV of `tlvs` if there
    is one (so a test can place it anywhere), else one put first, where HAProxy
    puts it.
    """
    tlvs = list(tlvs)
    if crc and not any(kind == TYPE_CRC32C for kind, _ in tlvs):
        tlvs.insert(0, (TYPE_CRC32C, bytes(4)))
    rest = body + b"".join(encode_tlv(kind, value) for kind, value in tlvs)
    declared = len(rest) if length is None else length
    header = bytearray(V2_SIGNATURE + bytes([ver_cmd, family]) + declared.to_bytes(2, "big") + rest)
    if crc:
        index = next(i for i, (kind, _) in enumerate(tlvs) if kind == TYPE_CRC32C)
        field = 16 + len(body) + sum(3 + len(value) for _, value in tlvs[:index]) + 3
        header[field : field + 4] = bytes(4)
        header[field : field + 4] = crc32c_bitwise(bytes(header)).to_bytes(4, "big")
    return bytes(header)


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time: slow, obvious, independent of the parser's table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF

"""The PROXY protocol parser against HAProxy's doc/proxy-protocol.txt.

Exact results for valid headers (including ones captured from a real HAProxy),
one test per way a header can be wrong (each checked for its reason, so that a
header is not rejected by luck for another one), and properties: any valid
header followed by anything parses to exactly its fields, every strict prefix
asks for more, reads split anywhere give the same result, arbitrary bytes
never raise anything but ProxyHeaderError, and a CRC catches corruption.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyproto_build import (
    TYPE_CRC32C,
    TYPE_NOOP,
    V2_SIGNATURE,
    build_v1,
    build_v1_unknown,
    build_v2,
    build_v2_local,
    build_v2_raw,
    crc32c_bitwise,
    encode_tlv,
)

from willi.proxyproto import MAX_HEADER, V1_MAX, ProxyHeader, ProxyHeaderError, crc32c, parse_proxy_header

H = ProxyHeader
V4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (40312).to_bytes(2, "big") + (25).to_bytes(2, "big")
UNIX_BLOCK = b"/run/lb.sock".ljust(108, b"\0") + b"/run/willi.sock".ljust(108, b"\0")
FFFF6 = ":".join(["ffff"] * 8)
SSL_VALUE = b"\x01\x00\x00\x00\x00" + encode_tlv(0x21, b"TLSv1.3")  # PP2_CLIENT_SSL, verified, version sub-TLV

# Captured from HAProxy 2.6.12 (Debian 12): `send-proxy-v2 proxy-v2-options
# crc32c,unique-id` with `unique-id-format ABC-%ci`, and a health check with
# `check-send-proxy`. Independent of this module and of tests/proxyproto_build.
HAPROXY_V2_CRC_UNIQUE_ID = (
    b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00#\x7f\x00\x00\x01\x7f\x00\x00\x01\x86L\xce\x11"
    b"\x03\x00\x04\xafx\xaf\xa1\x05\x00\rABC-127.0.0.1"
)
HAPROXY_V2_IPV6_CRC = (
    b"\r\n\r\n\x00\r\nQUIT\n!!\x00.\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\xb9$\xd9}\x03\x00\x04\x99\x1b\xebT\x05\x00\x00"
)
HAPROXY_LOCAL_CRC = b"\r\n\r\n\x00\r\nQUIT\n \x00\x00\x07\x03\x00\x04\xa9\xb8~\x8f"


def header_tlv_offsets(header: bytes) -> list[int]:
    """Where each TLV of a well-formed TCP4/TCP6/UNSPEC v2 header starts."""
    offset = 16 + {0x11: 12, 0x21: 36, 0x00: 0}[header[13]]
    offsets = []
    while offset < len(header):
        offsets.append(offset)
        offset += 3 + int.from_bytes(header[offset + 1 : offset + 3], "big")
    return offsets


def filled_in(header: bytes, tlvs: list[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """`tlvs` as sent in `header`: with the CRC value the builder filled in."""
    offsets = header_tlv_offsets(header)
    return tuple(
        (kind, header[offset + 3 : offset + 7] if kind == TYPE_CRC32C else value)
        for (kind, value), offset in zip(tlvs, offsets, strict=True)
    )


# ---------------------------------------------------------------- valid headers

VALID = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n",
        H(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
        id="v1-tcp4-spec-example",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        H(1, False, ("255.255.255.255", 65535), ("255.255.255.255", 65535), 56),
        id="v1-tcp4-longest",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 25\r\nEHLO",
        H(1, False, ("0.0.0.0", 0), ("10.0.0.1", 25), 34),
        id="v1-tcp4-zeros",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::5 2001:db8::25 40312 25\r\n",
        H(1, False, ("2001:db8::5", 40312), ("2001:db8::25", 25), 46),
        id="v1-tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0005 ::1 1 2\r\n",
        H(1, False, ("2001:db8::5", 1), ("::1", 2), 60),
        id="v1-tcp6-uncompressed-uppercase-normalized",
    ),
    pytest.param(
        b"PROXY TCP6 ::FFFF:192.0.2.1 ::ffff:c000:207 1 2\r\n",
        H(1, False, ("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.7", 2), 49),
        id="v1-tcp6-ipv4-mapped",
    ),
    pytest.param(
        b"PROXY TCP6 " + FFFF6.encode() + b" " + FFFF6.encode() + b" 65535 65535\r\n",
        H(1, False, (FFFF6, 65535), (FFFF6, 65535), 104),
        id="v1-tcp6-longest",
    ),
    pytest.param(b"PROXY UNKNOWN\r\nEHLO", H(1, True, None, None, 15), id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN \r\n", H(1, True, None, None, 16), id="v1-unknown-space"),
    pytest.param(
        b"PROXY UNKNOWN " + FFFF6.encode() + b" " + FFFF6.encode() + b" 65535 65535\r\n",
        H(1, True, None, None, 107),
        id="v1-unknown-worst-case-107",
    ),
    pytest.param(
        b"PROXY UNKNOWN \x00\xff\t anything  at all\r\n", H(1, True, None, None, 36), id="v1-unknown-rest-ignored"
    ),
    pytest.param(
        build_v2("203.0.113.5", "198.51.100.1", 40312, 25) + b"EHLO x\r\n",
        H(2, False, ("203.0.113.5", 40312), ("198.51.100.1", 25), 28),
        id="v2-tcp4",
    ),
    pytest.param(
        build_v2("2001:db8::5", "2001:db8::25", 65535, 0),
        H(2, False, ("2001:db8::5", 65535), ("2001:db8::25", 0), 52),
        id="v2-tcp6",
    ),
    pytest.param(
        build_v2("::ffff:203.0.113.5", "2001:db8::25", 1, 25),
        H(2, False, ("::ffff:203.0.113.5", 1), ("2001:db8::25", 25), 52),
        id="v2-tcp6-ipv4-mapped",
    ),
    pytest.param(build_v2_local() + b"EHLO", H(2, True, None, None, 16), id="v2-local"),
    pytest.param(
        build_v2("192.0.2.1", "192.0.2.2", 1, 2, command="LOCAL"),
        H(2, True, None, None, 28),
        id="v2-local-addresses-ignored",
    ),
    pytest.param(
        build_v2_raw(0x20, 0xFF, tlvs=[(TYPE_NOOP, b"")]),
        H(2, True, None, None, 19, ((TYPE_NOOP, b""),)),
        id="v2-local-undefined-family-ignored",
    ),
    pytest.param(build_v2_raw(0x20, 0x12, bytes(12)), H(2, True, None, None, 28), id="v2-local-dgram-family-ignored"),
    pytest.param(build_v2_raw(0x21, 0x00), H(2, True, None, None, 16), id="v2-proxy-unspec"),
    pytest.param(
        build_v2_raw(0x21, 0x00, tlvs=[(0x01, b"smtp")]),
        H(2, True, None, None, 23, ((0x01, b"smtp"),)),
        id="v2-proxy-unspec-tlvs",
    ),
    pytest.param(build_v2_raw(0x21, 0x31, UNIX_BLOCK), H(2, True, None, None, 232), id="v2-unix-stream"),
    pytest.param(
        build_v2_raw(0x21, 0x31, UNIX_BLOCK, tlvs=[(0x30, b"netns")]),
        H(2, True, None, None, 240, ((0x30, b"netns"),)),
        id="v2-unix-stream-tlvs",
    ),
    pytest.param(
        build_v2_raw(0x21, 0x11, V4_BLOCK + b"\x01\x00\x02h2\x02\x00\x0amx.example\x04\x00\x00\xe0\x00\x01\xff"),
        H(
            2,
            False,
            ("192.0.2.1", 40312),
            ("198.51.100.7", 25),
            53,
            ((0x01, b"h2"), (0x02, b"mx.example"), (TYPE_NOOP, b""), (0xE0, b"\xff")),
        ),
        id="v2-tlvs-in-order",
    ),
    pytest.param(
        build_v2_raw(0x21, 0x11, V4_BLOCK, tlvs=[(0x20, SSL_VALUE)]),
        H(2, False, ("192.0.2.1", 40312), ("198.51.100.7", 25), 46, ((0x20, SSL_VALUE),)),
        id="v2-ssl-tlv-kept-whole",
    ),
    pytest.param(
        build_v2("192.0.2.1", "198.51.100.7", 40312, 25, tlvs=[(TYPE_NOOP, bytes(MAX_HEADER - 16 - 12 - 3))]),
        H(2, False, ("192.0.2.1", 40312), ("198.51.100.7", 25), MAX_HEADER, ((TYPE_NOOP, bytes(MAX_HEADER - 31)),)),
        id="v2-exactly-max-header",
    ),
    pytest.param(
        HAPROXY_V2_CRC_UNIQUE_ID + b"EHLO x\r\n",
        H(2, False, ("127.0.0.1", 34380), ("127.0.0.1", 52753), 51, ((3, b"\xafx\xaf\xa1"), (5, b"ABC-127.0.0.1"))),
        id="haproxy-v2-crc-unique-id",
    ),
    pytest.param(
        HAPROXY_V2_IPV6_CRC,
        H(2, False, ("::1", 47396), ("::1", 55677), 62, ((3, b"\x99\x1b\xebT"), (5, b""))),
        id="haproxy-v2-ipv6-crc",
    ),
    pytest.param(HAPROXY_LOCAL_CRC, H(2, True, None, None, 23, ((3, b"\xa9\xb8~\x8f"),)), id="haproxy-local-crc"),
    pytest.param(
        b"PROXY TCP6 ::1 ::1 47122 51969\r\nEHLO x\r\n",
        H(1, False, ("::1", 47122), ("::1", 51969), 32),
        id="haproxy-v1-tcp6",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header(data: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(data) == expected


@pytest.mark.parametrize(
    "tlvs",
    [
        pytest.param([(TYPE_CRC32C, bytes(4))], id="crc-only"),
        pytest.param([(TYPE_CRC32C, bytes(4)), (0x01, b"smtp"), (0x05, b"id-1")], id="crc-first"),
        pytest.param([(0x01, b"smtp"), (TYPE_CRC32C, bytes(4)), (0x05, b"id-1")], id="crc-between"),
        pytest.param([(0x01, b"smtp"), (0x05, b"id-1"), (TYPE_CRC32C, bytes(4))], id="crc-last"),
    ],
)
def test_valid_crc(tlvs: list[tuple[int, bytes]]) -> None:
    header = build_v2("203.0.113.5", "198.51.100.1", 40312, 25, tlvs=tlvs, crc=True)
    expected = H(2, False, ("203.0.113.5", 40312), ("198.51.100.1", 25), len(header), filled_in(header, tlvs))
    assert parse_proxy_header(header + b"EHLO") == expected


def test_builder_matches_haproxy_local_header() -> None:
    """The builder's CRC placement and value are HAProxy's."""
    assert build_v2_local(crc=True) == HAPROXY_LOCAL_CRC


def test_builder_refuses_mixed_families() -> None:
    """A header has one family; the end-to-end tests must not build others by mistake."""
    with pytest.raises(ValueError, match="same address family"):
        build_v2("192.0.2.1", "2001:db8::1", 1, 2)


# ---------------------------------------------------------------- incomplete headers

NEEDS_MORE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"P", id="v1-P"),
    pytest.param(b"PROXY", id="v1-PROXY"),
    pytest.param(b"PROXY ", id="v1-PROXY-space"),
    pytest.param(b"PROXY TC", id="v1-half-keyword"),
    pytest.param(b"PROXY UNKNOWN", id="v1-unknown-no-crlf"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 40312 25", id="v1-no-crlf"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 40312 25\r", id="v1-cr-without-lf-yet"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15), id="v1-106-octets"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r", id="v1-106-octets-ending-in-cr"),
    pytest.param(b"\r", id="v2-first-byte"),
    pytest.param(V2_SIGNATURE[:5], id="v2-half-signature"),
    pytest.param(V2_SIGNATURE, id="v2-signature"),
    pytest.param(V2_SIGNATURE + b"\x21", id="v2-command"),
    pytest.param(V2_SIGNATURE + b"\x21\x11\x00", id="v2-half-length"),
    pytest.param(build_v2("192.0.2.1", "192.0.2.2", 1, 2)[:-1], id="v2-one-octet-short"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK, length=MAX_HEADER - 16), id="v2-max-length-announced"),
]


@pytest.mark.parametrize("data", NEEDS_MORE)
def test_needs_more(data: bytes) -> None:
    assert parse_proxy_header(data) is None


# ---------------------------------------------------------------- invalid headers

V1 = b"PROXY TCP4 192.0.2.1 198.51.100.7 40312 25\r\n"


def v1_tcp4(
    src: bytes = b"192.0.2.1", dst: bytes = b"198.51.100.7", sport: bytes = b"40312", dport: bytes = b"25"
) -> bytes:
    return b"PROXY TCP4 " + b" ".join([src, dst, sport, dport]) + b"\r\n"


def v1_tcp6(src: bytes = b"2001:db8::5", dst: bytes = b"2001:db8::25") -> bytes:
    return b"PROXY TCP6 " + src + b" " + dst + b" 40312 25\r\n"


def with_crc_byte_changed(header: bytes, offset: int) -> bytes:
    changed = bytearray(header)
    changed[offset] ^= 0x01
    return bytes(changed)


CRC_HEADER = build_v2("203.0.113.5", "198.51.100.1", 40312, 25, tlvs=[(0x01, b"smtp")], crc=True)

INVALID = [
    # detection
    pytest.param(b"EHLO mx.example\r\n", "not a PROXY", id="garbage-smtp"),
    pytest.param(b"\x16\x03\x01\x02\x00", "not a PROXY", id="garbage-tls"),
    pytest.param(b"\x00", "not a PROXY", id="garbage-nul"),
    pytest.param(b"proxy TCP4 192.0.2.1 198.51.100.7 40312 25\r\n", "not a PROXY", id="v1-lowercase-proxy"),
    pytest.param(b"PROXY\r\n", "not a PROXY", id="v1-no-space-after-proxy"),
    pytest.param(V2_SIGNATURE[:7] + b"q", "not a PROXY", id="v2-signature-mismatch"),
    # version 1: framing
    pytest.param(b"PROXY  TCP4 192.0.2.1 198.51.100.7 40312 25\r\n", "unknown protocol", id="v1-double-space-first"),
    pytest.param(b"PROXY TCP4 192.0.2.1  198.51.100.7 40312 25\r\n", "exactly two", id="v1-double-space-later"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 40312 25 \r\n", "exactly two", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 192.0.2.1\t198.51.100.7 40312 25\r\n", "exactly two", id="v1-tab"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 40312\r\n", "exactly two", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 40312 25 26\r\n", "exactly two", id="v1-extra-field"),
    pytest.param(V1[:-2] + b"\n", "bare LF", id="v1-bare-lf"),
    pytest.param(V1[:-2] + b"\n\r\n", "bare LF", id="v1-lf-before-crlf"),
    pytest.param(V1[:-2] + b"\rEHLO", "bare CR", id="v1-bare-cr"),
    pytest.param(b"PROXY UNKNOWN a\nb\r\n", "bare LF", id="v1-unknown-bare-lf-in-rest"),
    pytest.param(b"PROXY UNKNOWN a\rb\r\n", "bare CR", id="v1-unknown-bare-cr-in-rest"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14), "first 107", id="v1-107-octets-without-crlf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r", "longer than 107", id="v1-cr-at-octet-107"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n", "longer than 107", id="v1-108-octets"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 500, "first 107", id="v1-long-line-no-wait"),
    # version 1: keywords
    pytest.param(b"PROXY tcp4 192.0.2.1 198.51.100.7 40312 25\r\n", "unknown protocol", id="v1-lowercase-protocol"),
    pytest.param(b"PROXY UDP4 192.0.2.1 198.51.100.7 40312 25\r\n", "unknown protocol", id="v1-udp4"),
    pytest.param(b"PROXY TCP5 192.0.2.1 198.51.100.7 40312 25\r\n", "unknown protocol", id="v1-tcp5"),
    pytest.param(b"PROXY UNKNOWNX\r\n", "unknown protocol", id="v1-unknown-glued"),
    pytest.param(b"PROXY TCP4\r\n", "exactly two", id="v1-tcp4-alone"),
    pytest.param(b"PROXY \r\n", "unknown protocol", id="v1-no-protocol"),
    pytest.param(b"PROXY X", "unknown protocol", id="v1-bad-keyword-early"),
    pytest.param(b"PROXY TCP4X", "unknown protocol", id="v1-bad-keyword-early-glued"),
    # version 1: addresses
    pytest.param(v1_tcp4(src=b"256.0.0.1"), "IPv4", id="v1-ipv4-256"),
    pytest.param(v1_tcp4(src=b"192.0.2.01"), "IPv4", id="v1-ipv4-leading-zero"),
    pytest.param(v1_tcp4(dst=b"010.0.0.1"), "IPv4", id="v1-ipv4-octal-looking"),
    pytest.param(v1_tcp4(src=b"192.0.2"), "IPv4", id="v1-ipv4-three-octets"),
    pytest.param(v1_tcp4(src=b"192.0.2.1.5"), "IPv4", id="v1-ipv4-five-octets"),
    pytest.param(v1_tcp4(src=b"0x7f.0.0.1"), "IPv4", id="v1-ipv4-hex"),
    pytest.param(v1_tcp4(src=b"192.0.2.1/24"), "IPv4", id="v1-ipv4-prefix"),
    pytest.param(v1_tcp4(src="١٩٢.0.2.1".encode()), "IPv4", id="v1-ipv4-non-ascii-digits"),
    pytest.param(v1_tcp4(src=b"2001:db8::5", dst=b"2001:db8::25"), "IPv4", id="v1-tcp4-with-ipv6"),
    pytest.param(v1_tcp4(dst=b"::ffff:198.51.100.7"), "IPv4", id="v1-tcp4-with-mapped-ipv6"),
    pytest.param(v1_tcp6(src=b"192.0.2.1", dst=b"198.51.100.7"), "IPv6", id="v1-tcp6-with-ipv4"),
    pytest.param(v1_tcp6(src=b"fe80::1%eth0"), "IPv6", id="v1-ipv6-zone"),
    pytest.param(v1_tcp6(src=b"::ffff:192.0.2.01"), "IPv6", id="v1-ipv6-mapped-leading-zero"),
    pytest.param(v1_tcp6(src=b"2001:db8::1::2"), "IPv6", id="v1-ipv6-two-double-colons"),
    pytest.param(v1_tcp6(src=b"20010:db8::1"), "IPv6", id="v1-ipv6-five-hex-digits"),
    pytest.param(v1_tcp6(src=b"1:2:3:4:5:6:7"), "IPv6", id="v1-ipv6-seven-groups"),
    pytest.param(v1_tcp6(src=b"[::1]"), "IPv6", id="v1-ipv6-brackets"),
    pytest.param(v1_tcp6(src=b"::g"), "IPv6", id="v1-ipv6-not-hex"),
    # version 1: ports
    pytest.param(v1_tcp4(sport=b"65536"), "port", id="v1-port-65536"),
    pytest.param(v1_tcp4(sport=b"99999"), "port", id="v1-port-99999"),
    pytest.param(v1_tcp4(sport=b"100000"), "port", id="v1-port-six-digits"),
    pytest.param(v1_tcp4(dport=b"025"), "port", id="v1-port-leading-zero"),
    pytest.param(v1_tcp4(dport=b"00"), "port", id="v1-port-double-zero"),
    pytest.param(v1_tcp4(dport=b"+25"), "port", id="v1-port-plus"),
    pytest.param(v1_tcp4(dport=b"-1"), "port", id="v1-port-minus"),
    pytest.param(v1_tcp4(dport=b"0x19"), "port", id="v1-port-hex"),
    pytest.param(v1_tcp4(dport="٢٥".encode()), "port", id="v1-port-non-ascii-digits"),
    # version 2: fixed part (most are refused before the rest has arrived)
    pytest.param(V2_SIGNATURE + b"\x11", "version", id="v2-version-1"),
    pytest.param(V2_SIGNATURE + b"\x31", "version", id="v2-version-3"),
    pytest.param(V2_SIGNATURE + b"\x01", "version", id="v2-version-0"),
    pytest.param(V2_SIGNATURE + b"\x22", "command", id="v2-command-2"),
    pytest.param(V2_SIGNATURE + b"\x2f", "command", id="v2-command-15"),
    pytest.param(V2_SIGNATURE + b"\x21\x12", "family", id="v2-udp4"),
    pytest.param(V2_SIGNATURE + b"\x21\x22", "family", id="v2-udp6"),
    pytest.param(V2_SIGNATURE + b"\x21\x32", "family", id="v2-unix-dgram"),
    pytest.param(V2_SIGNATURE + b"\x21\x41", "family", id="v2-family-4"),
    pytest.param(V2_SIGNATURE + b"\x21\x13", "family", id="v2-protocol-3"),
    pytest.param(V2_SIGNATURE + b"\x21\x10", "family", id="v2-inet-unspec-protocol"),
    pytest.param(V2_SIGNATURE + b"\x21\x01", "family", id="v2-unspec-family-stream"),
    pytest.param(build_v2_raw(0x21, 0x11, length=MAX_HEADER - 15), "longer than", id="v2-length-over-max"),
    pytest.param(build_v2_raw(0x21, 0x11, length=0xFFFF), "longer than", id="v2-length-64k"),
    # version 2: address block and TLVs
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK[:11]), "does not fit", id="v2-ipv4-block-larger-than-length"),
    pytest.param(build_v2_raw(0x21, 0x21, bytes(35)), "does not fit", id="v2-ipv6-block-larger-than-length"),
    pytest.param(build_v2_raw(0x21, 0x31, UNIX_BLOCK[:215]), "does not fit", id="v2-unix-block-larger-than-length"),
    pytest.param(build_v2_raw(0x21, 0x11, length=0), "does not fit", id="v2-ipv4-no-block-early"),
    pytest.param(build_v2_raw(0x20, 0x11), "does not fit", id="v2-local-family-block-missing"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK + b"\x04\x00\x05abc"), "runs past", id="v2-tlv-overrun"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK + b"\x04\x00"), "TLV header runs past", id="v2-tlv-header-cut"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK + b"\x04"), "TLV header runs past", id="v2-tlv-stray-octet"),
    pytest.param(build_v2_raw(0x20, 0x00, b"\x04\x00\x01"), "runs past", id="v2-local-tlv-overrun"),
    pytest.param(build_v2_raw(0x21, 0x00, b"\x04\x00\x01"), "runs past", id="v2-unspec-tlv-overrun"),
    pytest.param(with_crc_byte_changed(CRC_HEADER, 32), "CRC32C check", id="v2-crc-mismatch-value"),
    pytest.param(with_crc_byte_changed(CRC_HEADER, 16), "CRC32C check", id="v2-crc-mismatch-address"),
    pytest.param(with_crc_byte_changed(CRC_HEADER, 12), "CRC32C check", id="v2-crc-mismatch-command-now-local"),
    pytest.param(with_crc_byte_changed(CRC_HEADER, len(CRC_HEADER) - 1), "CRC32C check", id="v2-crc-mismatch-tlv"),
    pytest.param(
        with_crc_byte_changed(HAPROXY_V2_CRC_UNIQUE_ID, 40), "CRC32C check", id="v2-crc-mismatch-haproxy-unique-id"
    ),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK, tlvs=[(TYPE_CRC32C, bytes(4))]), "CRC32C check", id="v2-crc-zero"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK, tlvs=[(TYPE_CRC32C, bytes(3))]), "4 octets", id="v2-crc-short"),
    pytest.param(build_v2_raw(0x21, 0x11, V4_BLOCK, tlvs=[(TYPE_CRC32C, bytes(5))]), "4 octets", id="v2-crc-long"),
    pytest.param(
        build_v2_raw(0x21, 0x11, V4_BLOCK, tlvs=[(TYPE_CRC32C, bytes(4)), (TYPE_CRC32C, bytes(4))], crc=True),
        "more than one",
        id="v2-two-crcs",
    ),
]


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_header(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        parse_proxy_header(data)


def test_error_is_a_value_error_and_does_not_quote_the_input() -> None:
    """Messages may reach logs: they must not carry what a peer sent."""
    with pytest.raises(ValueError, match="IPv4") as caught:
        parse_proxy_header(v1_tcp4(src=b"evil\x1b[2J"))
    assert "evil" not in str(caught.value)


def test_retyped_crc_tlv_is_no_longer_a_checksum() -> None:
    """The limit of an optional CRC: a header whose CRC TLV became a NOOP TLV is a
    valid header without CRC, the spec's and so ours."""
    changed = bytearray(build_v2("203.0.113.5", "198.51.100.1", 40312, 25, crc=True))
    changed[28] = TYPE_NOOP
    result = parse_proxy_header(bytes(changed))
    assert result is not None
    assert result.tlvs == ((TYPE_NOOP, bytes(changed[31:35])),)


def test_never_reads_past_max_header() -> None:
    header = build_v2("192.0.2.1", "192.0.2.2", 1, 2)
    assert parse_proxy_header(header + bytes(10_000_000)) == parse_proxy_header(header)


# ---------------------------------------------------------------- CRC32C


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", 0x00000000, id="empty"),
        pytest.param(b"123456789", 0xE3069283, id="check-value"),
        pytest.param(bytes(32), 0x8A9136AA, id="rfc3720-zeros"),
        pytest.param(b"\xff" * 32, 0x62A8AB43, id="rfc3720-ones"),
        pytest.param(bytes(range(32)), 0x46DD794E, id="rfc3720-incrementing"),
        pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="rfc3720-decrementing"),
    ],
)
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert crc32c_bitwise(data) == expected


@given(st.binary(max_size=300))
def test_crc32c_table_equals_bitwise(data: bytes) -> None:
    assert crc32c(data) == crc32c_bitwise(data)


# ---------------------------------------------------------------- properties


def normal(address: str) -> str:
    """What the parser returns for an address: ipaddress's form, IPv4-mapped
    IPv6 as ::ffff:a.b.c.d."""
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(parsed)


ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.one_of(st.ip_addresses(v=6), st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")))
ipv6_text = st.one_of(  # the forms a sender may use, normalized or not
    ipv6.map(str), ipv6.map(lambda address: address.exploded), ipv6.map(lambda address: str(address).upper())
)
tlv_types = st.integers(0, 255).filter(lambda kind: kind != TYPE_CRC32C)
other_tlvs = st.lists(st.tuples(tlv_types, st.binary(max_size=40)), max_size=4)
Built = tuple[bytes, ProxyHeader]


@st.composite
def v1_headers(draw: st.DrawFn) -> Built:
    if draw(st.booleans()):
        rest = draw(st.binary(max_size=V1_MAX - 16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
        header = build_v1_unknown(rest)
        return header, H(1, True, None, None, len(header))
    addresses = ipv4 if draw(st.booleans()) else ipv6_text
    src, dst, sport, dport = draw(addresses), draw(addresses), draw(ports), draw(ports)
    header = build_v1(src, dst, sport, dport)
    return header, H(1, False, (normal(src), sport), (normal(dst), dport), len(header))


@st.composite
def v2_headers(draw: st.DrawFn, crc: bool | None = None) -> Built:
    """PROXY or LOCAL over IPv4/IPv6, or LOCAL/UNSPEC without addresses; random
    TLVs; a CRC TLV at a random place (always if crc, never if not crc)."""
    tlvs = draw(other_tlvs)
    with_crc = draw(st.booleans()) if crc is None else crc
    if with_crc:
        tlvs.insert(draw(st.integers(0, len(tlvs))), (TYPE_CRC32C, bytes(4)))
    shape = draw(st.sampled_from(["proxy", "local", "local-unspec"]))
    if shape == "local-unspec":
        header = build_v2_local(tlvs=tlvs, crc=with_crc)
        source = destination = None
    else:
        addresses = st.ip_addresses(v=draw(st.sampled_from([4, 6]))).map(str)
        src, dst, sport, dport = draw(addresses), draw(addresses), draw(ports), draw(ports)
        header = build_v2(src, dst, sport, dport, command=shape.upper(), tlvs=tlvs, crc=with_crc)
        source, destination = ((normal(src), sport), (normal(dst), dport)) if shape == "proxy" else (None, None)
    return header, H(2, source is None, source, destination, len(header), filled_in(header, tlvs))


headers = st.one_of(v1_headers(), v2_headers())
trailing = st.binary(max_size=64)


@given(headers, trailing)
def test_valid_header_then_anything(built: Built, tail: bytes) -> None:
    header, expected = built
    assert parse_proxy_header(header + tail) == expected
    assert expected.length == len(header)


@settings(deadline=None)
@given(headers)
def test_every_strict_prefix_needs_more(built: Built) -> None:
    header, _ = built
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None, end


@settings(deadline=None)
@given(headers, trailing, st.data())
def test_reads_split_anywhere(built: Built, tail: bytes, data: st.DataObject) -> None:
    """The session accumulates reads and parses after each: the header is
    found exactly when its last octet has arrived, whatever the split."""
    header, expected = built
    stream = header + tail
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)) if len(stream) > 1 else set())
    buffer = b""
    for start, end in itertools.pairwise([0, *cuts, len(stream)]):
        buffer += stream[start:end]
        result = parse_proxy_header(buffer)
        assert result == (expected if len(buffer) >= len(header) else None)


def outcome(data: bytes) -> ProxyHeader | type[ProxyHeaderError] | None:
    """parse_proxy_header's answer; ProxyHeaderError (the class) for a refusal.
    Any other exception propagates and fails the test."""
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return ProxyHeaderError


v1_noise = st.lists(
    st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b" ", b"0", b"1", b"25", b"255", b"256", b"65535", b"65536"])
    | st.sampled_from([b".", b":", b"::", b"ffff", b"%", b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"+"]),
    max_size=30,
).map(lambda parts: b"PROXY " + b"".join(parts))
v2_noise = st.tuples(
    st.sampled_from([0x20, 0x21, 0x22, 0x11]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x31, 0x32, 0x45]),
    st.integers(0, 300),
    st.binary(max_size=300),
).map(lambda t: build_v2_raw(t[0], t[1], t[3], length=t[2]))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    header, _ = draw(headers)
    changed = bytearray(header + draw(trailing))
    for _ in range(draw(st.integers(1, 3))):
        changed[draw(st.integers(0, len(changed) - 1))] = draw(st.integers(0, 255))
    return bytes(changed[: draw(st.integers(0, len(changed)))])


anything = st.one_of(st.binary(max_size=200), v1_noise, v2_noise, mutated())


@settings(deadline=None, max_examples=300)
@given(anything, st.binary(max_size=40))
def test_arbitrary_bytes(data: bytes, more: bytes) -> None:
    """Only ProxyHeaderError, never a header longer than the data, never a wait
    past MAX_HEADER octets, and answers that do not change as bytes arrive:
    a refusal stays a refusal, a header stays the same header."""
    result = outcome(data)
    later = outcome(data + more)
    if result is None:
        assert len(data) < MAX_HEADER
        assert all(parse_proxy_header(data[:end]) is None for end in range(len(data)))
    elif result is ProxyHeaderError:
        assert later is ProxyHeaderError
    else:
        assert isinstance(result, ProxyHeader)
        assert result.length <= len(data)
        assert later == result
        assert outcome(data[: result.length]) == result
        assert result.local == (result.source is None) == (result.destination is None)
        assert result.version == 2 or result.tlvs == ()


@settings(deadline=None, max_examples=300)
@given(v2_headers(crc=True), trailing, st.data())
def test_crc_detects_every_corruption_it_can(built: Built, tail: bytes, data: st.DataObject) -> None:
    """One corrupted octet of a header with a CRC32C TLV.

    Where the octet does not decide where the TLVs are (signature, command,
    addresses, ports, TLV values, the CRC itself, other TLVs' types) the
    header is always refused: CRC-32C catches every error burst of up to 32
    bits. An octet that moves the TLVs (family, length, a TLV length) or the
    CRC TLV's own type byte can make the parser see a header without a CRC,
    which the spec allows; it can never make it accept one with a CRC TLV.
    """
    header, _ = built
    offsets = header_tlv_offsets(header)
    crc_type = next(offset for offset in offsets if header[offset] == TYPE_CRC32C)
    layout = {13, 14, 15, crc_type} | {offset + delta for offset in offsets for delta in (1, 2)}
    position = data.draw(st.integers(0, len(header) - 1), label="position")
    changed = bytearray(header + tail)
    changed[position] ^= data.draw(st.integers(1, 255), label="xor")
    result = outcome(bytes(changed))
    if position not in layout:
        assert result is ProxyHeaderError
    else:
        assert result is None or result is ProxyHeaderError or TYPE_CRC32C not in [kind for kind, _ in result.tlvs]

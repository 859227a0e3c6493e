"""Issue 7, points 1 and 2: no sender-specified routing, and keys that match only themselves.

Point 1. A recipient whose local part carries routing syntax
(`victim%evil.test@example.com`, `"victim@evil.test"@example.com`,
`evil.test!victim@example.com`, and their Unicode compatibility forms) is
refused with 554 5.7.1 before any mapping or upstream sees it: an upstream
that trusts Willi's address (Postfix's mynetworks) would otherwise relay it
off-site (test_security_postfix.py shows that it does). Every test routes
with a static default mapping, so the only thing between the recipient and
the upstream is the routing check, and asserts "no connection" right after
the RCPT reply, where the connection would otherwise be opened; a control
recipient in the same transaction then proves that the route was live.

Point 2. A mapping key matches only itself as Willi normalizes it: domains
are lower-cased ASCII or A-labels, refused when they are not NFC/NFKC stable
(a fullwidth `example.com`, U+FF45 ...), so `exämple.com` never reaches the
`example.com` row. The SQL half of the point is in test_security_sql.py.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeupstream import FakeUpstream
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from proxy_helpers import csv_mapping, static_mapping
from security_helpers import open_transaction, start, transaction_lines
from support import RunningWilli

from willi.address import has_routing_syntax, lookup_domain, lookup_keys, unquote_local
from willi.mappings.csv import CsvFormatError, parse_csv
from willi.protocol import AddressError

#: Every character whose compatibility form contains a routing character (computed, not listed by hand,
#: so the oracle does not share a blind spot with the code under test).
ROUTING_VARIANTS = frozenset(
    chr(c) for c in range(sys.maxunicode + 1)
    if not 0xD800 <= c <= 0xDFFF and any(r in unicodedata.normalize("NFKC", chr(c)) for r in "@%!")
)

ROUTED = [
    # the three classic forms (Postfix: user%site, site!user, "user@site")
    "victim%evil.test@example.com",
    '"victim@evil.test"@example.com',
    "evil.test!victim@example.com",
    # quoted and escaped variants: a quoted-pair is the character itself
    '"victim\\@evil.test"@example.com',
    '"victim%evil.test"@example.com',
    '"evil.test!victim"@example.com',
    '"victim\\%evil.test"@example.com',
    '"vic\\"tim@evil.test"@example.com',
    '"victim@evil.test\\\\"@example.com',
    # combinations and repetitions
    "victim%evil.test%relay.test@example.com",
    "evil.test!relay.test!victim@example.com",
    "a!victim%evil.test@example.com",
    '"a!b%c@evil.test"@example.com',
    # case does not hide it; nor does a subaddress (the base key would drop the extension)
    "VICTIM%EVIL.TEST@EXAMPLE.COM",
    "victim+x%evil.test@example.com",
    "user+evil.test!victim@example.com",
    "postmaster%evil.test@example.com",
    # a single routing character is enough
    "%@example.com",
    "!@example.com",
    '"@"@example.com',
]

ROUTED_UTF8 = [
    # fullwidth and small compatibility forms (NFKC: U+FF20 -> @, U+FF05 -> %, U+FF01 -> !, U+FE6B ...)
    "victim\uff20evil.test@example.com",
    "victim\uff05evil.test@example.com",
    "evil.test\uff01victim@example.com",
    "victim\ufe6bevil.test@example.com",
    "victim\ufe6aevil.test@example.com",
    "evil.test\ufe57victim@example.com",
    '"victim\uff20evil.test"@example.com',
    "evil.test\u203cvictim@example.com",  # DOUBLE EXCLAMATION MARK -> "!!"
    # non-ASCII local part around an ASCII routing character
    "j\u00f6rg%evil.test@example.com",
    "\u00e9vil.test!victim@example.com",
    # mixed: fullwidth and ASCII together
    "a\uff05b!c@example.com",
]

CLEAN = [
    "victim@example.com",
    "victim.name+ext@example.com",
    '"victim evil.test"@example.com',
    '"victim.evil.test"@example.com',
    "j\u00f6rg@example.com",
    "victim\uff0eevil.test@example.com",  # FULLWIDTH FULL STOP: no routing character
]


@pytest.fixture
def upstream(fake_upstream: Callable[..., FakeUpstream]) -> FakeUpstream:
    return fake_upstream()


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream) -> Iterator[RunningWilli]:
    """Willi with a static default route: every recipient not refused goes to `upstream`."""
    running = start(tmp_path, [static_mapping(upstream.port)])
    yield running
    running.stop()


# ---------------------------------------------------------------- point 1: the dialog


@pytest.mark.parametrize("recipient", ROUTED + ROUTED_UTF8)
def test_routing_syntax_is_refused_before_any_upstream(proxy: RunningWilli, upstream: FakeUpstream,
                                                       recipient: str) -> None:
    client = open_transaction(proxy, utf8=not recipient.isascii())
    try:
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        assert code == 554 and lines[0].startswith("5.7.1 "), (code, lines)
        assert "routing" in lines[0].lower()
        # This is where the first accepted recipient opens the upstream connection: Willi reads the
        # upstream's greeting before it answers the RCPT, and the fake records a session before it greets,
        # so a connection would already show here (no sleep needed).
        assert upstream.sessions == [], "the upstream was contacted for a routed recipient"
        # Control: the static route is live, the next (clean) recipient does reach the upstream.
        code, lines = client.cmd("RCPT TO:<victim@example.com>")
        assert code == 250, (code, lines)
        assert upstream.wait_for(lambda: len(upstream.sessions) == 1)
        code, _ = client.cmd("DATA")
        assert code == 354
        client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0] == 250
    finally:
        client.close()
    (txn,) = upstream.completed_transactions
    assert txn.rcpts == ["RCPT TO:<victim@example.com>"], "the routed recipient reached the upstream"
    assert upstream.refused_commands == []


@pytest.mark.parametrize("recipient", ROUTED[:6])
def test_routing_syntax_after_an_accepted_recipient_is_never_forwarded(proxy: RunningWilli, upstream: FakeUpstream,
                                                                       recipient: str) -> None:
    """The upstream connection is open already: the routed RCPT must not go down it."""
    client = open_transaction(proxy, utf8=False)
    try:
        assert client.cmd("RCPT TO:<victim@example.com>")[0] == 250
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
        client.cmd("QUIT")
    finally:
        client.close()
    assert upstream.wait_for(lambda: upstream.sessions and upstream.sessions[0].closed)
    rcpts = [c for c in upstream.sessions[0].commands if c.upper().startswith("RCPT")]
    assert rcpts == ["RCPT TO:<victim@example.com>"]


@pytest.mark.parametrize("recipient", CLEAN)
def test_clean_local_parts_pass(proxy: RunningWilli, upstream: FakeUpstream, recipient: str) -> None:
    client = open_transaction(proxy, utf8=not recipient.isascii())
    try:
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        assert code == 250, (code, lines)
    finally:
        client.close()
    assert upstream.wait_for(lambda: upstream.sessions and any(
        c == f"RCPT TO:<{recipient}>" for c in upstream.sessions[0].commands))


def test_source_route_is_stripped_not_followed(proxy: RunningWilli, upstream: FakeUpstream) -> None:
    """RFC 5321 4.1.1.3: `<@relay:user@domain>` is delivered to user@domain, the route is dropped."""
    client = open_transaction(proxy, utf8=False)
    try:
        assert client.cmd("RCPT TO:<@evil.test,@relay.test:victim@example.com>")[0] == 250
    finally:
        client.close()
    assert upstream.wait_for(lambda: upstream.sessions and len(upstream.sessions[0].commands) >= 3)
    assert "RCPT TO:<victim@example.com>" in upstream.sessions[0].commands
    assert not any("evil.test" in c for c in upstream.sessions[0].commands)


@pytest.mark.parametrize("recipient", [ROUTED[0], ROUTED[1], ROUTED[2], ROUTED_UTF8[0]])
def test_allow_untrusted_routing_lets_them_through(tmp_path: Path, upstream: FakeUpstream, recipient: str) -> None:
    w = start(tmp_path, [static_mapping(upstream.port)], allow_untrusted_routing=True)
    try:
        client = open_transaction(w, utf8=not recipient.isascii())
        try:
            code, lines = client.cmd(f"RCPT TO:<{recipient}>")
            assert code == 250, (code, lines)
        finally:
            client.close()
    finally:
        w.stop()
    assert upstream.wait_for(lambda: upstream.sessions and upstream.sessions[0].closed)
    assert f"RCPT TO:<{recipient}>" in upstream.sessions[0].commands


def test_routing_refusal_is_logged_as_refused_by_the_proxy(proxy: RunningWilli, upstream: FakeUpstream) -> None:
    with transaction_lines() as lines:
        client = open_transaction(proxy, utf8=False)
        try:
            assert client.cmd("RCPT TO:<victim%evil.test@example.com>")[0] == 554
            assert client.cmd("QUIT")[0] == 221
        finally:
            client.close()
        assert proxy.service.wait_idle(5)
    (line,) = lines
    assert "result=rejected" in line and "error_src=proxy" in line
    assert "refused=<victim%evil.test@example.com>:554" in line


# ---------------------------------------------------------------- point 1: the predicate


def oracle(local: str) -> bool:
    """Routing syntax: a character whose compatibility form holds @, % or ! (quotes and escapes aside)."""
    return any(c in ROUTING_VARIANTS for c in local)


def test_oracle_knows_the_famous_variants() -> None:
    assert {"@", "%", "!", "\uff20", "\uff05", "\uff01", "\ufe6b", "\ufe6a", "\ufe57", "\u203c"} <= ROUTING_VARIANTS
    assert "\uff0e" not in ROUTING_VARIANTS and "a" not in ROUTING_VARIANTS


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(_text)
def test_has_routing_syntax_iff_nfkc_unquoted_local_part_has_a_routing_character(local: str) -> None:
    expected = any(c in "@%!" for c in unicodedata.normalize("NFKC", unquote_local(local)))
    assert has_routing_syntax(local) == expected
    assert has_routing_syntax(local) == oracle(local)


@given(_text, st.sampled_from(sorted(ROUTING_VARIANTS)), _text, st.booleans())
def test_one_routing_character_anywhere_is_enough(left: str, routing: str, right: str, quoted: bool) -> None:
    local = f"{left}{routing}{right}"
    assert has_routing_syntax(f'"{local}"' if quoted else local)


# Local parts Willi accepts on the wire (dot-string or quoted string, SMTPUTF8), with routing characters
# and their variants mixed in at random.
_ATOM_CHARS = st.one_of(
    st.sampled_from("abcXYZ019!#$%&'*+/=?^_`{|}~-"),
    st.sampled_from(["\u00e4", "\u00f6", "\uff45", "\uff20", "\uff05", "\uff01", "\ufe6b", "\ufe6a", "\ufe57",
                     "\u203c", "\u2049", "\uff0e", "\u212a", "\u0435"]),
)
_atom = st.text(_ATOM_CHARS, min_size=1, max_size=6)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_QTEXT = st.one_of(st.sampled_from("ab @%!.,;:<>()[]"), st.sampled_from(["\\\\", '\\"', "\\@", "\\a", "\uff20"]))
_quoted = st.lists(_QTEXT, min_size=1, max_size=8).map(lambda parts: '"' + "".join(parts) + '"')
_local_parts = st.one_of(_dot_string, _quoted).filter(lambda s: len(s.encode()) <= 64)


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningWilli, FakeUpstream]]:
    upstream = FakeUpstream().start()
    running = start(tmp_path_factory.mktemp("routing"), [static_mapping(upstream.port)], max_errors=1_000_000)
    yield running, upstream
    running.stop()
    upstream.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=_local_parts)
def test_session_verdict_follows_the_predicate(shared_proxy: tuple[RunningWilli, FakeUpstream], local: str) -> None:
    w, upstream = shared_proxy
    recipient = f"{local}@example.com"
    client = open_transaction(w, utf8=True)
    try:
        code, lines = client.cmd(f"RCPT TO:<{recipient}>")
        client.cmd("QUIT")
    finally:
        client.close()
    if oracle(local):
        assert code == 554 and lines[0].startswith("5.7.1"), (recipient, code, lines)
    else:
        assert code == 250, (recipient, code, lines)
        assert upstream.wait_for(lambda: any(f"RCPT TO:<{recipient}>" in s.commands for s in upstream.sessions))
    # Whatever the verdict, nothing routed ever reached the upstream.
    with upstream._lock:
        sent = [c for s in upstream.sessions for c in s.commands if c.startswith("RCPT TO:")]
    assert not any(oracle(c[len("RCPT TO:<"):].rpartition("@")[0]) for c in sent)


# ---------------------------------------------------------------- point 2: CSV and static exactness


def csv_proxy(tmp_path: Path, rows: str, upstream: FakeUpstream, **settings: object) -> RunningWilli:
    path = tmp_path / "routes.csv"
    path.write_text("pattern;server;tls_verify\n" + rows.replace("PORT", str(upstream.port)), encoding="utf-8")
    return start(tmp_path, [csv_mapping(path)], **settings)


def rcpt(w: RunningWilli, recipient: str) -> tuple[int, list[str]]:
    client = open_transaction(w, utf8=not recipient.isascii())
    try:
        return client.cmd(f"RCPT TO:<{recipient}>")
    finally:
        client.close()


@pytest.mark.parametrize("recipient", [
    "victim@ex\u00e4mple.com",           # precomposed a-umlaut
    "victim@exa\u0308mple.com",          # a + combining diaeresis (not NFC): refused outright
    "victim@\u00e9xample.com",
    "victim@exampl\u0435.com",           # CYRILLIC SMALL LETTER IE
    "victim@example.\u0441om",           # CYRILLIC SMALL LETTER ES
    "victim@sub.ex\u00e4mple.com",
])
def test_csv_example_row_never_matches_a_lookalike(tmp_path: Path, upstream: FakeUpstream, recipient: str) -> None:
    w = csv_proxy(tmp_path, "example.com;127.0.0.1:PORT;false\n.example.com;127.0.0.1:PORT;false\n", upstream)
    try:
        code, lines = rcpt(w, recipient)
        assert code in (553, 554), (code, lines)
        assert upstream.sessions == []
        assert rcpt(w, "victim@example.com")[0] == 250  # control: the row itself routes
    finally:
        w.stop()


@pytest.mark.parametrize("recipient", [
    "victim@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # fullwidth "example"
    "victim@example\uff0ecom",                                 # FULLWIDTH FULL STOP
    "victim@example\u3002com",                                 # IDEOGRAPHIC FULL STOP
    "victim@example\uff61com",                                 # HALFWIDTH IDEOGRAPHIC FULL STOP
    "victim@\u212aarl.example.com",                            # KELVIN SIGN
    "victim@exa\u0308mple.com",                                # not NFC
])
@pytest.mark.parametrize("mapping", ["csv", "static"])
def test_unstable_recipient_domain_is_553_513(tmp_path: Path, upstream: FakeUpstream, recipient: str,
                                              mapping: str) -> None:
    if mapping == "csv":
        w = csv_proxy(tmp_path, "example.com;127.0.0.1:PORT;false\n.example.com;127.0.0.1:PORT\n", upstream)
    else:
        w = start(tmp_path, [static_mapping(upstream.port)])
    try:
        code, lines = rcpt(w, recipient)
        assert code == 553 and lines[0].startswith("5.1.3"), (code, lines)
        assert upstream.sessions == []
    finally:
        w.stop()


@pytest.mark.parametrize("pattern", [
    "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    "user@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    ".\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    "example\uff0ecom",
    "example\u3002com",
    "\u212aarl.example.com",
    "exa\u0308mple.com",
])
def test_unstable_csv_pattern_is_refused_at_load_with_file_and_line(pattern: str) -> None:
    text = f"pattern;server;tls_verify\nexample.org;mx.example.org\n{pattern};mx.example.com;false\n"
    with pytest.raises(CsvFormatError, match=r"^routes\.csv:3: "):
        parse_csv(text, source="routes.csv")


@pytest.mark.parametrize(("row", "recipient", "matches"), [
    ("example.com", "victim@example.com", True),
    ("EXAMPLE.COM", "victim@Example.Com", True),
    ("ex\u00e4mple.com", "victim@ex\u00e4mple.com", True),
    ("ex\u00e4mple.com", "victim@EX\u00c4MPLE.com", True),    # case folds, as DNS and IDNA do
    ("xn--exmple-cua.com", "victim@ex\u00e4mple.com", True),  # the A-label is the key
    ("ex\u00e4mple.com", "victim@xn--exmple-cua.com", True),
    ("ex\u00e4mple.com", "victim@example.com", False),
    ("example.com", "victim@ex\u00e4mple.com", False),
    ("jorg@example.com", "j\u00f6rg@example.com", False),
    ("j\u00f6rg@example.com", "jorg@example.com", False),
    ("j\u00f6rg@example.com", "J\u00f6rg@example.com", True),    # ASCII letters fold in local parts
    ("j\u00f6rg@example.com", "J\u00d6RG@example.com", False),   # other letters do not (documented)
    ("karl@example.com", "\u212aarl@example.com", False),        # Kelvin sign is not K
    ("stra\u00dfe.de", "strasse.de", False),                     # no IDNA2003 mapping of sharp s
])
def test_csv_key_matches_only_itself(row: str, recipient: str, matches: bool) -> None:
    from willi.address import lookup_keys

    table = parse_csv(f"pattern;server;tls_verify\n{row};mx.example.net;false\n")
    hits = [key for key in lookup_keys(recipient, "+") if key in table]
    assert bool(hits) == matches, (row, recipient, hits, list(table))


# ---------------------------------------------------------------- point 2: the key property

_LABEL_CHARS = st.one_of(
    st.sampled_from("abcdexyzABCXYZ0129-"),
    st.sampled_from(["\u00e4", "\u00c4", "\u00f6", "\u00df", "\u1e9e", "\u0131", "\u0130", "\u03b1", "\u0391",
                     "\u0435", "\u0415", "\uff45", "\uff21", "\u212a", "\u0308", "\u3002", "\uff0e", "\u00e9",
                     "\u4e2d", "\u00aa", "\u2460", "\ufb01"]),
)
_STABLE_CHARS = st.one_of(
    st.sampled_from("abcdexyzABCXYZ0129-"),
    st.sampled_from(["\u00e4", "\u00c4", "\u00f6", "\u00df", "\u1e9e", "\u0131", "\u0130", "\u03b1", "\u0391",
                     "\u0435", "\u0415", "\u00e9", "\u4e2d"]),
)


def _label(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(chars, min_size=1, max_size=8).map(lambda s: s.strip("-") or "a")


_domains = st.lists(_label(_LABEL_CHARS), min_size=1, max_size=3).map(".".join)
#: Domains that always have a key: letters that are NFC and NFKC stable on their own, no separators.
_stable_domains = st.lists(_label(_STABLE_CHARS), min_size=1, max_size=3).map(".".join)


def key_or_none(domain: str) -> str | None:
    try:
        return lookup_domain(domain)
    except AddressError:
        return None


def stable(label: str) -> bool:
    """The documented condition for a non-ASCII label to have a key."""
    return (label.isascii() or (unicodedata.normalize("NFKC", label) == label
                                and unicodedata.normalize("NFC", label) == label and "\u3002" not in label))


@given(_domains)
def test_a_domain_has_a_key_iff_every_label_is_stable(domain: str) -> None:
    key = key_or_none(domain)
    if all(stable(label) for label in domain.split(".")) and len(domain) < 50:
        assert key is not None, domain
    elif not all(stable(label) for label in domain.split(".")):
        assert key is None, (domain, key)


@given(_stable_domains)
def test_a_key_is_ascii_and_decodes_back_to_the_lowered_domain(domain: str) -> None:
    key = key_or_none(domain)
    assert key is not None, domain
    assert key.isascii()
    labels = [label[4:].encode("ascii").decode("punycode") if label.startswith("xn--") else label
              for label in key.split(".")]
    assert ".".join(labels) == domain.lower()


@given(_stable_domains, _stable_domains)
def test_distinct_domains_have_distinct_keys_unless_equal_after_normalization(a: str, b: str) -> None:
    assume(a != b)
    ka, kb = key_or_none(a), key_or_none(b)
    assert ka is not None and kb is not None, (a, b)
    assert (ka == kb) == (a.lower() == b.lower()), (a, b, ka, kb)


LOOKALIKES = {
    "a": "\u00e4\u00e1\u00e0\u00e2\u00e3\u00e5\u0430\uff41", "e": "\u00e9\u00e8\u00ea\u00eb\u0435\uff45",
    "o": "\u00f6\u00f3\u00f4\u00f5\u043e\u03bf", "i": "\u00ed\u00ef\u0456\u0131", "c": "\u00e7\u0441",
    "k": "\u212a\u03ba", "s": "\u0455\u00df", "p": "\u0440", "x": "\u0445", "y": "\u00fd\u0443",
}


@st.composite
def lookalike_domains(draw: st.DrawFn) -> tuple[str, str]:
    """(an ASCII domain, the same domain with one letter swapped for a lookalike)."""
    labels = draw(st.lists(st.text("aeiocksxyp", min_size=1, max_size=8), min_size=1, max_size=3))
    skeleton = ".".join([*labels, "com"])
    positions = [i for i, c in enumerate(skeleton) if c in LOOKALIKES]
    index = draw(st.sampled_from(positions))
    twin = skeleton[:index] + draw(st.sampled_from(LOOKALIKES[skeleton[index]])) + skeleton[index + 1:]
    return skeleton, twin


@given(lookalike_domains())
def test_a_lookalike_never_shares_a_key_with_the_ascii_domain(pair: tuple[str, str]) -> None:
    """`exämple.com` vs `example.com`: accents, widths and other scripts never give the ASCII key."""
    skeleton, twin = pair
    twin_key = key_or_none(twin)
    assert twin_key != lookup_domain(skeleton)
    assert all(twin_key != key for key in lookup_keys(f"victim@{skeleton}", "+"))
    if twin_key is not None:
        assert twin_key.isascii() and "xn--" in twin_key

"""Pure functions on recipient addresses: routing syntax, and the keys a mapping is asked.

A key must match only itself as Willi normalized it (design.md, Routing):
both the recipient and every mapping pattern go through `lookup_domain` and
`lookup_local`, and a mapping compares the results exactly. The rules:

- Domains: ASCII labels are lower-cased; a non-ASCII label (SMTPUTF8) must
  be in NFC and unchanged by NFKC (so a fullwidth `example` (U+FF45...) or a Kelvin
  sign never passes for ASCII), must not contain an ideographic full stop,
  and is lower-cased and written as its A-label (`xn--` + punycode), which
  is how DNS and Postfix see it. `exämple.com` becomes `xn--exmple-cua.com`
  and can never match `example.com`.
- Local parts: ASCII letters are lower-cased unless local parts are case
  sensitive; other characters are compared as they are (no Unicode case
  folding, which would make `\u212aarl` match `karl`).
"""

from __future__ import annotations

import unicodedata

from willi.protocol import AddressError

#: Characters that turn a local part into a route to another site (user%site, site!user, "user@site").
ROUTING_CHARACTERS = frozenset("@%!")
#: Characters IDNA treats as label separators besides "." (NFKC catches U+FF0E and U+FF61).
_IDEOGRAPHIC_STOPS = frozenset("\u3002")
MAX_LABEL = 63
#: Kinds of lookup key, in the order they are tried.
KEY_KINDS = ("full", "base", "domain", "parent")


def unquote_local(local: str) -> str:
    """The content of a quoted local part (`"a\\"b"` -> `a"b`); other local parts unchanged."""
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return local
    out: list[str] = []
    escaped = False
    for ch in local[1:-1]:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def has_routing_syntax(local: str) -> bool:
    """True when a local part carries sender-specified routing, as Postfix's
    `allow_untrusted_routing = no` refuses it: `%`, `!` or an `@` (quoted).

    Compatibility forms (fullwidth or small variants, U+FF20, U+FE6A) count too: an upstream
    that normalizes Unicode must not find a route Willi did not see.
    """
    text = unicodedata.normalize("NFKC", unquote_local(local))
    return any(c in ROUTING_CHARACTERS for c in text)


def _ascii_lower(text: str) -> str:
    """Lower-case A-Z only; every other character stays as it is."""
    return text if not any("A" <= c <= "Z" for c in text) else text.encode("utf-8", "surrogateescape").lower().decode(
        "utf-8", "surrogateescape")


def lookup_label(label: str) -> str:
    """One domain label in lookup form; AddressError when it has no stable form."""
    if label.isascii():
        return label.lower()
    if unicodedata.normalize("NFKC", label) != label or unicodedata.normalize("NFC", label) != label:
        raise AddressError(f"domain label {label!r} is not in normalized form (NFC/NFKC)")
    if any(c in _IDEOGRAPHIC_STOPS for c in label):
        raise AddressError(f"domain label {label!r} contains a label separator")
    lowered = label.lower()
    try:
        alabel = "xn--" + lowered.encode("punycode").decode("ascii")
    except UnicodeError:
        raise AddressError(f"domain label {label!r} cannot be converted to an A-label") from None
    if len(alabel) > MAX_LABEL:
        raise AddressError(f"domain label {label!r} is longer than {MAX_LABEL} octets as an A-label")
    return alabel


def lookup_domain(domain: str) -> str:
    """The domain as mappings are asked for it: lower case, A-labels, literals kept.

    `Example.COM` -> `example.com`; `exämple.com` -> `xn--exmple-cua.com`;
    `[IPv6:2001:DB8::1]` -> `[ipv6:2001:db8::1]`. A leading "." (a pattern
    for subdomains) is kept.
    """
    if domain.startswith("["):
        return domain.lower()
    if domain.isascii():
        return domain.lower()
    return ".".join(lookup_label(label) if label else label for label in domain.split("."))


def lookup_local(local: str, *, case_sensitive: bool) -> str:
    """The local part as mappings are asked for it."""
    return local if case_sensitive else _ascii_lower(local)


def normalize_address(address: str, *, case_sensitive_local: bool) -> str:
    """`User+Ext@Exämple.COM` -> `user+ext@xn--exmple-cua.com` (the full-address key)."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return lookup_local(address, case_sensitive=case_sensitive_local)
    return f"{lookup_local(local, case_sensitive=case_sensitive_local)}@{lookup_domain(domain)}"


def parent_keys(domain: str) -> list[str]:
    """`a.b.example.com` -> [".b.example.com", ".example.com", ".com"] (Postfix's `.domain` patterns).

    A `.example.com` pattern matches every subdomain of example.com, never
    example.com itself. Address literals have no parents.
    """
    if domain.startswith("["):
        return []
    keys = []
    dot = domain.find(".", 1)
    while dot > 0:
        keys.append(domain[dot:])
        dot = domain.find(".", dot + 1)
    return keys


def labeled_keys(address: str, delimiter: str, *, case_sensitive_local: bool = False) -> list[tuple[str, str]]:
    """The keys tried for `address`, each with its kind, most specific first.

    `user+ext@Sub.Example.COM` with delimiter "+" -> full
    `user+ext@sub.example.com`, base `user@sub.example.com`, domain
    `sub.example.com`, parent `.example.com`, parent `.com`. Several delimiter
    characters may be given (as Postfix's recipient_delimiter); the local part
    is cut at the first of them, never at position 0 and never inside a
    quoted local part. Raises AddressError for a domain with no lookup form.
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        local, domain = address, ""
    domain = lookup_domain(domain) if domain else ""
    local = lookup_local(local, case_sensitive=case_sensitive_local)
    keys = [("full", f"{local}@{domain}" if domain else local)]
    if delimiter and not (local.startswith('"') and local.endswith('"')):
        cut = min((i for i in (local.find(d) for d in delimiter) if i > 0), default=-1)
        if cut > 0:
            keys.append(("base", f"{local[:cut]}@{domain}" if domain else local[:cut]))
    if domain:
        keys.append(("domain", domain))
        keys.extend(("parent", key) for key in parent_keys(domain))
    seen: set[str] = set()
    return [(kind, key) for kind, key in keys if not (key in seen or seen.add(key))]


def lookup_keys(address: str, delimiter: str, *, case_sensitive_local: bool = False) -> list[str]:
    """The keys alone, in the order they are tried (see `labeled_keys`)."""
    return [key for _, key in labeled_keys(address, delimiter, case_sensitive_local=case_sensitive_local)]


class PatternError(ValueError):
    """A mapping pattern that no recipient could ever match, with what to write instead."""


def pattern_key(pattern: str, *, case_sensitive_local: bool) -> str:
    """The lookup key a mapping pattern stands for, normalized like the recipient's keys.

    Accepted: `user@domain` (also with a subaddress), `domain`, and
    `.domain` for every subdomain of domain. Everything else could never
    match and is refused with the reason, so a typo surfaces at load time.
    """
    if not pattern:
        raise PatternError("empty pattern")
    if any(c.isspace() for c in pattern):
        raise PatternError(f"pattern {pattern!r} contains white space")
    if pattern.startswith("@"):
        raise PatternError(f"pattern {pattern!r}: '@domain' is not a pattern here; write the domain alone "
                           f"({pattern[1:]}) for the whole domain or .{pattern[1:]} for its subdomains")
    local, sep, domain = pattern.rpartition("@")
    if "*" in (domain if sep else pattern) or local == "*":
        raise PatternError(f"pattern {pattern!r}: wildcards are not supported; write example.com for a "
                           "domain and .example.com for all of its subdomains")
    from willi.protocol import validate_domain, validate_mailbox  # local import keeps the top light

    try:
        if sep:
            validate_mailbox(pattern, utf8=True)
            return normalize_address(pattern, case_sensitive_local=case_sensitive_local)
        subdomains = pattern.startswith(".")
        name = pattern[1:] if subdomains else pattern
        validate_domain(name, utf8=True)
        if name.startswith("[") and subdomains:
            raise PatternError(f"pattern {pattern!r}: an address literal has no subdomains")
        return ("." if subdomains else "") + lookup_domain(name)
    except AddressError as exc:
        raise PatternError(f"pattern {pattern!r} is not an address, a domain or a .domain: {exc}") from None

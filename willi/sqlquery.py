"""Pure helpers for SQL mapping queries (no database driver needed).

Kept apart from the backend so that configuration checks can use them
without importing mysql.connector.
"""

from __future__ import annotations


def convert_placeholder(query: str) -> str:
    """Turn the Go program's `?` placeholders into the connector's `%s`.

    Only `?` outside string literals, quoted identifiers and comments is a
    placeholder; `'why?'` stays as it is. `%s` queries pass unchanged.
    """
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c in "'\"`":
            end = _end_of_quoted(query, i)
            out.append(query[i:end])
            i = end
        elif c == "#" or (query.startswith("--", i) and (i + 2 == n or query[i + 2].isspace())):
            end = query.find("\n", i)
            end = n if end < 0 else end
            out.append(query[i:end])
            i = end
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(query[i:end])
            i = end
        else:
            out.append("%s" if c == "?" else c)
            i += 1
    return "".join(out)


def _end_of_quoted(query: str, start: int) -> int:
    """Index after the literal opened at `start`; backslash escapes except in `...`."""
    quote, i, n = query[start], start + 1, len(query)
    while i < n:
        c = query[i]
        if c == "\\" and quote != "`":
            i += 2
        elif c == quote:
            return i + 1  # a doubled quote simply opens the next literal
        else:
            i += 1
    return n


def placeholder_count(query: str) -> int:
    """How many parameters the connector will fill in (every `%s`, as it sees them)."""
    return convert_placeholder(query).count("%s")

#!/usr/bin/env python3
"""Resolver benchmark: lookups per second and database queries per RCPT.

Prints figures, asserts nothing (design.md: speed is measured by benchmarks,
never by timed unit tests). Needs a MariaDB/MySQL server; the defaults are
the test machine's (127.0.0.1:3306, root, empty password). It creates and
drops its own database.

    python3 bench/lookup_bench.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mysql.connector

from willi.config import parse_config
from willi.mappings.mysql import SqlMapping
from willi.resolver import build_resolver

HOST = os.environ.get("WILLI_TEST_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("WILLI_TEST_MYSQL_PORT", "3306"))
USER = os.environ.get("WILLI_TEST_MYSQL_USER", "root")
PASSWORD = os.environ.get("WILLI_TEST_MYSQL_PASSWORD", "")


def mapping_toml(database: str, keys: str = "") -> str:
    return (f'[[mappings]]\ntype = "sql"\nhost = "{HOST}"\nport = {PORT}\nuser = "{USER}"\npassword = "{PASSWORD}"\n'
            f'database = "{database}"\nquery = "SELECT server, tls_verify FROM routes WHERE pattern = ?"\n{keys}')


def rate(fn, seconds: float) -> float:
    """Calls per second of `fn(i)` over about `seconds`."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn(n)
            n += 1
        if time.perf_counter() >= deadline:
            return n / (time.perf_counter() - start)


def count_queries(resolver, addresses: list[str]) -> int:
    calls = 0
    real = SqlMapping.lookup

    def counting(self, key):
        nonlocal calls
        calls += 1
        return real(self, key)

    SqlMapping.lookup = counting  # type: ignore[method-assign]
    try:
        for address in addresses:
            resolver.resolve(address)
    finally:
        SqlMapping.lookup = real  # type: ignore[method-assign]
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per rate measurement")
    args = parser.parse_args()
    admin = mysql.connector.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, autocommit=True)
    database = f"willi_bench_{secrets.token_hex(4)}"
    cur = admin.cursor()
    cur.execute(f"CREATE DATABASE `{database}`")
    try:
        cur.execute(f"CREATE TABLE `{database}`.routes (pattern VARCHAR(255) PRIMARY KEY, server VARCHAR(255),"
                    " tls_verify VARCHAR(10))")
        cur.executemany(f"INSERT INTO `{database}`.routes VALUES (%s, %s, 'true')",
                        [(f"d{i}.example", f"mx{i}.example:25") for i in range(100)])
        resolver = build_resolver(parse_config(mapping_toml(database)))
        resolver.resolve("user@d1.example")
        resolver.resolve("user@nowhere.invalid")
        hit = rate(lambda i: resolver.resolve("user@d1.example"), args.seconds)
        negative = rate(lambda i: resolver.resolve("user@nowhere.invalid"), args.seconds)
        resolver.cache.positive_ttl = resolver.cache.negative_ttl = 1e-9  # every lookup goes to the database
        uncached = rate(lambda i: resolver.mappings[0].lookup(f"d{i % 100}.example"), args.seconds)
        resolver.close()

        rng = random.Random(1)
        rcpts = [f"user{rng.randrange(1000)}@d{rng.randrange(100)}.example" for _ in range(10_000)]
        distinct = len(set(rcpts))
        default_keys = build_resolver(parse_config(mapping_toml(database)))
        queries_default = count_queries(default_keys, rcpts)
        default_keys.close()
        domain_only = build_resolver(parse_config(mapping_toml(database, 'keys = ["domain"]\n')))
        queries_domain = count_queries(domain_only, rcpts)
        domain_only.close()
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()

    print(f"cache hit:           {hit:12,.0f} lookups/s")
    print(f"cached negative:     {negative:12,.0f} lookups/s")
    print(f"uncached MySQL:      {uncached:12,.0f} lookups/s (one query each, one thread)")
    print(f"10,000 RCPTs over 100 domains ({distinct:,} distinct addresses):")
    print(f"  keys full,base,domain (default): {queries_default:6,} database queries")
    print(f"  keys = [\"domain\"]:               {queries_domain:6,} database queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `willi -c FILE [-f | --check | --lookup ADDRESS... | -V]`.

Without -f, --check or --lookup Willi starts as a daemon (willi/daemon.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from willi import __version__
from willi.config import Config, ConfigError, load_config
from willi.daemon import reload_service, run_daemon, run_foreground
from willi.mappings import build_mapping
from willi.mappings.base import MappingError
from willi.resolver import LookupFailed, build_resolver
from willi.tls import TlsSetupError, server_context, upstream_contexts

DEFAULT_CONFIG = "/opt/willi/etc/willi.toml"
log = logging.getLogger("willi")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="willi", description="Willi: a recipient-routing SMTP proxy for the MX role.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground, log to stderr, no pidfile (for debugging); "
                             "the default is to detach as a daemon")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="validate the configuration, load every mapping, then exit")
    mode.add_argument("--lookup", metavar="ADDRESS", nargs="+",
                      help="show which mapping and key route each ADDRESS (and whether the cache answered), "
                           "like postmap -q")
    parser.add_argument("-V", "--version", action="version", version=f"willi {__version__}")
    return parser


def fail(message: str, status: int = 1) -> int:
    print(f"willi: {message}", file=sys.stderr)
    return status


def check(config: Config) -> int:
    """Load everything a start would load; print one line per part."""
    print(f"config {config.path}: ok")
    if config.tls_cert and config.tls_key:
        server_context(config.tls_cert, config.tls_key)
        print(f"tls: certificate {config.tls_cert} loaded")
    upstream_contexts(config.upstream_tls_ca)
    failures = 0
    for index, mapping_config in enumerate(config.mappings):
        mapping = build_mapping(mapping_config, index, case_sensitive_local=config.local_part_case_sensitive)
        try:
            print(f"mappings[{index}] {mapping.check()}")
        except MappingError as exc:
            failures += 1
            print(f"willi: mappings[{index}] {exc}", file=sys.stderr)
        finally:
            mapping.close()
    listen = ", ".join(str(a) for a in config.listen)
    print(f"listen: {listen}")
    return 1 if failures else 0


def lookup(config: Config, addresses: Sequence[str]) -> int:
    """Print how each address routes, like `postmap -q`.

    Exit 0 when all are routed, 1 when one is unmapped, 2 when a mapping
    failed. One resolver serves all addresses, so later ones show when the
    cache answered (e.g. a second address of the same domain).
    """
    resolver = build_resolver(config)
    status = 0
    try:
        for address in addresses:
            print(f"{address}: keys tried in order: {', '.join(resolver.keys(address))}")
            try:
                resolution = resolver.resolve(address)
            except LookupFailed as exc:
                print(f"willi: {exc}", file=sys.stderr)
                status = 2
                continue
            if resolution.route is None:
                print(f"{address}: no mapping matched (the client would get 554 5.7.1 Relay access denied)")
                status = max(status, 1)
                continue
            route = resolution.route
            print(f"{address}: mapping={resolution.mapping} key={resolution.key} server={route.endpoint} "
                  f"tls_verify={str(route.tls_verify).lower()} cached={'yes' if resolution.cached else 'no'}")
        return status
    finally:
        resolver.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    try:
        if args.check:
            return check(config)
        if args.lookup:
            return lookup(config, args.lookup)
    except (MappingError, TlsSetupError) as exc:
        return fail(str(exc))
    if args.foreground:
        return run_foreground(config)
    return run_daemon(config)


__all__ = ["build_parser", "check", "lookup", "main", "reload_service", "run_daemon", "run_foreground"]


if __name__ == "__main__":
    sys.exit(main())

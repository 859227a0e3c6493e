"""Command line: `willi -c FILE [-f | --check | --lookup ADDRESS... | --probe ADDRESS [--from SENDER] | -V]`.

Without -f, --check, --lookup or --probe Willi starts as a daemon
(willi/daemon.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from willi import __version__
from willi.config import Config, ConfigError, domain_warning, load_config
from willi.daemon import run_daemon, run_foreground
from willi.mappings import build_mapping
from willi.mappings.base import MappingError
from willi.privileges import Identity, StartupError, drop_privileges, resolve_identity
from willi.protocol import AddressError
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
                      help="validate the configuration and load every mapping, certificate and key as the "
                           "configured user, then exit 0 (all well) or 1")
    mode.add_argument("--lookup", metavar="ADDRESS", nargs="+",
                      help="show which mapping and key route each ADDRESS, its upstreams and TLS/XCLIENT policy "
                           "(and whether the cache answered), like postmap -q")
    mode.add_argument("--probe", metavar="ADDRESS",
                      help="route ADDRESS as a transaction would and walk the upstream dialog to RCPT and back "
                           "(nothing is delivered); exit 0 accepted, 1 refused, 2 temporary failure")
    parser.add_argument("--from", dest="sender", default="", metavar="SENDER",
                        help="the MAIL FROM address for --probe (default: the null sender <>)")
    parser.add_argument("-V", "--version", action="version", version=f"willi {__version__}")
    return parser


def fail(message: str, status: int = 1) -> int:
    print(f"willi: {message}", file=sys.stderr)
    return status


def _as_service_user(config: Config) -> None:
    """Run the rest as `user` when started as root, as the daemon does after binding."""
    identity = resolve_identity(config)
    if identity is not None and os.geteuid() == 0 and identity.uid != 0:
        drop_privileges(identity)


def check(config: Config) -> int:
    """Load everything a start (and a reload) would load, as the service user; print one line per part.

    Nothing says "ok" before everything was tried: the verdict is the last
    line, `check passed` or `check FAILED`. Run as root with `user` set,
    the checks run in a child process that has dropped to that user, so an
    unreadable CSV, certificate or key is found here and not at the next
    SIGHUP.
    """
    listen = ", ".join(str(a) for a in config.listen)
    print(f"config {config.path}: parsed (listen {listen}, workers {config.workers})")
    try:
        identity = resolve_identity(config)
    except ConfigError as exc:
        return fail(f"check FAILED: {exc}")
    if identity is not None and os.geteuid() == 0 and identity.uid != 0:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                drop_privileges(identity)
                status = _check_parts(config, identity)
            except StartupError as exc:
                fail(str(exc))
            except Exception as exc:  # os._exit below would swallow the traceback: say at least what failed
                fail(f"check FAILED: unexpected error: {type(exc).__name__}: {exc}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    return _check_parts(config, identity)


def _check_parts(config: Config, identity: Identity | None) -> int:
    who = f"user {identity.user}" if identity else f"uid {os.geteuid()} (no user set)"
    print(f"checking as {who}")
    failures = 0

    def problem(text: str) -> None:
        nonlocal failures
        failures += 1
        sys.stdout.flush()  # keep stdout and stderr in order on a terminal or in a journal
        print(f"willi: {text}" + (f" (as user {identity.user})" if identity else ""), file=sys.stderr)

    if identity is not None:  # a SIGHUP makes the daemon read the file again, as this user
        try:
            load_config(config.path)
        except ConfigError as exc:
            problem(f"{exc}; a reload (SIGHUP) would fail")
    if config.tls_cert and config.tls_key:
        try:
            server_context(config.tls_cert, config.tls_key)
            print(f"tls: certificate {config.tls_cert} and key {config.tls_key} loaded")
        except TlsSetupError as exc:
            problem(str(exc))
    try:
        upstream_contexts(config.upstream_tls_ca)
        if config.upstream_tls_ca:
            print(f"upstream_tls_ca {config.upstream_tls_ca} loaded")
    except TlsSetupError as exc:
        problem(str(exc))
    for index, mapping_config in enumerate(config.mappings):
        mapping = build_mapping(mapping_config, index, case_sensitive_local=config.local_part_case_sensitive)
        try:
            print(f"mappings[{index}] {mapping.check()}")
        except MappingError as exc:
            problem(f"mappings[{index}] {exc}")
        finally:
            mapping.close()
    if (warning := domain_warning(config)) is not None:
        sys.stdout.flush()
        print(f"willi: warning: {warning}", file=sys.stderr)
    if config.metrics_listen is not None:
        print(f"metrics: http://{config.metrics_listen}/metrics "
              f"(quick look: curl -s {config.metrics_listen}/metrics | grep willi_transactions)")
    if failures:
        sys.stdout.flush()
        print(f"willi: check FAILED: {failures} problem{'s' if failures > 1 else ''}", file=sys.stderr)
        return 1
    print("check passed")
    return 0


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
            try:
                print(f"{address}: keys tried in order: {', '.join(resolver.keys(address))}")
                resolution = resolver.resolve(address)
            except AddressError as exc:
                print(f"willi: {address}: {exc} (a client would get 553 5.1.3)", file=sys.stderr)
                status = max(status, 1)
                continue
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
                  f"tls_verify={str(route.tls_verify).lower()} {route.describe_tls(config.upstream_starttls)} "
                  f"xclient={route.xclient or config.xclient} cached={'yes' if resolution.cached else 'no'}")
        return status
    finally:
        resolver.close()


def probe(config: Config, address: str, sender: str) -> int:
    from willi.probe import Probe

    try:
        _as_service_user(config)
    except StartupError as exc:
        return fail(str(exc))
    return Probe(config).run(address, sender)


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
        if args.probe:
            return probe(config, args.probe, args.sender)
    except (MappingError, TlsSetupError, ConfigError) as exc:
        return fail(str(exc))
    if args.foreground:
        return run_foreground(config)
    return run_daemon(config)


__all__ = ["build_parser", "check", "lookup", "main", "probe", "run_daemon", "run_foreground"]


if __name__ == "__main__":
    sys.exit(main())

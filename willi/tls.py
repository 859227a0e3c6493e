"""Building the SSLContexts: one to serve STARTTLS, two to speak it upstream."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsSetupError(Exception):
    """A certificate, key or CA file that cannot be used; names the file."""


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Context for the client-facing STARTTLS: TLS 1.2 or newer, system ciphers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for key, path in (("tls_cert", cert_file), ("tls_key", key_file)):
        _readable(key, path)  # name the one file at fault: load_cert_chain's error names neither
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load tls_cert {cert_file} / tls_key {key_file}: {exc}") from None
    return ctx


def _readable(key: str, path: Path) -> None:
    """TlsSetupError naming `key` and `path` when this process (maybe the service user) cannot open it."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(f"cannot read {key} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class UpstreamTls:
    """Client contexts for upstream STARTTLS: checked and unchecked."""

    verify: ssl.SSLContext
    no_verify: ssl.SSLContext

    def for_route(self, tls_verify: bool) -> ssl.SSLContext:
        return self.verify if tls_verify else self.no_verify


def upstream_contexts(ca_file: Path | None = None) -> UpstreamTls:
    """`verify` checks chain and host name (system CAs plus `ca_file`)."""
    verify = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    verify.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            verify.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"cannot load upstream_tls_ca {ca_file}: {exc}") from None
    no_verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_verify.check_hostname = False
    no_verify.verify_mode = ssl.CERT_NONE
    return UpstreamTls(verify=verify, no_verify=no_verify)

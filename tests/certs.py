"""Certificates made while the tests run, so no key material is ever committed.

`make_pki` builds a throw-away CA with `trustme` and writes PEM files that
Willi's configuration can point at.  Calling it twice gives two unrelated CAs:
the second one is the "untrusted" PKI for verification-failure tests.
"""

from __future__ import annotations

import itertools
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trustme

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class TestPKI:
    """A CA plus a server certificate for the loopback names, as files on disk."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca: trustme.CA = field(repr=False)
    _serial: itertools.count[int] = field(
        default_factory=lambda: itertools.count(1), repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def issue(self, *names: str) -> tuple[Path, Path]:
        """Write a cert chain and key for `names`, signed by this CA.

        For tests that need a host name other than the loopback defaults,
        e.g. to prove that a name mismatch is rejected.
        """
        if not names:
            raise ValueError("issue() needs at least one host name")
        with self._lock:
            n = next(self._serial)
        leaf = self.ca.issue_cert(*names)
        cert_file = self.directory / f"issued-{n}.crt"
        key_file = self.directory / f"issued-{n}.key"
        _write_leaf(leaf, cert_file, key_file)
        return cert_file, key_file

    def server_context(
        self, cert_file: Path | None = None, key_file: Path | None = None
    ) -> ssl.SSLContext:
        """A server-side context, by default with the loopback certificate."""
        if (cert_file is None) != (key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file or self.cert_file, key_file or self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _write_leaf(leaf: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    """Write the full chain (leaf first) and the key, as servers expect them."""
    cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)


def make_pki(directory: Path) -> TestPKI:
    """Create a fresh CA and a loopback server certificate under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file = directory / "server.crt"
    key_file = directory / "server.key"
    _write_leaf(ca.issue_cert(*DEFAULT_NAMES), cert_file, key_file)
    return TestPKI(
        directory=directory,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        ca=ca,
    )

"""Starting Willi in-process for tests, and a raw-socket SMTP client.

Willi runs in this process on 127.0.0.1 port 0 (design.md, Tests), so a
test can read its state, and the stdlib `smtplib` or `RawClient` talk to
it over a real socket.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import toml

from willi.config import Config, parse_config
from willi.server import WilliService


@dataclass
class RunningWilli:
    """One started WilliService and how to reach it."""

    service: WilliService
    config: Config

    @property
    def host(self) -> str:
        return self.service.addresses[0][0]

    @property
    def port(self) -> int:
        return self.service.addresses[0][1]

    def smtp(self, **kwargs: object) -> smtplib.SMTP:
        """A connected stdlib client (caller quits or closes it)."""
        return smtplib.SMTP(self.host, self.port, timeout=10, **kwargs)  # type: ignore[arg-type]

    def raw(self, source: str | None = None) -> RawClient:
        return RawClient(self.host, self.port, source=source)

    def stop(self) -> None:
        self.service.stop(timeout=2.0)


def printable_id(value: object) -> str:
    """A parametrize id in printable ASCII (CR, LF, NUL, TAB and non-ASCII named).

    Ids holding backslash escapes are not found again when passed back on a
    command line, which is how mutmut runs the tests that cover a mutant.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    names = {"\r": "CR", "\n": "LF", "\x00": "NUL", "\t": "TAB"}
    return "".join(names.get(ch) or (ch if " " <= ch <= "~" else f"U+{ord(ch):04X}") for ch in text)


def willi_config(*, upstream_port: int | None = None, mappings: str | None = None, extra: str = "",
                 directory: Path | None = None) -> Config:
    """A test configuration: loopback port 0 and, by default, a static route to `upstream_port`."""
    if mappings is None:
        assert upstream_port is not None, "give upstream_port or mappings"
        mappings = f'[[mappings]]\ntype = "static"\nserver = "127.0.0.1:{upstream_port}"\ntls_verify = false\n'
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0", "domain": "mx.willi.test", "client_name_lookup": False,
        "upstream_command_timeout": "5s", "upstream_connect_timeout": "3s", "read_timeout": "10s",
        "upstream_reuse": False,  # see proxy_helpers.BASE_SETTINGS
    }
    settings.update(toml.loads(extra))  # a test's own settings override these defaults
    text = f"{toml.dumps(settings)}\n{mappings}"
    return parse_config(text, "test.toml", base=directory)


class RawClient:
    """A line-level SMTP client for what smtplib will not do (pipelining, bad bytes)."""

    def __init__(self, host: str, port: int, *, source: str | None = None, timeout: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> tuple[int, list[str]]:
        """Read one reply: (code, [text of each line])."""
        lines = []
        while True:
            line = self._line().rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] == " ":
                return int(line[:3]), lines

    def expect(self, code: int) -> list[str]:
        got, lines = self.reply()
        assert got == code, f"expected {code}, got {got} {lines}"
        return lines

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.send(line + "\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.example") -> list[str]:
        self.expect(220)
        self.send(f"EHLO {name}\r\n")
        return self.expect(250)

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert not self.buf, f"unread bytes before TLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

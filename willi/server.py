"""Listeners: one `ThreadingTCPServer` per listen address, one thread per client.

All listeners share a `Runtime` (config, resolver, TLS contexts) that a
reload replaces as a whole, and a `ConnectionLimiter`; sessions keep the
runtime they started with, so a reload never changes a dialog midway.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass

from willi.config import Config, ListenAddress
from willi.resolver import Resolver, build_resolver
from willi.session import SmtpSession
from willi.tls import UpstreamTls, server_context, upstream_contexts

log = logging.getLogger("willi.server")


@dataclass
class Runtime:
    """What a session needs, swapped whole on reload."""

    config: Config
    resolver: Resolver
    server_tls: ssl.SSLContext | None
    upstream_tls: UpstreamTls

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Load mappings and TLS material; raises on any unusable file."""
        server_tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        return cls(config, build_resolver(config), server_tls, upstream_contexts(config.upstream_tls_ca))

    def close(self) -> None:
        self.resolver.close()


class ConnectionLimiter:
    """Counts live sessions, globally and per client IP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_ip: Counter[str] = Counter()
        self.total = 0
        self.idle = threading.Condition(self._lock)

    def acquire(self, ip: str, config: Config) -> tuple[int, str] | None:
        """Reserve a slot, or return the (code, text) refusal."""
        with self._lock:
            if self.total >= config.max_connections:
                return 421, "4.3.2 Too many connections, try again later"
            if self._per_ip[ip] >= config.max_connections_per_ip:
                return 421, "4.7.0 Too many connections from your address, try again later"
            self.total += 1
            self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        with self._lock:
            self.total -= 1
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            if self.total == 0:
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.total > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.idle.wait(remaining)
        return True


def _client_ip(address: tuple) -> str:
    ip = address[0]
    return ip[7:] if ip.startswith("::ffff:") else ip


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one SmtpSession on the accepted socket."""

    server: WilliServer

    def handle(self) -> None:
        service = self.server.service
        runtime = service.acquire_runtime()
        session = SmtpSession(self.request, self.client_address, runtime, service.draining)
        service.sessions_add(session)
        try:
            session.run()
        finally:
            service.sessions_remove(session)
            service.release_runtime(runtime)
            service.limiter.release(_client_ip(self.client_address))


class WilliServer(socketserver.ThreadingTCPServer):
    """A ThreadingTCPServer for one listen address that enforces the connection limits."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: ListenAddress, service: WilliService) -> None:
        self.address_family = address.family
        self.service = service
        super().__init__((address.host, address.port), SessionHandler, bind_and_activate=False)
        try:
            if address.family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def verify_request(self, request: socket.socket, client_address: tuple) -> bool:  # type: ignore[override]
        """Refuse over-limit clients with 421 here, before a thread is spent on them."""
        refusal = self.service.limiter.acquire(_client_ip(client_address), self.service.runtime.config)
        if refusal is None:
            return True
        code, text = refusal
        log.warning("client=%s:%s refused: %s %s", client_address[0], client_address[1], code, text)
        try:
            request.settimeout(1.0)
            request.sendall(f"{code} {text}\r\n".encode())
        except OSError:
            pass
        return False

    def handle_error(self, request: object, client_address: tuple) -> None:
        log.exception("client=%s unhandled error in connection thread", client_address)


class WilliService:
    """All listeners of one Willi process, started and stopped together."""

    def __init__(self, config: Config, runtime: Runtime | None = None) -> None:
        self.runtime = runtime or Runtime.build(config)
        self.limiter = ConnectionLimiter()
        self.servers: list[WilliServer] = []
        self.threads: list[threading.Thread] = []
        self._sessions: set[SmtpSession] = set()
        self._sessions_lock = threading.Lock()
        self._runtime_users: Counter[int] = Counter()  # id(runtime) -> sessions still using it
        self.draining = threading.Event()

    @property
    def config(self) -> Config:
        return self.runtime.config

    def bind(self) -> None:
        """Open every listening socket (as root, before dropping privileges)."""
        try:
            for address in self.config.listen:
                self.servers.append(WilliServer(address, self))
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [srv.server_address[:2] for srv in self.servers]

    def start(self) -> WilliService:
        """Bind (if not yet) and serve in background threads."""
        if not self.servers:
            self.bind()
        for srv in self.servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"listen-{srv.server_address[1]}", daemon=True)
            t.start()
            self.threads.append(t)
        for srv in self.servers:
            log.info("listening on %s", _format_address(srv.server_address))
        return self

    def sessions_add(self, session: SmtpSession) -> None:
        with self._sessions_lock:
            self._sessions.add(session)

    def sessions_remove(self, session: SmtpSession) -> None:
        with self._sessions_lock:
            self._sessions.discard(session)

    def sessions(self) -> list[SmtpSession]:
        with self._sessions_lock:
            return list(self._sessions)

    def acquire_runtime(self) -> Runtime:
        """The current runtime, counted as used by one more session."""
        with self._sessions_lock:
            runtime = self.runtime
            self._runtime_users[id(runtime)] += 1
            return runtime

    def release_runtime(self, runtime: Runtime) -> None:
        """A session is done with `runtime`; a retired one closes with its last user."""
        with self._sessions_lock:
            self._runtime_users[id(runtime)] -= 1
            retired = runtime is not self.runtime and self._runtime_users[id(runtime)] <= 0
            if retired:
                del self._runtime_users[id(runtime)]
        if retired:
            runtime.close()

    def reload(self, runtime: Runtime) -> None:
        """Swap in a new runtime; running sessions finish with the old one, which
        is closed (database pools and all) when the last of them ends."""
        with self._sessions_lock:
            old, self.runtime = self.runtime, runtime
            unused = self._runtime_users.get(id(old), 0) <= 0
            if unused:
                self._runtime_users.pop(id(old), None)
        if unused:
            old.close()

    def stop_accepting(self) -> None:
        for srv in self.servers:
            srv.shutdown()
        for t in self.threads:
            t.join(timeout=5)
        self.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: no new clients, idle ones get 421 4.3.2, transactions
        in flight may finish for up to `timeout`, then the rest are cut off."""
        self.draining.set()
        self.stop_accepting()
        if not self.limiter.wait_idle(timeout):
            for session in self.sessions():
                try:
                    session.stream.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.limiter.wait_idle(2.0)
        self.runtime.close()

    def close(self) -> None:
        for srv in self.servers:
            srv.server_close()
        self.servers = []
        self.threads = []


def _format_address(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""Listeners and sessions of one process: a `ThreadingTCPServer` per listen address, a thread per client.

The servers are made (and their sockets bound) once, by the process that
starts Willi, before it drops privileges; with `workers` > 1 the
supervisor forks and every worker serves the same inherited sockets (the
kernel hands each connection to one waiting worker, and the workers take turns; see `Acceptor`).

One acceptor thread per process waits on all listeners and a wake pipe, so
nothing wakes up periodically: an idle Willi sleeps until a client
connects or it is told to stop. Accepting follows socketserver's hooks
(verify_request, process_request, shutdown_request): the connection slot is
taken in verify_request and released in shutdown_request, which socketserver
calls on every path, including when no thread could be started.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import socketserver
import threading
import time

from willi.config import Config, ListenAddress
from willi.lifecycle import Lifecycle
from willi.limits import SharedLimits, Ticket
from willi.netio import is_transient_accept_error, set_kernel_timeouts
from willi.peer import Peer, normalize_ip
from willi.route import format_endpoint
from willi.runtime import Runtime
from willi.session import SmtpSession

log = logging.getLogger("willi.server")

THREAD_STACK = 512 * 1024
BACKOFF_MAX = 1.0


_PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Give the running thread `name` in ps -L, top -H and /proc (Python 3.11 names only its own object).

    For the acceptor only: in a session thread the foreign call would touch
    stack pages that every idle connection then keeps (measured: +4.4 KiB
    per idle connection).
    """
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one SmtpSession on the accepted socket."""

    server: WilliServer

    def handle(self) -> None:
        server = self.server
        server.service.run_session(self.request, self.client_address, server.tickets.get(self.request), server)


class WilliServer(socketserver.ThreadingTCPServer):
    """A ThreadingTCPServer for one listen address that enforces the connection limits."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: ListenAddress, service: WilliService, backlog: int) -> None:
        self.address_family = address.family
        self.request_queue_size = backlog  # the kernel caps it at net.core.somaxconn
        self.service = service
        config = service.config
        #: Kernel receive/send timeouts every accepted socket inherits (the session adjusts them per step).
        self.timeouts = (config.read_timeout, config.write_timeout)
        self.tickets: dict[socket.socket, Ticket] = {}
        super().__init__((address.host, address.port), SessionHandler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self.socket.setblocking(False)  # several workers share it: a worker that loses the race gets EAGAIN

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Replies go out as whole batches already. Accepted sockets inherit this and the timeouts (Linux):
        # three system calls saved per connection.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_kernel_timeouts(self.socket, *self.timeouts)
        super().server_bind()

    def verify_request(self, request: socket.socket, client_address: tuple) -> bool:  # type: ignore[override]
        """Take a connection slot, or refuse with 421 here, before a thread is spent on the client."""
        service = self.service
        ip = normalize_ip(client_address[0])
        admitted = service.limits.admit(ip, per_ip=not service.is_proxy(ip))
        if isinstance(admitted, Ticket):
            self.tickets[request] = admitted
            return True
        log.warning("client=%s refused: 421 %s", format_endpoint(ip, client_address[1]), admitted)
        try:
            request.settimeout(1.0)
            request.sendall(f"421 {admitted}\r\n".encode())
        except OSError:
            pass
        return False

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        """Every accepted socket passes here exactly once: the slot goes back with it.

        The session has closed its connection itself (politely, TLS
        close_notify included); socketserver's shutdown(SHUT_WR) would only
        fail on the closed socket, so the socket is just closed.
        """
        ticket = self.tickets.pop(request, None)
        if ticket is not None:
            ticket.release()
        self.close_request(request)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        """One thread per client, as ThreadingMixIn; the thread is reused afterwards (SessionThreads)."""
        self.service.threads.submit(self, request, client_address)

    def handle_error(self, request: object, client_address: tuple) -> None:
        log.exception("client=%s unhandled error in connection thread", client_address)

    def get_request(self) -> tuple[socket.socket, tuple]:
        """socket.accept() without its enum conversions (family, type): plain ints are as good here."""
        fd, client_address = self.socket._accept()  # type: ignore[attr-defined]
        return socket.socket(self.address_family, socket.SOCK_STREAM, 0, fd), client_address

    def accept_one(self) -> bool:
        """Accept and dispatch one connection as socketserver's _handle_request_noblock does."""
        request, client_address = self.get_request()
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)
        return True


class SessionThreads:
    """Session threads that are reused: one client per thread at a time, like ThreadingMixIn without
    a thread start and exit per client (a clone, a stack mmap and a handshake on the GIL each).

    An idle thread waits for its next client at most IDLE_THREAD_TIME and keeps no more than
    MAX_IDLE_THREADS others company; a burst leaves no crowd of sleeping threads behind.
    """

    IDLE_THREAD_TIME = 60.0
    MAX_IDLE_THREADS = 64

    def __init__(self) -> None:
        self._idle: list[_SessionThread] = []
        self._lock = threading.Lock()

    def submit(self, server: WilliServer, request: socket.socket, client_address: tuple) -> None:
        """Run the client's session on an idle thread, or a new one (RuntimeError if none can start)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is not None:
            worker.job = (server, request, client_address)
            worker.wake.release()
            return
        worker = _SessionThread(self, (server, request, client_address))
        worker.start()

    def _park(self, worker: _SessionThread) -> bool:
        """Back to the idle stack after a session; False when the thread should end instead."""
        with self._lock:
            if len(self._idle) >= self.MAX_IDLE_THREADS:
                return False
            self._idle.append(worker)
        if worker.wake.acquire(timeout=self.IDLE_THREAD_TIME):
            return True
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return False
        worker.wake.acquire()  # popped just now by submit: its job is on the way
        return True


class _SessionThread(threading.Thread):
    def __init__(self, pool: SessionThreads, job: tuple[WilliServer, socket.socket, tuple]) -> None:
        super().__init__(name="willi-session", daemon=True)
        self.pool = pool
        self.job: tuple[WilliServer, socket.socket, tuple] | None = job
        self.wake = threading.Lock()
        self.wake.acquire()

    def run(self) -> None:
        while True:
            job, self.job = self.job, None
            if job is not None:
                server, request, client_address = job
                try:
                    server.finish_request(request, client_address)
                except Exception:
                    server.handle_error(request, client_address)
                finally:
                    server.shutdown_request(request)
                del job, server, request
            if not self.pool._park(self):
                return


class Acceptor:
    """One thread that accepts on every listener of this process, and sleeps otherwise.

    With several workers on one listening socket, a plain epoll wakes every
    worker's acceptor for each new connection and all but one find nothing
    (accept says EAGAIN): three wasted wake-ups per connection with four
    workers. So a shared listener is registered with EPOLLEXCLUSIVE, which
    wakes one waiting acceptor. The kernel always tries its exclusive
    waiters in the order they registered, which would give nearly every
    connection to the first worker; so the acceptor that got a connection
    registers again (EPOLL_CTL_DEL, EPOLL_CTL_ADD), which puts it last in
    line: idle workers take new connections in turn.
    """

    def __init__(self, servers: list[WilliServer], *, shared: bool = False) -> None:
        self.servers = servers
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._spare: int | None = self._open_spare()
        self._starved = False
        self._exclusive = select.EPOLLEXCLUSIVE if shared and hasattr(select, "EPOLLEXCLUSIVE") else 0

    @staticmethod
    def _open_spare() -> int | None:
        """A descriptor held back, so that when they run out one client can still be told 421."""
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="willi-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self._spare):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._spare = None

    def _run(self) -> None:
        name_os_thread("willi-accept")
        epoll = select.epoll()
        epoll.register(self._wake_r, select.EPOLLIN)
        listeners = {server.socket.fileno(): server for server in self.servers}
        for fd in listeners:
            self._register(epoll, fd)
        backoff = 0.0
        try:
            while not self._stop:
                for fd, _ in epoll.poll(backoff or -1):
                    if fd == self._wake_r:
                        return
                    accepted, backoff = self._accept(listeners[fd], backoff)
                    if accepted and self._exclusive:
                        epoll.unregister(fd)  # to the back of the line (see the class docstring)
                        self._register(epoll, fd)
                if backoff:
                    time.sleep(backoff)  # out of descriptors: give the sessions time to end
        finally:
            epoll.close()

    def _register(self, epoll: select.epoll, fd: int) -> None:
        """Wait for `fd` to be readable: exclusively when shared, plainly where the kernel refuses that."""
        if self._exclusive:
            try:
                epoll.register(fd, select.EPOLLIN | self._exclusive)
                return
            except OSError as exc:  # EPOLLEXCLUSIVE needs Linux 4.5
                log.warning("EPOLLEXCLUSIVE refused (%s): every worker wakes for each new connection",
                            exc.strerror)
                self._exclusive = 0
        epoll.register(fd, select.EPOLLIN)

    def _accept(self, server: WilliServer, backoff: float) -> tuple[bool, float]:
        """Accept one waiting connection: whether one came, and the new backoff.

        One per readiness event: the epoll is level-triggered, so a queue
        of several brings us straight back, and the usual single connection
        costs no second accept() that only says EAGAIN.
        """
        try:
            server.accept_one()
        except BlockingIOError:
            return False, 0.0
        except OSError as exc:
            if is_transient_accept_error(exc):
                return False, self._starving(server, exc, backoff)
            if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                log.warning("accept on %s failed: %s", format_endpoint(*server.server_address[:2]), exc)
            return False, 0.0
        if self._starved:
            self._starved = False
            log.warning("accepting connections again: file descriptors are available")
        return True, 0.0

    def _starving(self, server: WilliServer, exc: OSError, backoff: float) -> float:
        """No descriptors: tell one waiting client 421 with the spare one, log once, back off."""
        if not self._starved:
            self._starved = True
            log.error("cannot accept connections: %s; backing off until descriptors free up "
                      "(raise `ulimit -n` / LimitNOFILE, or lower max_connections)", exc.strerror)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                request, _ = server.socket.accept()
                try:
                    request.settimeout(0.5)
                    request.sendall(b"421 4.3.2 Too busy, try again later\r\n")
                except OSError:
                    pass
                request.close()
            except OSError:
                pass
            self._spare = self._open_spare()
        return min(BACKOFF_MAX, max(0.05, backoff * 2))


class WilliService:
    """All listeners and sessions of one Willi process, started and stopped together."""

    def __init__(self, config: Config, runtime: Runtime | None = None, *, limits: SharedLimits | None = None,
                 load: bool = True) -> None:
        """`load` False: bind first and load the runtime later (`install`), as the unprivileged user."""
        self._config = config
        self.runtime: Runtime = runtime or (Runtime.build(config) if load else None)  # type: ignore[assignment]
        self.limits = limits or SharedLimits(1, config.max_connections)
        self.limits.configure(config.max_connections, config.max_connections_per_ip)
        self.lifecycle = Lifecycle()
        self.threads = SessionThreads()
        self.servers: list[WilliServer] = []
        self.acceptor: Acceptor | None = None
        self._sessions: set[SmtpSession] = set()
        self._sessions_lock = threading.Condition()
        self._runtime_users: dict[int, int] = {}  # id(runtime) -> sessions still using it

    @property
    def config(self) -> Config:
        return self.runtime.config if self.runtime is not None else self._config

    def preserved_fds(self) -> list[int]:
        """Descriptors made before daemonizing that must survive DaemonContext's close-all."""
        return [self.limits.lock_fd, *self.lifecycle.fds]

    def install(self, runtime: Runtime) -> None:
        """The first runtime, or a new one (reload)."""
        if self.runtime is None:
            self.runtime = runtime
            self.limits.configure(runtime.config.max_connections, runtime.config.max_connections_per_ip)
        else:
            self.reload(runtime)

    def is_proxy(self, ip: str) -> bool:
        hosts = self.config.proxy_protocol_hosts
        if not hosts:
            return False
        import ipaddress

        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in hosts)

    # ---------------------------------------------------------- listeners

    def bind(self) -> None:
        """Open every listening socket (as root, before dropping privileges)."""
        address = None
        try:
            for address in self.config.listen:
                self.servers.append(WilliServer(address, self, self.config.listen_backlog))
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [srv.server_address[:2] for srv in self.servers]

    def start(self, *, announce: bool = True) -> WilliService:
        """Bind (if not yet) and accept in a background thread; `announce` logs the addresses."""
        if not self.servers:
            self.bind()
        threading.stack_size(THREAD_STACK)
        self.acceptor = Acceptor(self.servers, shared=self.limits.regions > 1)
        self.acceptor.start()
        if announce:
            self.announce()
        return self

    def announce(self) -> None:
        for srv in self.servers:
            log.info("listening on %s", format_endpoint(*srv.server_address[:2]))

    # ---------------------------------------------------------- sessions

    def run_session(self, sock: socket.socket, client_address: tuple, ticket: Ticket | None,
                    server: WilliServer | None = None) -> None:
        """The body of a connection thread: one session, counted while it lives."""
        runtime = self._acquire_runtime()
        listener = server.server_address if server is not None else None
        timeouts = server.timeouts if server is not None else (0.0, 0.0)
        session = SmtpSession(sock, Peer.from_socket(sock, client_address, listener), runtime, self.lifecycle,
                              ticket, timeouts)
        with self._sessions_lock:
            self._sessions.add(session)
        try:
            session.run()
        finally:
            with self._sessions_lock:
                self._sessions.discard(session)
                if not self._sessions:
                    self._sessions_lock.notify_all()
            self._release_runtime(runtime)

    def sessions(self) -> list[SmtpSession]:
        with self._sessions_lock:
            return list(self._sessions)

    def _acquire_runtime(self) -> Runtime:
        with self._sessions_lock:
            runtime = self.runtime
            self._runtime_users[id(runtime)] = self._runtime_users.get(id(runtime), 0) + 1
            return runtime

    def _release_runtime(self, runtime: Runtime) -> None:
        """A session is done with `runtime`; a retired one closes with its last user."""
        with self._sessions_lock:
            left = self._runtime_users[id(runtime)] - 1
            retired = runtime is not self.runtime and left <= 0
            if left <= 0:
                del self._runtime_users[id(runtime)]
            else:
                self._runtime_users[id(runtime)] = left
        if retired:
            runtime.close()

    def reload(self, runtime: Runtime) -> None:
        """Swap in a new runtime; running sessions finish with the old one, which
        is closed (database pools and all) when the last of them ends."""
        with self._sessions_lock:
            old, self.runtime = self.runtime, runtime
            unused = self._runtime_users.get(id(old), 0) <= 0
        self.limits.configure(runtime.config.max_connections, runtime.config.max_connections_per_ip)
        if unused and old is not runtime:
            old.close()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._sessions_lock:
            while self._sessions:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._sessions_lock.wait(remaining)
        return True

    # ---------------------------------------------------------- stopping

    def stop_accepting(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
            self.acceptor = None
        self.close()

    def drain(self) -> None:
        """Graceful stop begins: no new clients; idle ones hear 421 4.3.2 now, the rest after their transaction."""
        self.lifecycle.drain()
        self.stop_accepting()
        for session in self.sessions():
            if session.idle:
                session.channel.interrupt()

    def force(self) -> None:
        """The drain ends now: every session hears 421 4.3.2, upstream transactions are cut without a dot."""
        self.lifecycle.stop()
        self.stop_accepting()
        for session in self.sessions():
            session.channel.interrupt()
            session.relay.abort()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain, wait up to `timeout` for transactions in flight, then force the rest."""
        self.drain()
        if not self.wait_idle(timeout):
            self.force()
            self.finish_force()
        if self.runtime is not None:
            self.runtime.close()
        self.release()

    def release(self) -> None:
        """Give back what this process's service holds besides sockets (pipes, the limits' lock file)."""
        self.close()
        self.lifecycle.close()
        self.limits.close()

    def finish_force(self) -> None:
        """After `force`: a session still running after 2 s has its connection broken under it."""
        if not self.wait_idle(2.0):
            for session in self.sessions():
                session.channel.abort()
            self.wait_idle(1.0)

    def close(self) -> None:
        for srv in self.servers:
            srv.server_close()
        self.servers = []

"""One connection's socket with a read buffer and a deadline for every whole step.

Both sides of Willi (the client's connection and each upstream connection)
read lines and replies through a `Channel`, so there is one line reader and
one notion of time: a step (a command line, a reply, a STARTTLS handshake,
a write) has a deadline, and it is the deadline of the whole step, not of
each read, so a peer dribbling one byte at a time gains nothing.

Cheap timeouts. A plain TCP socket stays in blocking mode with the kernel's
SO_RCVTIMEO/SO_SNDTIMEO, which are changed only when the time left in the
step is shorter than the value in force (after an early expiry the loop
sets the exact remainder), so the usual read or write is one system call
with no poll() and no fcntl() around it. A TLS socket cannot do that
(CPython's ssl module retries a timed-out blocking read forever), so it runs
non-blocking and waits in poll() itself, which also lets it wake for a
shutdown: `wake` file descriptors passed to a read end the wait when they
become readable.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import time
from collections.abc import Sequence

READ_CHUNK = 65536
TLS_CLOSE_WAIT = 1.0
_POLLIN = select.POLLIN | select.POLLPRI
_POLL_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


class ChannelError(Exception):
    """Base of the ways a step can end without its result."""


class TimedOut(ChannelError):
    """The step's deadline passed."""


class Closed(ChannelError):
    """The peer closed the connection, or the socket failed."""


class Woken(ChannelError):
    """A wake descriptor fired: the process is draining or stopping."""


class LineTooLong(ChannelError):
    """A line over the limit; it has been discarded up to its end."""


def _slack(remaining: float) -> float:
    """How far a kernel timeout may overshoot the step's deadline before it is worth a setsockopt.

    Each new step's remaining time is a hair shorter than the value set for
    the last one; without some slack every step would cost a system call.
    """
    return min(1.0, remaining * 0.25)


def set_kernel_timeouts(sock: socket.socket, rcv: float, snd: float) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO; on a listening socket they are inherited by every accepted one (Linux)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(rcv))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(snd))


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)  # 0 would mean "no timeout" to the kernel
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class Channel:
    """A socket, its read buffer and its deadlines (see the module docstring)."""

    __slots__ = ("_poll", "_rcv", "_snd", "buffer", "sock", "tls")

    def __init__(self, sock: socket.socket, rcv: float = 0.0, snd: float = 0.0) -> None:
        """`rcv`/`snd`: kernel timeouts the socket already has (accepted sockets inherit the listener's)."""
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        self.sock: socket.socket = sock
        self.buffer = bytearray()
        self.tls = False
        self._rcv = rcv  # kernel SO_RCVTIMEO in force; 0 = none set yet
        self._snd = snd
        self._poll: select.poll | None = None

    # ------------------------------------------------------------ reading

    def fill(self, deadline: float, wake: Sequence[int] = (), size: int = READ_CHUNK) -> None:
        """Read one chunk into the buffer; Closed at EOF."""
        data = self.recv(deadline, wake, size)
        if not data:
            raise Closed("connection closed by peer")
        self.buffer += data

    def recv(self, deadline: float, wake: Sequence[int] = (), size: int = READ_CHUNK) -> bytes:
        """One chunk from the socket (b"" at EOF), within `deadline`."""
        if self.tls:
            return self._recv_tls(deadline, wake, size)
        sock = self.sock
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut()
            if self._rcv == 0 or self._rcv > remaining + _slack(remaining):
                self._set_rcv(remaining)
            try:
                return sock.recv(size)
            except BlockingIOError:
                self._rcv = 0  # expired early (set for a shorter step): set the exact remainder
            except InterruptedError:
                continue
            except OSError as exc:
                raise Closed(str(exc)) from None

    def _set_rcv(self, seconds: float) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        except OSError as exc:
            raise Closed(str(exc)) from None
        self._rcv = seconds

    def _recv_tls(self, deadline: float, wake: Sequence[int], size: int) -> bytes:
        sock = self.sock
        while True:
            try:
                return sock.recv(size)
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline, wake)
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline, wake)
            except ssl.SSLZeroReturnError:
                return b""
            except (OSError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from None

    def _wait(self, events: int, deadline: float, wake: Sequence[int]) -> None:
        """poll() for the socket and the wake descriptors, until the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut()
        poller = select.poll()
        fd = self.sock.fileno()
        if fd < 0:
            raise Closed("socket closed")
        poller.register(fd, events)
        for w in wake:
            poller.register(w, _POLLIN)
        try:
            ready = poller.poll(remaining * 1000)
        except InterruptedError:
            return
        if not ready:
            raise TimedOut()
        if any(rfd in wake for rfd, _ in ready):
            raise Woken()

    def readline(self, limit: int, deadline: float, wake: Sequence[int] = ()) -> bytes:
        """The next LF-terminated line, whole, within `deadline`.

        A line longer than `limit` is read to its end and discarded, then
        LineTooLong; the buffer never holds more than `limit` plus one chunk.
        """
        skipping = False
        start = 0
        while True:
            nl = self.buffer.find(b"\n", start)
            if nl >= 0:
                line = bytes(self.buffer[: nl + 1])
                del self.buffer[: nl + 1]
                if skipping or len(line) > limit:
                    raise LineTooLong()
                return line
            if len(self.buffer) > limit:
                skipping = True
                self.buffer.clear()
            start = len(self.buffer)
            self.fill(deadline, wake)

    def has_line(self) -> bool:
        return b"\n" in self.buffer

    def take_buffer(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def pending(self) -> bool:
        """Is anything waiting to be read (buffered, or on the socket right now)?"""
        if self.buffer:
            return True
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return True
        fd = self.fileno()
        if fd < 0:
            return True
        poller = select.poll()  # not select(): it cannot see descriptors past 1023
        poller.register(fd, _POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    # ------------------------------------------------------------ writing

    def send(self, data: bytes | bytearray | memoryview, deadline: float) -> None:
        """Write all of `data` within `deadline`."""
        sock = self.sock
        if not self.tls:
            self.prepare_send(deadline)
            try:  # the usual case: everything in one call
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise Closed(str(exc)) from None
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:  # SO_SNDTIMEO expired, or a TLS socket would block
                self._snd = 0
                self._writable(deadline)
                continue
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline, ())
                continue
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline, ())
                continue
            except InterruptedError:
                continue
            except (OSError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from None
            view = view[sent:]

    def _writable(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut()
        if self.tls:
            self._wait(select.POLLOUT, deadline, ())
            return
        if self._snd == 0 or self._snd > remaining:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(remaining))
            except OSError as exc:
                raise Closed(str(exc)) from None
            self._snd = remaining

    def prepare_send(self, deadline: float) -> None:
        """Bound the next plain writes by `deadline` (a setsockopt only when the value in force is longer)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut()
        if self._snd == 0 or self._snd > remaining + _slack(remaining):
            self._writable(deadline)

    # ------------------------------------------------------------ TLS and closing

    def start_tls(self, context: ssl.SSLContext, deadline: float, *, server_side: bool,
                  server_hostname: str | None = None) -> None:
        """Discard what was read ahead in plaintext (RFC 3207 4.2), then handshake within `deadline`."""
        self.buffer.clear()
        try:
            tls = context.wrap_socket(self.sock, server_side=server_side, server_hostname=server_hostname,
                                      do_handshake_on_connect=False)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise Closed(f"TLS setup failed: {exc}") from None
        tls.setblocking(False)
        self.sock, self.tls = tls, True
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline, ())
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline, ())
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                raise Closed(f"TLS handshake failed: {exc}") from None

    def interrupt(self) -> None:
        """Wake a reader blocked on a plain socket (it sees EOF); writing still works.

        TLS readers are woken through their wake descriptors instead: a
        shut-down read side would break the TLS session for writing too.
        """
        if not self.tls:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def abort(self) -> None:
        """Break the connection under a thread blocked on it (forced stop)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self, *, polite: bool = True) -> None:
        """Close; a TLS connection first sends close_notify (waiting at most TLS_CLOSE_WAIT for the peer's)."""
        sock = self.sock
        if polite and self.tls:
            deadline = time.monotonic() + TLS_CLOSE_WAIT
            for _ in range(3):
                try:
                    sock.unwrap()  # type: ignore[attr-defined]
                    break
                except ssl.SSLWantReadError:
                    try:
                        self._wait(select.POLLIN, deadline, ())
                    except ChannelError:
                        break
                except ssl.SSLWantWriteError:
                    try:
                        self._wait(select.POLLOUT, deadline, ())
                    except ChannelError:
                        break
                except (OSError, ssl.SSLError, ValueError):
                    break
        try:
            sock.close()
        except OSError:
            pass

    def fileno(self) -> int:
        try:
            return self.sock.fileno()
        except OSError:
            return -1


def is_transient_accept_error(exc: OSError) -> bool:
    """accept() failures that say "no descriptors or memory right now", not "this client"."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

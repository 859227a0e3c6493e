"""A scriptable fake upstream SMTP server that records what the proxy sends.

Proxy tests need an upstream that behaves like a small, strict ESMTP server
(so protocol mistakes show up), that can be told to reject, delay or drop the
connection at any step, and that keeps the exact bytes it received so tests
can assert that Willi relays messages byte for byte.

Steps, used as keys of `replies`, `delays` and `drop_at`: "greeting",
"ehlo", "helo", "starttls", "xclient", "mail", "rcpt", "data", "dot" (the
reply after the message's terminating ".\\r\\n"), "rset", "noop", "quit",
and the lowercase verb of any other command.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

SERVER_NAME = "fake.upstream"
XCLIENT_REPLY = f"220 {SERVER_NAME} ESMTP"
IDLE_TIMEOUT = 30.0  # seconds a connection may sit silent before we hang up
JOIN_TIMEOUT = 5.0  # upper bound for stop() to wait for all threads
RECV_SIZE = 65536
TERMINATOR = b".\r\n"
CRLF_TERMINATOR = b"\r\n.\r\n"


@dataclass
class Transaction:
    """One MAIL transaction that got a 2xx reply to MAIL."""

    mail_from: str
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""
    completed: bool = False
    reply: str = ""  # what was sent after the terminator ("" if nothing)


@dataclass
class RecordedSession:
    """Everything one client connection sent, for assertions."""

    raw: bytearray = field(default_factory=bytearray)
    commands: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    tls: bool = False
    closed: bool = False
    peer: tuple[str, int] | None = None


class _Hangup(Exception):
    """Raised inside a handler to end the connection (drop_at, QUIT, EOF)."""


class _Reader:
    """Buffered reading from a socket that records every received byte.

    Own buffering (instead of `makefile`) so that pipelined input is handled
    and so that plaintext read ahead of STARTTLS can be thrown away.
    """

    def __init__(self, sock: socket.socket, record: Callable[[bytes], None]) -> None:
        self.sock = sock
        self._record = record
        self._buf = bytearray()

    def _fill(self) -> bool:
        """Read one chunk; False on EOF.

        A reset or timeout counts as EOF so that partial message data read
        so far is still recorded by `read_data`.
        """
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except OSError:
            return False
        if not chunk:
            return False
        self._record(chunk)
        self._buf += chunk
        return True

    def discard(self) -> None:
        """Drop buffered input (bytes pipelined after STARTTLS must be ignored)."""
        self._buf.clear()

    def readline(self) -> bytes | None:
        """One line including its LF, or None on EOF."""
        start = 0
        while True:
            idx = self._buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self._buf[: idx + 1])
                del self._buf[: idx + 1]
                return line
            start = len(self._buf)
            if not self._fill():
                return None

    def read_data(self) -> tuple[bytes, bool]:
        """Message bytes up to CRLF "." CRLF, verbatim; (partial, False) on EOF."""
        while len(self._buf) < len(TERMINATOR) and TERMINATOR.startswith(self._buf):
            if not self._fill():
                return self._take(len(self._buf), 0), False
        if self._buf.startswith(TERMINATOR):
            return self._take(0, len(TERMINATOR)), True
        start = 0
        while True:
            idx = self._buf.find(CRLF_TERMINATOR, start)
            if idx >= 0:
                # Keep the CRLF that ends the last line; drop only ".\r\n".
                return self._take(idx + 2, len(TERMINATOR)), True
            start = max(0, len(self._buf) - len(CRLF_TERMINATOR) + 1)
            if not self._fill():
                return self._take(len(self._buf), 0), False

    def _take(self, n: int, skip: int) -> bytes:
        """Remove and return the first n bytes, then drop `skip` more."""
        data = bytes(self._buf[:n])
        del self._buf[: n + skip]
        return data


def _format(text: str) -> bytes:
    """Reply text (lines separated by CRLF or LF) as wire bytes."""
    lines = text.replace("\r\n", "\n").split("\n")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def _is_2xx(text: str) -> bool:
    return text.startswith("2")


def _address(arg: str) -> str:
    """The address inside <...> of a MAIL/RCPT argument, lowercased."""
    start = arg.find("<")
    end = arg.find(">", start + 1)
    if start < 0 or end < 0:
        return arg.split(" ", 1)[0].split(":", 1)[-1].strip().lower()
    return arg[start + 1 : end].lower()


def _size_param(line: str) -> int | None:
    """The SIZE= value of a MAIL command, if any."""
    params = line.split(">", 1)[1] if ">" in line else ""
    for word in params.split():
        if word.upper().startswith("SIZE="):
            try:
                return int(word[5:])
            except ValueError:
                return None
    return None


class FakeUpstream:
    """Fake ESMTP upstream on a loopback port, one thread per connection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        tls_context: ssl.SSLContext | None = None,
        xclient: str | None = None,
        size: int | None = None,
        extensions: tuple[str, ...] = (
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ),
        greeting: str = "220 fake.upstream ESMTP",
        replies: dict[str, str] | None = None,
        rcpt_replies: dict[str, str] | None = None,
        drop_at: str | None = None,
        delays: dict[str, float] | None = None,
        ehlo_supported: bool = True,
    ) -> None:
        self.host = host
        self.port = 0
        self.tls_context = tls_context
        self.xclient = xclient
        self.size = size
        self.extensions = extensions
        self.greeting = greeting
        self.replies = dict(replies or {})
        self.rcpt_replies = {
            k.lower().strip("<>"): v for k, v in (rcpt_replies or {}).items()
        }
        self.drop_at = drop_at
        self.delays = dict(delays or {})
        self.ehlo_supported = ehlo_supported
        self.sessions: list[RecordedSession] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._queue_ids = itertools.count(1)

    # -- lifecycle -----------------------------------------------------

    def start(self) -> Self:
        """Bind to port 0 on `host` and start accepting; returns self."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, 0), family=family, backlog=64)
        # A short timeout lets the accept loop notice stop() without relying
        # on close() waking a blocked accept(), which Linux does not promise.
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fakeupstream-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join all threads."""
        self._stopping.set()
        if self._listener is not None:
            _shutdown(self._listener)  # wakes accept() at once on Linux
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        deadline = time.monotonic() + JOIN_TIMEOUT
        threads = [self._accept_thread] if self._accept_thread else []
        with self._lock:
            threads += self._threads
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` until it is true or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    @property
    def all_transactions(self) -> list[Transaction]:
        """Every transaction of every session, in session order."""
        with self._lock:
            return [t for s in self.sessions for t in s.transactions]

    @property
    def completed_transactions(self) -> list[Transaction]:
        """Transactions whose terminating ".\\r\\n" arrived."""
        return [t for t in self.all_transactions if t.completed]

    # -- server --------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            conn.settimeout(IDLE_TIMEOUT)
            session = RecordedSession(peer=(peer[0], peer[1]))
            thread = threading.Thread(
                target=self._handle, args=(conn, session), daemon=True
            )
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self.sessions.append(session)
                self._conns.add(conn)
                self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket, session: RecordedSession) -> None:
        """Serve one connection; any socket error just ends it."""
        conv = _Conversation(self, conn, session)
        try:
            conv.run()
        except (_Hangup, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conv.sock)
                self._conns.discard(conn)
                session.closed = True
            _shutdown(conv.sock)
            conv.sock.close()

    def _replace_conn(self, old: socket.socket, new: socket.socket) -> None:
        with self._lock:
            self._conns.discard(old)
            self._conns.add(new)

    def _next_queue_id(self) -> str:
        with self._lock:
            return f"FAKE{next(self._queue_ids)}"


def _shutdown(sock: socket.socket) -> None:
    """Shut the fd down so a thread blocked in recv() wakes up.

    Calls the plain socket method even for SSLSocket, whose own shutdown()
    would tear down TLS state under the feet of the reading thread.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Conversation:
    """The SMTP state machine for one connection."""

    def __init__(
        self, server: FakeUpstream, sock: socket.socket, session: RecordedSession
    ) -> None:
        self.server = server
        self.sock = sock
        self.session = session
        self.reader = _Reader(sock, self._record)
        self.greeted = False
        self.txn: Transaction | None = None

    def _record(self, chunk: bytes) -> None:
        with self.server._lock:
            self.session.raw += chunk

    def _step(self, step: str, default: str) -> None:
        """Apply delay/drop for `step`, then send its (maybe scripted) reply."""
        self._reply(step, self.server.replies.get(step, default))

    def _reply(self, step: str, text: str) -> None:
        delay = self.server.delays.get(step)
        if delay:
            self.server._stopping.wait(delay)
        if self.server.drop_at == step or self.server._stopping.is_set():
            raise _Hangup
        self.sock.sendall(_format(text))

    def _reply_for(self, step: str, default: str) -> str:
        return self.server.replies.get(step, default)

    def run(self) -> None:
        self._step("greeting", self.server.greeting)
        while True:
            line = self.reader.readline()
            if line is None:
                raise _Hangup
            text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            with self.server._lock:
                self.session.commands.append(text)
            verb, _, arg = text.partition(" ")
            step = verb.lower()
            handler = getattr(self, f"_cmd_{step}", None) if step.isalpha() else None
            if handler is None:
                if not text:
                    self._reply("", "500 5.5.2 Error: bad syntax")
                else:
                    self._step(step, "502 5.5.2 Error: command not recognized")
                continue
            handler(text, arg.strip())

    def _reset(self) -> None:
        self.txn = None

    # -- commands ------------------------------------------------------

    def _cmd_ehlo(self, line: str, arg: str) -> None:
        if not self.server.ehlo_supported:
            self._step("ehlo", "502 5.5.2 Error: command not recognized")
            return
        if not arg:
            self._step("ehlo", "501 5.5.4 Syntax: EHLO hostname")
            return
        lines = [SERVER_NAME]
        if self.server.size is not None:
            lines.append(f"SIZE {self.server.size}")
        if self.server.tls_context is not None and not self.session.tls:
            lines.append("STARTTLS")
        if self.server.xclient is not None:
            lines.append(f"XCLIENT {self.server.xclient}".rstrip())
        lines.extend(self.server.extensions)
        default = "\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{item}"
            for i, item in enumerate(lines)
        )
        text = self._reply_for("ehlo", default)
        if _is_2xx(text):
            self.greeted = True
            self._reset()
        self._reply("ehlo", text)

    def _cmd_helo(self, line: str, arg: str) -> None:
        if not arg:
            self._step("helo", "501 5.5.4 Syntax: HELO hostname")
            return
        text = self._reply_for("helo", f"250 {SERVER_NAME}")
        if _is_2xx(text):
            self.greeted = True
            self._reset()
        self._reply("helo", text)

    def _cmd_starttls(self, line: str, arg: str) -> None:
        ctx = self.server.tls_context
        if ctx is None or self.session.tls:
            self._step("starttls", "502 5.5.1 Error: command not implemented")
            return
        if self.txn is not None:
            self._step("starttls", "503 5.5.1 Error: MAIL transaction in progress")
            return
        text = self._reply_for("starttls", "220 2.0.0 Ready to start TLS")
        self._reply("starttls", text)
        if not text.startswith("220"):
            return
        self.reader.discard()
        old = self.sock
        # Register the TLS socket before the handshake so stop() can
        # interrupt a client that never completes it.
        tls_sock = ctx.wrap_socket(
            old, server_side=True, do_handshake_on_connect=False
        )
        self.sock = tls_sock
        self.reader.sock = tls_sock
        self.server._replace_conn(old, tls_sock)
        tls_sock.do_handshake()
        with self.server._lock:
            self.session.tls = True
        self.greeted = False
        self._reset()

    def _cmd_xclient(self, line: str, arg: str) -> None:
        if self.server.xclient is None:
            self._step("xclient", "502 5.5.2 Error: command not recognized")
            return
        if self.txn is not None:
            self._step("xclient", "503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            self._step("xclient", "501 5.5.4 Syntax: XCLIENT attribute=value...")
            return
        text = self._reply_for("xclient", XCLIENT_REPLY)
        if text.startswith("220"):
            self.greeted = False
            self._reset()
        self._reply("xclient", text)

    def _cmd_mail(self, line: str, arg: str) -> None:
        if not self.greeted:
            self._step("mail", "503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.txn is not None:
            self._step("mail", "503 5.5.1 Error: nested MAIL command")
            return
        if not arg.upper().startswith("FROM:"):
            self._step("mail", "501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        declared = _size_param(line)
        limit = self.server.size
        if limit and declared is not None and declared > limit:
            self._step("mail", "552 5.3.4 Message size exceeds fixed limit")
            return
        text = self._reply_for("mail", "250 2.1.0 Ok")
        if _is_2xx(text):
            txn = Transaction(mail_from=line)
            with self.server._lock:
                self.session.transactions.append(txn)
            self.txn = txn
        self._reply("mail", text)

    def _cmd_rcpt(self, line: str, arg: str) -> None:
        if self.txn is None:
            self._step("rcpt", "503 5.5.1 Error: need MAIL command")
            return
        if not arg.upper().startswith("TO:"):
            self._step("rcpt", "501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address = _address(arg[3:])
        text = self.server.rcpt_replies.get(address)
        if text is None:
            text = self._reply_for("rcpt", "250 2.1.5 Ok")
        if _is_2xx(text):
            with self.server._lock:
                self.txn.rcpts.append(line)
        self._reply("rcpt", text)

    def _cmd_data(self, line: str, arg: str) -> None:
        txn = self.txn
        if txn is None:
            self._step("data", "503 5.5.1 Error: need MAIL command")
            return
        if not txn.rcpts:
            self._step("data", "554 5.5.1 Error: no valid recipients")
            return
        text = self._reply_for("data", "354 End data with <CR><LF>.<CR><LF>")
        self._reply("data", text)
        if not text.startswith("3"):
            return
        data, completed = self.reader.read_data()
        with self.server._lock:
            txn.data = data
            txn.completed = completed
        self.txn = None
        if not completed:
            raise _Hangup
        limit = self.server.size
        if limit and len(data) > limit:
            default = "552 5.3.4 Message size exceeds fixed limit"
        else:
            default = f"250 2.0.0 Ok: queued as {self.server._next_queue_id()}"
        text = self._reply_for("dot", default)
        self._reply("dot", text)
        with self.server._lock:
            txn.reply = text

    def _cmd_rset(self, line: str, arg: str) -> None:
        self._reset()
        self._step("rset", "250 2.0.0 Ok")

    def _cmd_noop(self, line: str, arg: str) -> None:
        self._step("noop", "250 2.0.0 Ok")

    def _cmd_quit(self, line: str, arg: str) -> None:
        self._step("quit", "221 2.0.0 Bye")
        raise _Hangup

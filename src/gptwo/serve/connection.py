"""The server's HTTP/1.1 connections: uvicorn's h11 protocol with a header timeout, a header size limit,
a cap on open connections and a lingering close; and the server that drains on SIGTERM.

- A connection must send a whole request head (request line and headers) within `header_timeout`
  seconds of opening or of its first byte after the previous request, else it gets 408 (or, if it
  sent nothing, is closed); this keeps slow clients from holding connections open forever.
- A head larger than `max_header_bytes` gets 431, however it arrives (in one packet or many).
- A refused request (413, 408, 431, a malformed one) is answered, then the connection stops
  sending and reads and drops what the client still sends for up to `linger` seconds before it
  closes. Closing at once, with the client's unread bytes in the socket, would reset the
  connection, and most clients would report the reset instead of the answer.
- At most `max_connections` connections are open (by default half the process's file limit, so
  accepting never fails for want of a file descriptor). A connection beyond it first closes the
  longest-idle connection that is between requests (a client reopens such a keep-alive connection
  as a matter of course); when every connection is in a request, the new one gets 503 with
  Retry-After. Keep-alive connections idle for `timeout_keep_alive` seconds close (uvicorn's option).
- GracefulServer: on SIGTERM (or a first Ctrl+C) the server stops admitting requests (they get 503
  with Retry-After, /health says "draining"), lets the running ones finish for up to
  `shutdown_timeout` seconds, then ends the rest (a stream gets an error event and [DONE], a waiting
  request a JSON 503) and exits with status 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptwo.errors import GptwoError
from gptwo.serve.limits import HEADER_TIMEOUT_S, LINGER_S, MAX_HEADER_BYTES

log = logging.getLogger("uvicorn.error")
# file descriptors kept free of connections when --max-connections is set by hand: the model's files,
# the engine's, logging's, and a refused connection's while it lingers
RESERVED_FDS = 32


def refusal(status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response in OpenAI's error shape that closes the connection."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{retry}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def file_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections() -> int:
    """Half the file limit, at most 4,096: accept() never fails for want of a file descriptor."""
    return max(8, min(4096, file_limit() // 2))


def check_max_connections(value: int) -> int:
    """`value` if the process can hold that many connections, else a GptwoError naming the fix."""
    limit = file_limit()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GptwoError(f"max_connections={value!r} is not an integer of at least 1", "pass --max-connections >= 1")
    if value > limit - RESERVED_FDS:
        raise GptwoError(
            f"--max-connections {value} leaves too few of this process's {limit} file descriptors (ulimit -n)",
            f"pass --max-connections <= {limit - RESERVED_FDS}, or raise it: ulimit -n {value + 2 * RESERVED_FDS}",
        )
    return value


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: closing it closes lingeringly (see GuardedH11Protocol)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_lingering()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a header size limit and a lingering close (module doc)."""

    header_timeout = HEADER_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES
    linger = LINGER_S
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingering = self._lost = self._refused = False
        self._idle_since = self.loop.time()
        super().connection_made(transport)  # (adds this connection to the server's set)
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        if self.max_connections is not None and len(self.connections) > self.max_connections and not self._evict():
            self.refuse(
                503,
                "Service Unavailable",
                f"the server has {self.max_connections} connections in requests (its --max-connections); retry shortly",
                "too_many_connections",
                retry_after=1,
            )
            return
        self._watch_head()

    def _between_requests(self) -> bool:
        """Open, but neither receiving nor answering a request (a keep-alive or new connection)."""
        conn = self.conn
        return (
            not (self._lost or self._lingering)
            and conn.their_state is h11.IDLE
            and conn.our_state is h11.IDLE
            and not conn.trailing_data[0]
        )

    def _evict(self) -> bool:
        """Close the longest-idle other connection that is between requests; False if there is none."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)]
        idle = [c for c in idle if c._between_requests()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest._lost = True  # no timers or lingering for it now
        oldest._raw.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._lingering:  # the server stops: no more waiting for a refused client
            self._raw.close()
        else:
            super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # what a refused client still sends is read and dropped
            return
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self.refuse(
                431,
                "Request Header Fields Too Large",
                f"the request's headers are larger than {self.max_header_bytes} bytes; send smaller headers",
                "headers_too_large",
            )
            return
        super().data_received(data)
        self._watch_head()
        self._idle_since = self.loop.time()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head that `data` continues is over the limit (complete or not)."""
        pending = self.conn.trailing_data[0]
        if len(pending) + len(data) <= self.max_header_bytes:
            return False
        return (pending + data).find(b"\r\n\r\n", 0, self.max_header_bytes + 4) < 0

    def _watch_head(self) -> None:
        """Time the request head while one is awaited (their side IDLE); stop once it has arrived."""
        awaiting = self.conn.their_state is h11.IDLE and not (self._lingering or self._lost)
        if awaiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif not awaiting and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._lost or self._lingering or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0] and self.conn.our_state is h11.IDLE:  # part of a head came: say why
            self.refuse(
                408,
                "Request Timeout",
                f"the request's headers did not arrive within {self.header_timeout:g} seconds",
                "request_timeout",
            )
        else:  # an idle connection that never sent a request
            self._raw.close()

    def refuse(self, status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> None:
        """Answer with an error before h11 has a request (its head is too large or too slow, or the server has
        too many connections), and close."""
        self._refused = True
        self._raw.write(refusal(status, reason, message, code, retry_after))
        self.close_lingering()

    def close_lingering(self) -> None:
        """Close; if the client may still be sending, first stop writing and drop its bytes for `linger` s."""
        if self._lingering:
            return
        their = self.conn.their_state
        unread = self._refused or their in (h11.SEND_BODY, h11.ERROR) or bool(self.conn.trailing_data[0])
        if self._lost or not unread or self._raw.is_closing():
            self._raw.close()
            return
        self._lingering = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        try:
            self._raw.resume_reading()
            if self._raw.can_write_eof():
                self._raw.write_eof()  # the client sees the whole answer, then the end of the stream
        except (OSError, RuntimeError):
            self._raw.close()
            return
        self._linger_timer = self.loop.call_later(self.linger, self._raw.close)


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
    linger: float = LINGER_S,
    max_connections: int | None = None,
) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with these limits (uvicorn takes a protocol class, not an instance)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "max_header_bytes": max_header_bytes,
            "linger": linger,
            "max_connections": max_connections,
        },
    )


def uvicorn_config(
    app,
    *,
    header_timeout: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
    linger: float = LINGER_S,
    max_connections: int | None = None,
    **kwargs,
) -> uvicorn.Config:
    """uvicorn's config for `app` on the guarded h11 protocol (whatever HTTP parsers are installed)."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(header_timeout, max_header_bytes, linger, max_connections),
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary request
        h11_max_incomplete_event_size=max_header_bytes + 1024,  # a backstop; data_received answers 431 first
        # the per-client limits key on the peer's address: X-Forwarded-For (which uvicorn trusts from
        # 127.0.0.1 by default) would let any local client claim another address
        proxy_headers=kwargs.pop("proxy_headers", False),
        **kwargs,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server, drained on SIGTERM or a first Ctrl+C (module doc); a second signal stops it at once.

    `drain()` makes the app refuse new requests, `idle()` says whether none is left, `abort()` ends those that
    are (the engine's stop); after it uvicorn's own shutdown closes the connections and exits with status 0.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Callable[[], None],
        idle: Callable[[], bool],
        abort: Callable[[], None],
        shutdown_timeout: float,
    ):
        super().__init__(config)
        self._drain, self._idle, self._abort, self.shutdown_timeout = drain, idle, abort, shutdown_timeout
        self._draining = False
        self._tasks: list[asyncio.Task] = []  # the drain (held: the loop keeps only a weak reference to a task)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None or self.should_exit:
            if sig == signal.SIGINT:
                self._captured_signals.append(sig)  # uvicorn re-raises it after shutting down (KeyboardInterrupt)
            self.should_exit = self.force_exit = True  # the second signal: stop now
            return
        # a signal handler runs between two bytecodes of the loop's thread: schedule the drain, don't run it here
        name = signal.Signals(sig).name
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._tasks.append(asyncio.ensure_future(self._drain_then_exit(name))))

    async def _drain_then_exit(self, why: str) -> None:
        self._drain()
        log.info("%s: admitting no more requests; finishing the running ones (up to %g s)", why, self.shutdown_timeout)
        deadline = self._loop.time() + self.shutdown_timeout
        while not self._idle() and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._idle():
            log.warning("ending the requests still running after --shutdown-timeout %g s", self.shutdown_timeout)
        await asyncio.to_thread(self._abort)  # joins the engine's thread: not on the event loop
        self.should_exit = True

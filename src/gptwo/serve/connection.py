"""The server's HTTP/1.1 connections: uvicorn's h11 protocol with a header timeout, a header size limit
and a lingering close.

- A connection must send a whole request head (request line and headers) within `header_timeout`
  seconds of opening or of its first byte after the previous request, else it gets 408 (or, if it
  sent nothing, is closed); this keeps slow clients from holding connections open forever.
- A head larger than `max_header_bytes` gets 431, however it arrives (in one packet or many).
- A refused request (413, 408, 431, a malformed one) is answered, then the connection stops
  sending and reads and drops what the client still sends for up to `linger` seconds before it
  closes. Closing at once, with the client's unread bytes in the socket, would reset the
  connection, and most clients would report the reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptwo.serve.limits import HEADER_TIMEOUT_S, LINGER_S, MAX_HEADER_BYTES


def refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response in OpenAI's error shape that closes the connection."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingering = self._lost = self._refused = False
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._watch_head()

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

    def refuse(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer with an error before h11 has a request (its head is too large or too slow), and close."""
        self._refused = True
        self._raw.write(refusal(status, reason, message, code))
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
    header_timeout: float = HEADER_TIMEOUT_S, max_header_bytes: int = MAX_HEADER_BYTES, linger: float = LINGER_S
) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with these limits (uvicorn takes a protocol class, not an instance)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes, "linger": linger},
    )


def uvicorn_config(
    app,
    *,
    header_timeout: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
    linger: float = LINGER_S,
    **kwargs,
) -> uvicorn.Config:
    """uvicorn's config for `app` on the guarded h11 protocol (whatever HTTP parsers are installed)."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(header_timeout, max_header_bytes, linger),
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary request
        h11_max_incomplete_event_size=max_header_bytes + 1024,  # a backstop; data_received answers 431 first
        # the per-client limits key on the peer's address: X-Forwarded-For (which uvicorn trusts from
        # 127.0.0.1 by default) would let any local client claim another address
        proxy_headers=kwargs.pop("proxy_headers", False),
        **kwargs,
    )

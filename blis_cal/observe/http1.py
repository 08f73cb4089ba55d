"""A lean HTTP/1.1 client for the workload's streamed requests: plain-HTTP sockets parsed with httptools.

Each connection's socket is read by an event-loop reader callback with `recvmsg`, which also returns the
kernel's receive time of the data (SO_TIMESTAMPNS on Linux: that of the last packet the read touched). Reads are
small (about two streamed events), so a backlog that built up while the loop was held up is drained in slices
that keep their own packets' times instead of all taking the backlog's last. The read is parsed there (httptools
is llhttp, Node.js's parser) and its body bytes go straight to the reader's OnRead with that arrival time:
no transport layers, no stream buffer, no task wake-up per event. Per streamed event that is a fraction of
aiohttp's CPU (benchmarks/observer_overhead.py), and CPU per event is what keeps a busy observer reading
every socket before its next event lands. Connections are kept alive and reused; the dispatcher bounds how
many are in flight. https endpoints go through aiohttp instead.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

from blis_cal import __version__
from blis_cal.observe.clock import Clock, recv_stamped, rx_stamped_socket

OnRead = Callable[[int, bytes], bool]  # (arrival µs, body bytes) of one network read -> stop reading?
EachRead = Callable[[OnRead], Awaitable[None]]  # hands every read of a body to an OnRead, until it stops

_USER_AGENT = f"blis-cal/{__version__}"
# About two of vLLM's streamed events: a held-up client's backlog keeps its packets' times (the kernel's receive
# queue merges a waiting socket's small packets too, ~17 to a buffer, which bounds what any read can recover).
_READ_SIZE = 512


class HTTPStreamError(Exception):
    """The connection or the server's HTTP failed (refused, reset, closed early, malformed response)."""


class _Readers:
    """Calls a socket's reader when it has data. On Linux one epoll set holds every connection and the event
    loop watches only that set: a batch of ready sockets costs one loop callback, not one each (less CPU per
    read than asyncio's per-socket dispatch, benchmarks/observer_overhead.py). Elsewhere each socket is the
    loop's reader."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._readers: dict[int, Callable[[], None]] = {}
        if self._epoll is not None:
            self._loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, fd: int, reader: Callable[[], None]) -> None:
        self._readers[fd] = reader
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self._loop.add_reader(fd, reader)

    def remove(self, fd: int) -> None:
        if self._readers.pop(fd, None) is None:
            return
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            self._loop.remove_reader(fd)

    def _ready(self) -> None:
        readers = self._readers
        for fd, _ in self._epoll.poll(0):  # type: ignore[union-attr]
            reader = readers.get(fd)
            if reader is not None:  # not removed by an earlier reader of this batch
                reader()

    def close(self) -> None:
        for fd in list(self._readers):
            self.remove(fd)
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()


class _Connection:
    """One keep-alive connection, read for its whole life; one response at a time."""

    def __init__(self, sock: socket.socket, clock: Clock, readers: _Readers) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._clock = clock
        self._readers = readers
        self.lost = False
        self._in_flight = False
        self._reset()
        readers.add(self._fd, self._readable)  # also notices a server closing it while idle

    def _reset(self) -> None:
        loop = self._loop
        self._parser = httptools.HttpResponseParser(self)
        self.headers: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()  # body ended, OnRead stopped, or failed
        self.complete = False  # the whole response was parsed
        self._keep_alive = False  # the server keeps the connection open after it
        self.received = False  # any byte of this response arrived
        self._framed = False  # Content-Length or Transfer-Encoding: else the body ends with the connection
        self._body: list[bytes] = []
        self._early: list[tuple[int, bytes]] = []  # reads before the reader attached
        self._on_read: OnRead | None = None
        self.after_complete: Callable[[], None] | None = None  # a reader stopped early: release at the end

    async def request(self, data: bytes) -> int:
        """Send a request; the response's HTTP status once its headers arrived."""
        self._reset()
        self._in_flight = True
        try:
            await self._loop.sock_sendall(self._sock, data)
        except OSError as exc:
            self._fail(HTTPStreamError(f"sending the request failed: {exc}"))
        return await self.headers

    # httptools callbacks (inside feed_data)
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        _settle(self.headers, self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is done
        self.complete = True
        self._in_flight = False

    # the loop's reader: slice by slice until the socket is drained (a slice shorter than asked) or done
    def _readable(self) -> None:
        while self._read_slice():
            pass

    def _read_slice(self) -> bool:
        """One read; True if the socket may hold more of this response."""
        try:
            data, rx_ns = recv_stamped(self._sock, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._closed(exc)
            return False
        if not data:
            self._closed(None)
            return False
        if not self._in_flight:
            self._fail(HTTPStreamError("the server sent bytes outside a response"))
            return False
        arrival_us = self._clock.arrival_us(rx_ns)
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPStreamError(f"malformed HTTP response: {exc}"))
            return False
        if self._body:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body.clear()
            self._deliver(arrival_us, body)
        if self.complete:
            _settle(self.finished, None)
            if self.after_complete is not None:
                self.after_complete()
            return False
        return len(data) == _READ_SIZE and not self.lost

    def _deliver(self, arrival_us: int, body: bytes) -> None:
        if self._on_read is None:
            self._early.append((arrival_us, body))
            return
        if self.finished.done():
            return
        try:
            if self._on_read(arrival_us, body):
                self.finished.set_result(None)
        except Exception as exc:  # the reader's error: raised in its task, not in the event loop
            self.finished.set_exception(exc)

    def _closed(self, exc: Exception | None) -> None:
        if self._in_flight and self.headers.done() and not self._framed and exc is None:
            self.complete = True  # a body delimited by the connection's end
            _settle(self.finished, None)
            self.close()
            return
        why = f": {exc}" if exc else ""
        self._fail(HTTPStreamError(f"connection closed by the server before the response ended{why}"))

    def _fail(self, exc: Exception) -> None:
        for fut in (self.headers, self.finished):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here; the request's task raises it if it awaits the future
        self.close()

    def close(self) -> None:
        if not self.lost:
            self.lost = True
            self._in_flight = False
            self._readers.remove(self._fd)
            self._sock.close()

    async def each_read(self, on_read: OnRead) -> None:
        early, self._early = self._early, []
        for arrival_us, body in early:  # what came with the headers
            if on_read(arrival_us, body):
                return
        if self.finished.done():
            self.finished.result()
            return
        self._on_read = on_read
        await self.finished

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.lost


def _settle(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


class Http1Session:
    """Keep-alive plain-HTTP/1.1 connections to one server, each socket stamped with its reads' kernel
    receive times."""

    def __init__(self, endpoint: str) -> None:
        url = urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"not a plain http:// URL: {endpoint!r}")
        self._host = url.hostname
        self._port = url.port or 80
        self._netloc = url.netloc.rpartition("@")[2]
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        # Delayed ACKs (Linux TCP_QUICKACK 0, "pingpong" mode): else the kernel ACKs every small event a read
        # drains, half the kernel CPU per event. Only for servers that send with TCP_NODELAY: Nagle's
        # algorithm would hold their next event until the delayed ACK (up to 40 ms).
        self.lazy_acks = False
        self._readers: _Readers | None = None
        self._addresses: list[
            tuple[Any, ...]
        ] = []  # resolved once: a lookup per connection costs a thread hop

    async def _connect(self, clock: Clock) -> _Connection:
        loop = asyncio.get_running_loop()
        if not self._addresses:
            try:
                self._addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise HTTPStreamError(f"cannot resolve {self._host}: {exc}") from None
        error: OSError | None = None
        for family, type_, proto, _, addr in self._addresses:
            sock = rx_stamped_socket((family, type_, proto))
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.lazy_acks and hasattr(socket, "TCP_QUICKACK"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            self._readers = self._readers or _Readers()
            conn = _Connection(sock, clock, self._readers)
            self._open.add(conn)
            return conn
        raise HTTPStreamError(f"cannot connect to {self._host}:{self._port}: {error}")

    def _request_bytes(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        for key, value in headers.items():
            if any(c in key + value for c in "\r\n\0"):
                raise ValueError(f"header {key!r}: names and values cannot contain line breaks")
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._netloc}", f"User-Agent: {_USER_AGENT}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost:
                return conn
            self._open.discard(conn)
        return None

    @asynccontextmanager
    async def post(
        self, url: str, json: object, headers: dict[str, str], clock: Clock
    ) -> AsyncIterator[tuple[int, EachRead]]:
        """POST `json` to `url` (this session's server); yields (HTTP status, EachRead over the body), each
        read stamped on `clock`."""
        data = self._request_bytes(urlsplit(url).path or "/", orjson.dumps(json), headers)
        conn = None
        try:
            while True:
                conn = self._take_idle()
                reused = conn is not None
                conn = conn or await self._connect(clock)
                try:
                    status = await conn.request(data)
                except HTTPStreamError:
                    if reused and not conn.received:  # a kept-alive connection the server had closed: retry
                        self._discard(conn)
                        continue
                    raise
                break
            yield status, conn.each_read
        except BaseException:
            if conn is not None:
                self._discard(conn)  # in an unknown state (timeout, cancellation, error)
            raise
        self._release(conn)

    def _release(self, conn: _Connection) -> None:
        if conn.reusable:
            self._idle.append(conn)
        elif conn.complete or conn.lost:
            self._discard(conn)
        else:  # the reader stopped before the body's end ([DONE] before the last chunk): reuse after it

            def after_complete() -> None:
                conn.after_complete = None
                self._release(conn)

            conn.after_complete = after_complete

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()
        if self._readers is not None:
            self._readers.close()
            self._readers = None

    async def __aenter__(self) -> Http1Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

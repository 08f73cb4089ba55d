"""The observer's HTTP/1.1 client (httptools): framing, read-by-read delivery, keep-alive reuse, failures.

A scripted asyncio server answers each request with given byte pieces (each piece one write, with a pause
between), so every case is an exact wire exchange."""

import asyncio
import contextlib
import socket
import sys
import threading
import time

import pytest

from blis_cal.observe.clock import Clock
from blis_cal.observe.http1 import Http1Session, HTTPStreamError

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class ScriptedServer:
    """Answers the n-th request with replies[n] (byte pieces); counts connections and requests."""

    def __init__(self, replies, close_after_each=False):
        self.replies = list(replies)
        self.close_after_each = close_after_each
        self.connections = 0
        self.requests: list[bytes] = []
        self._writers = []

    async def _serve(self, reader, writer):
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.replies[len(self.requests) - 1]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.02)
                if self.close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/completions"
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        for w in self._writers:
            w.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()


async def post_all(session, url, clock, stop_at=None):
    """(status, [(arrival µs, body bytes) per read])"""
    reads = []

    def on_read(t, data):
        reads.append((t, data))
        return stop_at is not None and stop_at in data

    async with session.post(url, {"prompt": [1, 2]}, {"Content-Type": "application/json"}, clock) as (
        status,
        each,
    ):
        await each(on_read)
    return status, reads


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_stream_is_handed_over_read_by_read_in_order_with_rising_arrival_times():
    events = [b'data: {"n":%d}\n\n' % i for i in range(3)]
    reply = [
        SSE_HEAD + chunked(events[0]),
        chunked(events[1]) + chunked(events[2]),
        chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n",
    ]

    async def main():
        async with ScriptedServer([reply]) as server, Http1Session(server.url) as session:
            return await post_all(session, server.url, Clock()), server.requests[0]

    (status, reads), request = run(main())
    assert status == 200
    assert [data for _, data in reads] == [events[0], events[1] + events[2], b"data: [DONE]\n\n"]
    times = [t for t, _ in reads]
    assert times == sorted(times) and times[1] - times[0] >= 15_000  # the server paused 20 ms between writes
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b'{"prompt":[1,2]}' in request
    assert b"Content-Length: 16\r\n" in request and b"User-Agent: blis-cal/" in request


def test_keep_alive_connections_are_reused_even_when_the_reader_stops_at_done():
    reply = [
        SSE_HEAD + chunked(b"data: {}\n\n") + chunked(b"data: [DONE]\n\n"),
        b"0\r\n\r\n",
    ]  # end comes later

    async def main():
        async with ScriptedServer([reply] * 3) as server, Http1Session(server.url) as session:
            for _ in range(3):
                await post_all(session, server.url, Clock(), stop_at=b"[DONE]")
                await asyncio.sleep(0.05)  # the last chunk arrives after the reader stopped
            return server.connections, len(server.requests)

    assert run(main()) == (1, 3)


def test_a_kept_alive_connection_the_server_closed_is_replaced_transparently():
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"]

    async def main():
        async with (
            ScriptedServer([ok, ok], close_after_each=True) as server,
            Http1Session(server.url) as session,
        ):
            first = await post_all(session, server.url, Clock())
            await asyncio.sleep(0.05)  # the server has closed the idle connection
            second = await post_all(session, server.url, Clock())
            return first, second, server.connections

    first, second, connections = run(main())
    assert first[1][0][1] == second[1][0][1] == b"hi" and connections == 2


def test_bodies_framed_by_length_or_by_the_connections_end():
    by_length = [b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n", b"not found"]
    by_close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ", b"part two"]

    async def main():
        async with ScriptedServer([by_length]) as a, Http1Session(a.url) as session:
            one = await post_all(session, a.url, Clock())
        async with ScriptedServer([by_close], close_after_each=True) as b, Http1Session(b.url) as session:
            two = await post_all(session, b.url, Clock())
        return one, two

    (s1, r1), (s2, r2) = run(main())
    assert s1 == 404 and b"".join(d for _, d in r1) == b"not found"
    assert s2 == 200 and b"".join(d for _, d in r2) == b"part one, part two"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], "malformed HTTP response"),
        ([SSE_HEAD + chunked(b"data: {}\n\n")], "closed by the server before the response ended"),
        ([b"garbage\r\n\r\n"], "malformed HTTP response"),
    ],
)
def test_broken_responses_raise_a_clear_error(reply, message):
    async def main():
        async with (
            ScriptedServer([reply], close_after_each=True) as server,
            Http1Session(server.url) as session,
        ):
            await post_all(session, server.url, Clock())

    with pytest.raises(HTTPStreamError, match=message):
        run(main())


def test_refused_connections_and_bad_headers_are_clear_errors():
    async def refused():
        async with Http1Session("http://127.0.0.1:9") as session:
            await post_all(session, "http://127.0.0.1:9/v1/completions", Clock())

    with pytest.raises(HTTPStreamError, match=r"cannot connect to 127\.0\.0\.1:9"):
        run(refused())

    async def injected():
        session = Http1Session("http://127.0.0.1:9")
        async with session.post("http://127.0.0.1:9/", {}, {"X-A": "b\r\nX-Evil: 1"}, Clock()):
            pass

    with pytest.raises(ValueError, match="line breaks"):
        run(injected())
    with pytest.raises(ValueError, match="plain http"):
        Http1Session("https://example.com")


class ThreadedStreamer:
    """Answers each request on its own thread (so a blocked client loop does not stop it): the SSE head, then
    `events` events `gap_s` apart, then [DONE]; records when it wrote each event (wall clock)."""

    def __init__(self, events: int, gap_s: float):
        self.events, self.gap_s = events, gap_s
        self.sent_s: list[float] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1/completions"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        conn, _ = self._sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as vLLM's API server sends
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    more = conn.recv(65536)
                    if not more:
                        return
                    head += more
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(SSE_HEAD)
                for i in range(self.events):
                    self.sent_s.append(time.time())
                    conn.sendall(chunked(b'data: {"n": %d, "pad": "%s"}\n\n' % (i, b"x" * 200)))
                    time.sleep(self.gap_s)
                conn.sendall(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def close(self):
        self._sock.close()


@pytest.mark.skipif(sys.platform != "linux", reason="kernel receive timestamps (SO_TIMESTAMPNS) are Linux's")
def test_a_backlog_read_after_the_loop_was_held_up_keeps_its_packets_times():
    """The client's loop blocks for 0.6 s after the first event while the server streams 40 events 15 ms apart.
    The backlog is read in slices stamped with their own packets' arrival, not all with the last one's; the
    kernel merges a waiting socket's small packets (about 17 to a buffer), so times are recovered per merge."""
    clock = Clock()
    warm = ThreadedStreamer(1, 0.0)  # the first stamped socket switches Linux's receive stamping on, lazily
    streamer = ThreadedStreamer(40, 0.015)

    async def main():
        async with Http1Session(warm.url) as session:
            await post_all(session, warm.url, clock)
        reads = []

        def on_read(t, data):
            if not reads:
                time.sleep(0.6)  # the loop is held up (another process took the CPU)
            reads.append((t, data))
            return b"[DONE]" in data

        async with (
            Http1Session(streamer.url) as session,
            session.post(streamer.url, {"prompt": [1]}, {}, clock) as (status, each),
        ):
            await each(on_read)
        return status, reads

    try:
        status, reads = run(main())
    finally:
        warm.close()
        streamer.close()
    stamps = []  # one arrival time per event, as the SSE decoder assigns them (the read that completed it)
    for t, data in reads:
        stamps += [t] * data.count(b"\n\n")
    sent_us = [clock.from_realtime_ns(int(s * 1e9)) for s in streamer.sent_s]
    late_ms = [(t - s) / 1000 for t, s in zip(stamps, sent_us, strict=False)]
    held = late_ms[1:30]  # sent while the loop was blocked
    assert status == 200 and len(stamps) == 41 and len(set(stamps[1:30])) >= 2
    assert max(held) < 330  # one merge: ~17 events 15 ms apart (read at once, the first would be ~590 ms)

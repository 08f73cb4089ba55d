"""When bytes arrived: the observer's monotonic clock and the arrival stamps of network reads.

A read's arrival is the kernel's receive time of its data (SO_TIMESTAMPNS on Linux, `rx_stamped_socket`),
else the moment the event loop found the socket readable (`new_event_loop`): a busy event loop delays the
parsing of an event, never its timestamp.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import socket
import struct
import sys
import time
import weakref
from typing import Any


class _WakeStampingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The event loop's selector, noting when each select() returned: the moment the loop learnt which
    sockets had data. Every read callback of that loop iteration runs later, after the task steps queued
    before it (asyncio runs ready callbacks in order), so this is the honest arrival time of their bytes."""

    woke_ns = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self.woke_ns = time.perf_counter_ns()
        return ready


_WAKE_SELECTORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WakeStampingSelector] = (
    weakref.WeakKeyDictionary()
)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose socket wake-ups a Clock created in it can read (`Clock.woke_us`)."""
    selector = _WakeStampingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    _WAKE_SELECTORS[loop] = selector
    return loop


def _realtime_offset_ns() -> int:
    """CLOCK_REALTIME − perf_counter, from the tightest of a few paired readings."""
    best = (math.inf, 0)
    for _ in range(5):
        before = time.perf_counter_ns()
        realtime = time.time_ns()
        after = time.perf_counter_ns()
        best = min(best, (after - before, realtime - (before + after) // 2))
    return int(best[1])


# Linux's SO_TIMESTAMPNS (asm-generic and x86 value): every read carries the kernel's receive time of its data
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
_ANCDATA_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_RX_SOCKETS: weakref.WeakValueDictionary[int, _RxStampedSocket] = weakref.WeakValueDictionary()


def recv_stamped(sock: socket.socket, bufsize: int, flags: int = 0) -> tuple[bytes, int]:
    """One read of a socket and the kernel's receive time of its last packet (CLOCK_REALTIME ns; 0 = none,
    e.g. a socket without SO_TIMESTAMPNS)."""
    data, ancdata, _, _ = sock.recvmsg(bufsize, _ANCDATA_SIZE, flags)
    if ancdata:  # the only control message asked for
        level, kind, payload = ancdata[0]
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(payload)
            return data, sec * 1_000_000_000 + nsec
    return data, 0


class _RxStampedSocket(socket.socket):
    """A TCP socket whose reads note when the kernel received their data: the bytes' arrival on this machine,
    however busy the event loop that reads them (asyncio's transport reads with `recv`)."""

    rx_realtime_ns = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, self.rx_realtime_ns = recv_stamped(
            self, bufsize, flags
        )  # 0 (unstamped): the loop's wake instead
        return data


def rx_stamped_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's socket factory: a socket with kernel receive timestamps (plain sockets off Linux)."""
    family, type_, proto = addr_info[:3]
    if sys.platform != "linux":
        return socket.socket(family, type_, proto)
    sock = _RxStampedSocket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:  # a kernel without it: reads stay unstamped and arrivals come from the event loop
        return sock
    _RX_SOCKETS[sock.fileno()] = sock
    return sock


def stamped_socket(raw: Any) -> socket.socket | None:
    """The `rx_stamped_socket` behind a transport's socket (`get_extra_info("socket")`), if it is one."""
    sock = _RX_SOCKETS.get(raw.fileno()) if raw is not None else None
    return sock if sock is not None and sock.fileno() == raw.fileno() else None  # not a reused number


class Clock:
    """Monotonic microseconds since the run started (perf_counter: CLOCK_MONOTONIC on Linux)."""

    def __init__(self) -> None:
        self._t0_ns = time.perf_counter_ns()
        self._realtime_offset_ns = _realtime_offset_ns()
        try:
            self._selector = _WAKE_SELECTORS.get(asyncio.get_running_loop())
        except RuntimeError:  # no running loop
            self._selector = None

    @property
    def t0_ns(self) -> int:
        """The run's start on the perf_counter clock (to join with other processes' CLOCK_MONOTONIC)."""
        return self._t0_ns

    def now_us(self) -> int:
        return (time.perf_counter_ns() - self._t0_ns) // 1000

    def from_realtime_ns(self, realtime_ns: int) -> int:
        """A CLOCK_REALTIME time (the kernel's receive timestamps) on this clock."""
        return (realtime_ns - self._realtime_offset_ns - self._t0_ns) // 1000

    def woke_us(self) -> int:
        """When the running loop last found sockets readable (a loop from `new_event_loop`), else now."""
        if self._selector is None or self._selector.woke_ns < self._t0_ns:
            return self.now_us()
        return (self._selector.woke_ns - self._t0_ns) // 1000

    def arrival_us(self, rx_realtime_ns: int) -> int:
        """When a read's data arrived: the kernel's receive time of it (`recv_stamped`; never after the loop
        learnt of it), else (0) when the loop found sockets readable."""
        woke = self.woke_us()
        return min(self.from_realtime_ns(rx_realtime_ns), woke) if rx_realtime_ns else woke

    def read_arrival_us(self, sock: socket.socket | None) -> int:
        """`arrival_us` of the last read of a socket from `rx_stamped_socket` (any other: the loop's wake)."""
        return self.arrival_us(getattr(sock, "rx_realtime_ns", 0))

"""Port-I/O dispatch from vCPU threads to the legacy devices.

Linux probes many ports that a microVM has nothing behind; those read as all ones
(what an empty ISA bus returns) and writes to them are dropped, with a rate-limited
debug log so a guest cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)


class PortDevice(Protocol):
    def read(self, offset: int) -> int: ...

    def write(self, offset: int, value: int) -> None: ...


class RateLimitedLog:
    """Logs at most `burst` messages per `period` seconds; counts the rest."""

    def __init__(self, burst: int = 10, period: float = 5.0) -> None:
        self.burst = burst
        self.period = period
        self._window_start = 0.0
        self._in_window = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start > self.period:
            self._window_start = now
            self._in_window = 0
        self._in_window += 1
        if self._in_window > self.burst:
            self.suppressed += 1
            return False
        return True


class PortBus:
    """Maps port ranges to byte-wide devices."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, PortDevice]] = []
        self._unhandled_log = RateLimitedLog()
        self.unhandled_accesses = 0

    def register(self, base: int, length: int, device: PortDevice) -> None:
        for start, end, _ in self._ranges:
            if base < end and start < base + length:
                raise ValueError(f"ports {base:#x}+{length} overlap {start:#x}")
        self._ranges.append((base, base + length, device))

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        for start, end, device in self._ranges:
            if start <= port < end:
                return port - start, device
        return None

    def read(self, port: int, size: int) -> bytes:
        found = self._find(port)
        if found is None:
            self._note_unhandled("read", port)
            return b"\xff" * size
        offset, device = found
        # Byte-wide devices: a wider access reads consecutive registers.
        return bytes(device.read(offset + i) & 0xFF for i in range(size))

    def write(self, port: int, data: bytes) -> None:
        found = self._find(port)
        if found is None:
            self._note_unhandled("write", port)
            return
        offset, device = found
        for i, value in enumerate(data):
            device.write(offset + i, value)

    def _note_unhandled(self, kind: str, port: int) -> None:
        self.unhandled_accesses += 1
        if self._unhandled_log.allow():
            log.debug("unhandled port %s at %#x", kind, port)

"""MMIO dispatch from vCPU threads to the devices mapped in the 32-bit gap.

A guest access to an address no KVM memory slot holds comes back to the monitor
as an MMIO exit; the bus finds the device whose window contains it and hands it
the offset inside that window. Addresses with nothing behind them read as all
ones and drop writes, with a rate-limited debug log and a counter, so a probing
guest cannot flood the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Protocol

from ember.devices.bus import RateLimitedLog

log = logging.getLogger(__name__)


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class MmioOverlapError(ValueError):
    """A device window would overlap one already registered."""


class MmioBus:
    """Non-overlapping windows `[base, base + length)`, each owned by one device."""

    def __init__(self) -> None:
        # Replaced whole under the lock, never changed in place, so vCPU threads
        # can look up without taking it.
        self._map: tuple[list[int], list[tuple[int, int, MmioDevice]]] = ([], [])
        self._lock = threading.Lock()
        self._unhandled_log = RateLimitedLog()
        self.unhandled_accesses = 0

    def register(self, base: int, length: int, device: MmioDevice) -> None:
        if length <= 0:
            raise ValueError(f"MMIO window at {base:#x} has length {length}")
        with self._lock:
            bases, windows = self._map
            for start, end, _ in windows:
                if base < end and start < base + length:
                    raise MmioOverlapError(
                        f"MMIO window {base:#x}+{length:#x} overlaps {start:#x}"
                    )
            index = bisect.bisect(bases, base)
            self._map = (
                [*bases[:index], base, *bases[index:]],
                [*windows[:index], (base, base + length, device), *windows[index:]],
            )

    def unregister(self, base: int) -> None:
        with self._lock:
            bases, windows = self._map
            index = bisect.bisect_left(bases, base)
            if index < len(bases) and bases[index] == base:
                self._map = (
                    bases[:index] + bases[index + 1 :],
                    windows[:index] + windows[index + 1 :],
                )

    def find(self, address: int, size: int = 1) -> tuple[int, MmioDevice] | None:
        """The device and offset for an access, or None if no single window
        holds all of `[address, address + size)`."""
        bases, windows = self._map
        index = bisect.bisect(bases, address) - 1
        if index < 0:
            return None
        start, end, device = windows[index]
        if address + size > end:
            return None
        return address - start, device

    def read(self, address: int, size: int) -> bytes:
        found = self.find(address, size)
        if found is None:
            self._note_unhandled("read", address)
            return b"\xff" * size
        offset, device = found
        return device.read(offset, size)

    def write(self, address: int, data: bytes) -> None:
        found = self.find(address, len(data))
        if found is None:
            self._note_unhandled("write", address)
            return
        offset, device = found
        device.write(offset, data)

    def _note_unhandled(self, kind: str, address: int) -> None:
        self.unhandled_accesses += 1
        if self._unhandled_log.allow():
            log.debug("unhandled MMIO %s at %#x", kind, address)

"""Guest resources handed to devices: MMIO windows and interrupt lines.

One allocator per microVM, used while it is built, so that every device's
window and GSI, the DSDT that describes them and the `virtio_mmio.device=`
command-line entries all come from one place and cannot disagree.

- MMIO windows come from the bottom of the 32-bit gap (`MMIO32_START`, 3 GiB)
  upwards, each aligned to its own size rounded to 4 KiB, and must end below
  the IOAPIC (`MMIO32_DEVICES_END`).
- GSIs come from 5 upwards to 23 (the in-kernel IOAPIC's last pin). 0-4 are
  the legacy lines Ember wires itself (PIT, i8042, serial); the ones in
  between stay free like on a PC.

Devices restored from a snapshot keep the window and GSI they were saved with;
`reserve_*` marks those taken so a later allocation does not reuse them.
"""

from __future__ import annotations

from ember.arch.x86_64 import layout

PAGE = 4096


class ResourceError(Exception):
    """No window or interrupt line is left, or a reservation collides."""


class ResourceAllocator:
    def __init__(
        self,
        mmio_start: int = layout.MMIO32_START,
        mmio_end: int = layout.MMIO32_DEVICES_END,
        first_gsi: int = layout.FIRST_DEVICE_GSI,
        last_gsi: int = layout.LAST_DEVICE_GSI,
    ) -> None:
        self._mmio_start = mmio_start
        self._mmio_end = mmio_end
        self._first_gsi = first_gsi
        self._last_gsi = last_gsi
        self._windows: list[tuple[int, int]] = []  # (base, end), unsorted
        self._gsis: set[int] = set()

    def allocate_gsi(self) -> int:
        """The lowest free device GSI."""
        for gsi in range(self._first_gsi, self._last_gsi + 1):
            if gsi not in self._gsis:
                self._gsis.add(gsi)
                return gsi
        raise ResourceError(
            f"all device GSIs {self._first_gsi}-{self._last_gsi} are in use"
        )

    def reserve_gsi(self, gsi: int) -> None:
        if not self._first_gsi <= gsi <= self._last_gsi:
            raise ResourceError(
                f"GSI {gsi} is outside {self._first_gsi}-{self._last_gsi}"
            )
        if gsi in self._gsis:
            raise ResourceError(f"GSI {gsi} is already in use")
        self._gsis.add(gsi)

    def allocate_mmio(self, size: int) -> int:
        """The lowest free window of `size` bytes, aligned to its size
        (rounded up to a whole page)."""
        if size <= 0:
            raise ResourceError(f"an MMIO window cannot be {size} bytes")
        align = PAGE
        while align < size:
            align *= 2
        base = self._mmio_start
        for start, end in sorted(self._windows):
            if base + size <= start:
                break
            base = max(base, -(-end // align) * align)
        if base + size > self._mmio_end:
            raise ResourceError(
                f"no {size:#x}-byte MMIO window left below {self._mmio_end:#x}"
            )
        self._windows.append((base, base + size))
        return base

    def reserve_mmio(self, base: int, size: int) -> None:
        if size <= 0 or base < self._mmio_start or base + size > self._mmio_end:
            raise ResourceError(
                f"MMIO window {base:#x}+{size:#x} is outside "
                f"{self._mmio_start:#x}-{self._mmio_end:#x}"
            )
        for start, end in self._windows:
            if base < end and start < base + size:
                raise ResourceError(
                    f"MMIO window {base:#x}+{size:#x} overlaps {start:#x}"
                )
        self._windows.append((base, base + size))

"""Guest RAM as a list of host mappings, one per KVM memory slot.

Every access from the monitor goes through `GuestMemory.read`/`write`, which check
that the whole range lies inside one region: a guest that hands us a bad address
(a descriptor, a boot pointer) gets an `OutOfBoundsError`, never a read of some
other host memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ember.memory.address import FileOffset, GuestAddress, HostAddress

PAGE_SIZE = 4096


class GuestMemoryError(Exception):
    """A guest memory operation failed."""


class OutOfBoundsError(GuestMemoryError):
    """An access touched guest-physical addresses that no region holds."""


class MemoryFileTooShortError(GuestMemoryError):
    """The memory file holds fewer bytes than the regions it should back."""


@dataclass
class GuestRegion:
    """One contiguous range of guest RAM backed by one host mapping."""

    guest_base: GuestAddress
    size: int
    mapping: mmap.mmap
    file_offset: FileOffset
    _anchor: ctypes.c_char | None = field(default=None, repr=False)

    @property
    def guest_end(self) -> GuestAddress:
        return GuestAddress(self.guest_base + self.size)

    @property
    def host_address(self) -> HostAddress:
        if self._anchor is None:
            # SAFETY: the anchor keeps a buffer export on the mapping, so the
            # address stays valid until close() drops the anchor and unmaps.
            self._anchor = ctypes.c_char.from_buffer(self.mapping)
        return HostAddress(ctypes.addressof(self._anchor))

    def contains(self, address: GuestAddress, length: int = 1) -> bool:
        return self.guest_base <= address and address + length <= self.guest_end

    def close(self) -> None:
        self._anchor = None
        if not self.mapping.closed:
            self.mapping.close()


def _anonymous_mapping(size: int) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class GuestMemory:
    """All guest RAM regions, in guest-address order."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        self.regions = sorted(regions, key=lambda region: region.guest_base)

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Fresh zeroed memory for `layout`, a list of (guest base, size)."""
        regions = []
        offset = 0
        for base, size in layout:
            regions.append(
                GuestRegion(
                    GuestAddress(base),
                    size,
                    _anonymous_mapping(size),
                    FileOffset(offset),
                )
            )
            offset += size
        return cls(regions)

    @classmethod
    def from_file(cls, path: str, layout: list[tuple[int, int]]) -> GuestMemory:
        """Map a memory file privately: lazy, and writes stay in this process."""
        needed = sum(size for _, size in layout)
        with open(path, "rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual < needed:
                raise MemoryFileTooShortError(
                    f"memory file {path} holds {actual} bytes, the snapshot's "
                    f"regions need {needed}"
                )
            regions = []
            offset = 0
            for base, size in layout:
                mapping = mmap.mmap(
                    file.fileno(),
                    size,
                    flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0),
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset,
                )
                regions.append(
                    GuestRegion(GuestAddress(base), size, mapping, FileOffset(offset))
                )
                offset += size
        return cls(regions)

    @property
    def total_size(self) -> int:
        return sum(region.size for region in self.regions)

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self.regions)

    def region_for(self, address: GuestAddress, length: int = 1) -> GuestRegion:
        if length < 0:
            raise OutOfBoundsError(f"negative length {length}")
        for region in self.regions:
            if region.contains(address, length):
                return region
        raise OutOfBoundsError(
            f"guest range {address:#x}+{length:#x} is outside guest memory"
        )

    def view(self, address: GuestAddress, length: int) -> memoryview:
        """A writable view of guest memory; the caller must drop it promptly."""
        region = self.region_for(address, length)
        start = address - region.guest_base
        return memoryview(region.mapping)[start : start + length]

    def read(self, address: GuestAddress, length: int) -> bytes:
        region = self.region_for(address, length)
        start = address - region.guest_base
        return region.mapping[start : start + length]

    def write(
        self, address: GuestAddress, data: bytes | bytearray | memoryview
    ) -> None:
        length = len(data)
        region = self.region_for(address, length)
        start = address - region.guest_base
        region.mapping[start : start + length] = data

    def read_u16(self, address: GuestAddress) -> int:
        value: int = struct.unpack("<H", self.read(address, 2))[0]
        return value

    def read_u32(self, address: GuestAddress) -> int:
        value: int = struct.unpack("<I", self.read(address, 4))[0]
        return value

    def read_u64(self, address: GuestAddress) -> int:
        value: int = struct.unpack("<Q", self.read(address, 8))[0]
        return value

    def write_u32(self, address: GuestAddress, value: int) -> None:
        self.write(address, struct.pack("<I", value))

    def write_u64(self, address: GuestAddress, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def close(self) -> None:
        for region in self.regions:
            region.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

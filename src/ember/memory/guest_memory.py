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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ember.memory.address import FileOffset, GuestAddress, HostAddress

PAGE_SIZE = 4096

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


class GuestMemoryError(Exception):
    """A guest memory operation failed."""


class OutOfBoundsError(GuestMemoryError):
    """An access touched guest-physical addresses that no region holds."""


class HugePagesUnavailableError(GuestMemoryError):
    """The host's hugetlbfs pool has too few free 2 MiB pages."""


class MemoryFileTooShortError(GuestMemoryError):
    """The memory file holds fewer bytes than the regions it should back."""


@dataclass
class GuestRegion:
    """One contiguous range of guest RAM backed by one host mapping."""

    guest_base: GuestAddress
    size: int
    mapping: mmap.mmap
    file_offset: FileOffset
    anonymous: bool = True
    _anchor: ctypes.c_char | None = field(default=None, repr=False)
    # One byte per page the monitor itself wrote since the last snapshot; KVM's
    # dirty log only sees writes made by the guest.
    monitor_dirty: bytearray = field(default_factory=bytearray, repr=False)
    # Set when a page-fault handler fills this memory: a copy may then sleep until
    # the handler serves the page, and must not hold the GIL meanwhile, or the
    # thread that notices a dead handler could never run (see `read` and `write`).
    served_by_handler: bool = False

    def __post_init__(self) -> None:
        if not self.monitor_dirty:
            self.monitor_dirty = bytearray(self.page_count)

    @property
    def page_count(self) -> int:
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    def mark_dirty(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset // PAGE_SIZE
        last = (offset + length - 1) // PAGE_SIZE
        self.monitor_dirty[first : last + 1] = b"\x01" * (last - first + 1)

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

    def resident_pages(self) -> bytes:
        """mincore(2) of the mapping: one byte per page, bit 0 set if resident.

        For anonymous memory a page that is not resident was never touched (no
        swap here), so it holds zeros and a snapshot need not read it."""
        vector = (ctypes.c_ubyte * self.page_count)()
        if _libc.mincore(self.host_address, self.size, vector) != 0:
            errno = ctypes.get_errno()
            raise GuestMemoryError(f"mincore failed: {os.strerror(errno)}")
        return bytes(vector)

    def contains(self, address: GuestAddress, length: int = 1) -> bool:
        return self.guest_base <= address and address + length <= self.guest_end

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` into the region (the caller checked bounds)."""
        if not self.served_by_handler:
            return self.mapping[offset : offset + length]
        # ctypes foreign calls release the GIL; slicing the mmap would not.
        buffer = ctypes.create_string_buffer(length)
        ctypes.memmove(buffer, self.host_address + offset, length)
        return buffer.raw

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `offset` into the region (the caller checked bounds)."""
        if not self.served_by_handler:
            self.mapping[offset : offset + len(data)] = data
            return
        source = data if isinstance(data, bytes) else bytes(data)
        ctypes.memmove(self.host_address + offset, source, len(source))

    def close(self) -> None:
        self._anchor = None
        if not self.mapping.closed:
            self.mapping.close()


MAP_HUGETLB = 0x40000
MAP_HUGE_2MB = 21 << 26  # log2(2 MiB) in the MAP_HUGE_SHIFT field
HUGE_PAGE_SIZE = 2 * 1024 * 1024


def free_huge_pages() -> int:
    """2 MiB pages of the host's hugetlbfs pool that a new mapping can have: free
    and not reserved by another mapping yet (0 where there is no pool)."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo if ":" in line)
    except OSError:
        return 0
    if fields.get("Hugepagesize", "").split() != ["2048", "kB"]:
        return 0
    free = int(fields.get("HugePages_Free", "0").split()[0])
    reserved = int(fields.get("HugePages_Rsvd", "0").split()[0])
    return max(0, free - reserved)


def check_huge_page_pool(total_bytes: int) -> None:
    """Refuse up front when the pool cannot hold `total_bytes` of guest memory."""
    needed = -(-total_bytes // HUGE_PAGE_SIZE)
    available = free_huge_pages()
    if available < needed:
        raise HugePagesUnavailableError(
            f"2 MiB hugetlbfs pages: {needed} needed, {available} free in the host "
            "pool (/proc/sys/vm/nr_hugepages)"
        )


def _hugetlb_mapping(size: int) -> mmap.mmap:
    # No MAP_NORESERVE here: the kernel then reserves the pages at mmap time, so a
    # pool emptied meanwhile is an ENOMEM now, not a SIGBUS at the first touch.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB
    try:
        return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as error:
        raise HugePagesUnavailableError(
            f"cannot map {size >> 20} MiB of 2 MiB hugetlbfs pages: {error.strerror} "
            "(is /proc/sys/vm/nr_hugepages large enough?)"
        ) from None


def _anonymous_mapping(size: int, transparent_huge_pages: bool) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if transparent_huge_pages:
        # One host fault per 2 MiB instead of per 4 KiB on first touch: measured
        # 2-3x faster for a guest filling fresh memory on this host.
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


class GuestMemory:
    """All guest RAM regions, in guest-address order."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        self.regions = sorted(regions, key=lambda region: region.guest_base)

    @classmethod
    def _map_layout(
        cls,
        layout: list[tuple[int, int]],
        map_region: Callable[[int, int], mmap.mmap],
        anonymous: bool,
    ) -> GuestMemory:
        """One region per (guest base, size), mapped by `map_region(size, file
        offset)`; the regions follow each other in the memory file's order. A
        failure part-way unmaps what was already mapped."""
        regions: list[GuestRegion] = []
        offset = 0
        try:
            for base, size in layout:
                regions.append(
                    GuestRegion(
                        GuestAddress(base),
                        size,
                        map_region(size, offset),
                        FileOffset(offset),
                        anonymous=anonymous,
                    )
                )
                offset += size
        except BaseException:
            for region in regions:
                region.close()
            raise
        return cls(regions)

    @classmethod
    def anonymous(
        cls,
        layout: list[tuple[int, int]],
        transparent_huge_pages: bool = False,
        hugetlb: bool = False,
    ) -> GuestMemory:
        """Fresh zeroed memory for `layout`, a list of (guest base, size): 4 KiB
        pages, transparent huge pages, or 2 MiB pages from the hugetlbfs pool."""
        if hugetlb:
            check_huge_page_pool(sum(size for _, size in layout))
            return cls._map_layout(
                layout, lambda size, _: _hugetlb_mapping(size), anonymous=True
            )
        return cls._map_layout(
            layout,
            lambda size, _: _anonymous_mapping(size, transparent_huge_pages),
            anonymous=True,
        )

    @classmethod
    def for_userfaultfd(
        cls, layout: list[tuple[int, int]], hugetlb: bool = False
    ) -> GuestMemory:
        """Anonymous memory that a page-fault handler will fill (the Uffd backend).

        4 KiB pages, or 2 MiB hugetlbfs pages taken from the host's pool. Transparent
        huge pages are not used: the kernel never allocates them while resolving a
        userfault. A page not yet touched holds whatever the handler will serve, not
        zeros, so the regions are not marked `anonymous` (a snapshot reads them)."""
        flags = (
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        )
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if hugetlb:
            check_huge_page_pool(sum(size for _, size in layout))
        memory = cls._map_layout(
            layout,
            (lambda size, _: _hugetlb_mapping(size))
            if hugetlb
            else (lambda size, _: mmap.mmap(-1, size, flags=flags, prot=prot)),
            anonymous=False,
        )
        for region in memory:
            region.served_by_handler = True
        return memory

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
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            fd = file.fileno()
            return cls._map_layout(
                layout,
                lambda size, offset: mmap.mmap(
                    fd, size, flags=flags, prot=prot, offset=offset
                ),
                anonymous=False,
            )

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
        """A writable view of guest memory; the caller must drop it promptly and
        call `mark_dirty` for what it writes through it."""
        region = self.region_for(address, length)
        start = address - region.guest_base
        return memoryview(region.mapping)[start : start + length]

    def mark_dirty(self, address: GuestAddress, length: int) -> None:
        region = self.region_for(address, length)
        region.mark_dirty(address - region.guest_base, length)

    def read(self, address: GuestAddress, length: int) -> bytes:
        region = self.region_for(address, length)
        return region.read(address - region.guest_base, length)

    def write(
        self, address: GuestAddress, data: bytes | bytearray | memoryview
    ) -> None:
        length = len(data)
        region = self.region_for(address, length)
        start = address - region.guest_base
        region.write(start, data)
        region.mark_dirty(start, length)

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

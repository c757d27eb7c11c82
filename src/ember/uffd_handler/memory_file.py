"""The memory file as the handler sees it: mapped read-only, holes known.

The mapping's address is the source of every UFFDIO_COPY. Holes of a sparse file
(pages a full snapshot found zero, pages a diff did not write) are found once with
SEEK_DATA/SEEK_HOLE, so faults there are answered with the shared zero page instead
of copying zeros.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Iterable

from ember.snapshot.memory_file import data_extents

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_MADV_POPULATE_READ = 22  # Linux 5.14
_MAP_FAILED = ctypes.c_void_p(-1).value


class MemoryFileError(OSError):
    """The memory file cannot be opened or mapped."""


class ReadOnlyMemoryFile:
    """A memory file opened O_RDONLY and mapped PROT_READ, shared by every VM the
    handler serves (the kernel copies out of it; nothing ever writes to it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise MemoryFileError(
                error.errno, f"cannot open memory file {path}: {error.strerror}"
            ) from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise MemoryFileError(0, f"memory file {path} is empty")
            self._data = _merge(data_extents(fd, self.size))
            self._starts = [start for start, _ in self._data]
            # SAFETY: a private read-only mapping of a file we keep open; the
            # address is only handed to the kernel as a copy source and is
            # unmapped in close() after every session using it has ended.
            address = _libc.mmap(
                None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0
            )
            if address == _MAP_FAILED or address is None:
                error_number = ctypes.get_errno()
                raise MemoryFileError(
                    error_number,
                    f"cannot map memory file {path}: {os.strerror(error_number)}",
                )
            self.address: int = address
        finally:
            os.close(fd)

    def populate(self) -> bool:
        """Map every data page now (MADV_POPULATE_READ), so a fill never takes a
        page fault on its source: on this host such a fault costs several times
        the copy. Holes are skipped (populating them would allocate page cache).
        Returns False where the kernel lacks the advice."""
        for start, end in self._data:
            if _libc.madvise(self.address + start, end - start, _MADV_POPULATE_READ):
                return False
        return True

    @property
    def data_bytes(self) -> int:
        return sum(end - start for start, end in self._data)

    def is_hole(self, offset: int, length: int) -> bool:
        """True if [offset, offset + length) holds no data (reads as zeros)."""
        index = bisect.bisect_right(self._starts, offset + length - 1) - 1
        return index < 0 or self._data[index][1] <= offset

    def is_data(self, offset: int, length: int) -> bool:
        """True if all of [offset, offset + length) is inside one data extent."""
        index = bisect.bisect_right(self._starts, offset) - 1
        return index >= 0 and self._data[index][1] >= offset + length

    def data_ranges(self, offset: int, length: int, page: int) -> list[tuple[int, int]]:
        """Page-aligned [start, end) ranges, relative to `offset`, that hold data
        inside [offset, offset + length); the rest of the range is holes."""
        ranges: list[tuple[int, int]] = []
        end = offset + length
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for start, stop in self._data[first:]:
            if start >= end:
                break
            low = max(start, offset) - offset
            high = min(stop, end) - offset
            if high <= low:
                continue
            low -= low % page
            high += -high % page
            if ranges and low <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], high))
            else:
                ranges.append((low, high))
        return ranges

    def close(self) -> None:
        address, self.address = self.address, 0
        if address:
            _libc.munmap(address, self.size)


class ZeroSource:
    """A read-only stretch of zeros to copy from where UFFDIO_ZEROPAGE is not
    available (hugetlbfs)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # SAFETY: a private anonymous read-only mapping owned by this object; it
        # reads as zeros and is only a copy source for the kernel.
        address = _libc.mmap(
            None, size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
        )
        if address == _MAP_FAILED or address is None:
            error_number = ctypes.get_errno()
            raise MemoryFileError(error_number, os.strerror(error_number))
        self.address: int = address

    def close(self) -> None:
        address, self.address = self.address, 0
        if address:
            _libc.munmap(address, self.size)


def _merge(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in extents:
        end = start + length
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

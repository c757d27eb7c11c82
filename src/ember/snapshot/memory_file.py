"""Memory files: guest RAM as raw bytes, regions concatenated in order.

A full snapshot holds every page; pages that are entirely zero are left as holes,
which read back as zeros, so the file is the same byte for byte and costs no disk
for untouched memory. A diff snapshot has the same size and holds only the pages
dirtied since the previous snapshot; the rest are holes. `rebase` copies a diff's
data extents onto its base, turning the base into the later point in time.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ember.memory import GuestMemory
from ember.memory.guest_memory import PAGE_SIZE, GuestRegion
from ember.snapshot.atomic import AtomicFile

CHUNK = 2 * 1024 * 1024
_ZERO_CHUNK = bytes(CHUNK)

Progress = Callable[[int, int], None]


class RebaseError(Exception):
    """A diff could not be merged into its base."""


@dataclass(frozen=True)
class DumpStats:
    bytes_written: int
    total_bytes: int


def write_full(
    memory: GuestMemory, file: AtomicFile, progress: Progress | None = None
) -> DumpStats:
    """Every page of every region, zero chunks left as holes."""
    total = memory.total_size
    file.truncate(total)
    written = 0
    done = 0
    for region in memory:
        resident = region.resident_pages() if region.anonymous else None
        for start in range(0, region.size, CHUNK):
            length = min(CHUNK, region.size - start)
            if resident is not None and not _any_resident(resident, start, length):
                pass  # never touched: zeros, left as a hole without reading it
            else:
                data = region.read(start, length)
                if not _is_zero(data):
                    file.write_all(data, region.file_offset + start)
                    written += length
            done += length
            if progress is not None:
                progress(done, total)
    return DumpStats(written, total)


def _any_resident(resident: bytes, start: int, length: int) -> bool:
    first = start // PAGE_SIZE
    last = (start + length + PAGE_SIZE - 1) // PAGE_SIZE
    return resident.count(0, first, last) != last - first


def _is_zero(data: bytes) -> bool:
    # Bytes compare with memcmp (memoryviews would go item by item), so copying the
    # chunk out first is the fast way (about 0.2 s per GiB here).
    if len(data) == CHUNK:
        return data == _ZERO_CHUNK
    return data == bytes(len(data))


def write_diff(
    memory: GuestMemory, file: AtomicFile, progress: Progress | None = None
) -> DumpStats:
    """Only the pages marked in each region's `monitor_dirty` (which the caller has
    already merged KVM's dirty log into)."""
    total = memory.total_size
    file.truncate(total)
    written = 0
    for region in memory:
        view = memoryview(region.mapping)
        for first, last in dirty_runs(region.monitor_dirty):
            start, end = first * PAGE_SIZE, min(last * PAGE_SIZE, region.size)
            file.write_all(view[start:end], region.file_offset + start)
            written += end - start
            if progress is not None:
                progress(written, total)
        view.release()
    return DumpStats(written, total)


def dirty_runs(pages: bytearray) -> Iterator[tuple[int, int]]:
    """[first, last) page ranges whose byte is non-zero; runs found at C speed."""
    position = 0
    length = len(pages)
    while position < length:
        first = pages.find(b"\x01", position)
        if first < 0:
            return
        last = pages.find(b"\x00", first)
        if last < 0:
            last = length
        yield first, last
        position = last


def merge_kvm_bitmap(region: GuestRegion, bitmap: ctypes.Array[ctypes.c_uint64]) -> int:
    """OR KVM's dirty log (one bit per page) into the region's page bytes; returns
    how many pages KVM reported."""
    pages = region.monitor_dirty
    count = 0
    full_word = (1 << 64) - 1
    for word_index, word in enumerate(bitmap):
        if not word:
            continue
        base = word_index * 64
        if word == full_word:
            pages[base : base + 64] = b"\x01" * len(pages[base : base + 64])
            count += 64
            continue
        while word:
            low = word & -word
            bit = low.bit_length() - 1
            if base + bit < len(pages):
                pages[base + bit] = 1
            count += 1
            word ^= low
    return count


def dirty_bitmap_for(region: GuestRegion) -> ctypes.Array[ctypes.c_uint64]:
    words = (region.page_count + 63) // 64
    return (ctypes.c_uint64 * words)()


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of a sparse file."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return  # ENXIO: no data past offset
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def rebase(base_path: str, diff_path: str) -> int:
    """Copy every data extent of `diff_path` onto `base_path` in place; returns
    the bytes copied. Both files must have the same size."""
    try:
        diff_fd = os.open(diff_path, os.O_RDONLY)
    except OSError as error:
        raise RebaseError(f"cannot open diff {diff_path}: {error.strerror}") from None
    try:
        try:
            base_fd = os.open(base_path, os.O_WRONLY)
        except OSError as error:
            raise RebaseError(
                f"cannot open base {base_path}: {error.strerror}"
            ) from None
        try:
            return _copy_extents(diff_fd, base_fd, diff_path, base_path)
        finally:
            os.close(base_fd)
    finally:
        os.close(diff_fd)


def _copy_extents(diff_fd: int, base_fd: int, diff_path: str, base_path: str) -> int:
    diff_size = os.fstat(diff_fd).st_size
    base_size = os.fstat(base_fd).st_size
    if diff_size != base_size:
        raise RebaseError(
            f"diff {diff_path} is {diff_size} bytes but base {base_path} is "
            f"{base_size}: they are not snapshots of the same microVM"
        )
    copied = 0
    try:
        for offset, length in data_extents(diff_fd, diff_size):
            remaining = length
            position = offset
            while remaining:
                moved = os.copy_file_range(
                    diff_fd, base_fd, remaining, position, position
                )
                if moved == 0:
                    break
                remaining -= moved
                position += moved
                copied += moved
        os.fsync(base_fd)
    except OSError as error:
        raise RebaseError(f"cannot copy into {base_path}: {error.strerror}") from None
    return copied

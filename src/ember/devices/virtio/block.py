"""virtio-block backed by a host file (virtio 1.x, "Block Device").

A request is one descriptor chain: a 16-byte header the device reads (type,
reserved, sector), then the data (device-readable for a write, device-writable
for a read), then one status byte the device writes. The device does not rely on
where the driver put descriptor boundaries: it reads the header from the first
16 readable bytes, takes the status from the last writable byte, and treats
what lies between as data.

Requests are served synchronously on the event-loop thread with preadv/pwritev
straight into and out of guest memory (no copies, no allocation proportional to
the request). A request that is well-formed as a chain but wrong as a request —
unknown type, data not a whole number of sectors, outside the disk, a write to a
read-only disk, a data buffer outside guest memory — is answered with an error
status. A chain without a reachable status byte is returned unanswered (length
0) and counted. Nothing the guest sends raises out of `handle`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import struct
from dataclasses import dataclass

import msgspec

from ember.devices.bus import RateLimitedLog
from ember.devices.virtio.mmio import MmioSlot, VirtioDevice, VirtioMmioState
from ember.devices.virtio.queue import Descriptor, DescriptorChain
from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.memory.guest_memory import GuestMemoryError
from ember.vmm.config import CacheType, DriveConfig

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
QUEUE_SIZE = 256
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_FLUSH = 9


class RequestType(enum.IntEnum):
    IN = 0  # read from the disk
    OUT = 1  # write to the disk
    FLUSH = 4
    GET_ID = 8


VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")


class BlockError(Exception):
    """A disk could not be opened or used."""


class BlockState(msgspec.Struct, frozen=True):
    """A block device: its drive as configured, where it sits, its transport."""

    drive_id: str
    path_on_host: str
    is_read_only: bool
    is_root_device: bool
    partuuid: str | None
    cache_type: CacheType
    slot: MmioSlot
    transport: VirtioMmioState


@dataclass
class BlockMetrics:
    """Counters named after Firecracker's block metrics."""

    read_count: int = 0
    write_count: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flush_count: int = 0
    invalid_reqs_count: int = 0
    execute_fails: int = 0
    update_count: int = 0
    update_fails: int = 0


class _RequestError(Exception):
    """Answer the current request with this status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def open_disk(path: str, read_only: bool) -> tuple[int, int]:
    """Open a disk image; returns (fd, size in bytes rounded down to sectors)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise BlockError(f"cannot open disk {path}: {error.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as error:
        os.close(fd)
        raise BlockError(f"cannot size disk {path}: {error.strerror}") from None
    if size % SECTOR_SIZE:
        log.warning(
            "disk %s is %d bytes, not whole sectors; the last %d bytes are not "
            "visible to the guest",
            path,
            size,
            size % SECTOR_SIZE,
        )
    return fd, size - size % SECTOR_SIZE


class Block(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, drive: DriveConfig) -> None:
        self.drive = drive
        self.fd, self.size = open_disk(drive.path_on_host, drive.is_read_only)
        self.metrics = BlockMetrics()
        self._log = RateLimitedLog()
        self.disk_id = drive.drive_id.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")

    # --- what the driver sees -----------------------------------------------------

    def features(self) -> int:
        features = 0
        if self.drive.is_read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.drive.cache_type == "Writeback":
            features |= 1 << VIRTIO_BLK_F_FLUSH
        return features

    def read_config(self, offset: int, size: int) -> bytes:
        # Only `capacity` (le64, in 512-byte sectors); the rest of the layout
        # belongs to features this device does not offer and reads as zero.
        config = (self.size // SECTOR_SIZE).to_bytes(8, "little")
        return config[offset : offset + size]

    # --- requests -------------------------------------------------------------------

    def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        writable = [d for d in chain.descriptors if d.writable]
        readable = [d for d in chain.descriptors if not d.writable]
        status_at = self._status_address(chain, writable, memory)
        if status_at is None:
            self.metrics.invalid_reqs_count += 1
            return 0
        data_out = _trim_end(writable, 1)
        try:
            if any(not d.writable for d in chain.descriptors[len(readable) :]):
                raise _RequestError(VIRTIO_BLK_S_IOERR, "readable after writable")
            written = self._execute(memory, readable, data_out)
            status = VIRTIO_BLK_S_OK
        except _RequestError as error:
            self._note(error)
            written, status = 0, error.status
        memory.write(status_at, bytes([status]))
        return written + 1

    def _status_address(
        self, chain: DescriptorChain, writable: list[Descriptor], memory: GuestMemory
    ) -> GuestAddress | None:
        last = chain.descriptors[-1]
        if not last.writable or last.length == 0:
            self._warn("request %d has no status byte; returned unanswered", chain.head)
            return None
        address = GuestAddress(last.address + last.length - 1)
        try:
            memory.region_for(address, 1)
        except GuestMemoryError:
            self._warn(
                "request %d: status byte %#x outside memory", chain.head, address
            )
            return None
        return address

    def _execute(
        self,
        memory: GuestMemory,
        readable: list[Descriptor],
        data_out: list[tuple[GuestAddress, int]],
    ) -> int:
        header = _gather(memory, _segments(readable), _HEADER.size)
        if len(header) < _HEADER.size:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "header shorter than 16 bytes")
        kind, _, sector = _HEADER.unpack(header)
        match kind:
            case RequestType.IN:
                return self._read(memory, sector, data_out)
            case RequestType.OUT:
                data_in = _skip(_segments(readable), _HEADER.size)
                self._write(memory, sector, data_in)
                return 0
            case RequestType.FLUSH:
                self._flush()
                return 0
            case RequestType.GET_ID:
                return _scatter(memory, data_out, self.disk_id)
        raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {kind}")

    def _check_range(self, sector: int, length: int) -> int:
        if length % SECTOR_SIZE:
            raise _RequestError(
                VIRTIO_BLK_S_IOERR, f"{length} data bytes is not whole sectors"
            )
        offset = sector * SECTOR_SIZE
        if offset + length > self.size:
            raise _RequestError(
                VIRTIO_BLK_S_IOERR,
                f"sectors {sector}+{length // SECTOR_SIZE} past the end of the disk",
            )
        return offset

    def _read(
        self, memory: GuestMemory, sector: int, buffers: list[tuple[GuestAddress, int]]
    ) -> int:
        length = sum(size for _, size in buffers)
        offset = self._check_range(sector, length)
        with _Views(memory, buffers) as views:
            try:
                done = os.preadv(self.fd, views, offset) if views else 0
            except OSError as error:
                self.metrics.execute_fails += 1
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"read: {error}") from None
        for address, size in buffers:
            memory.mark_dirty(address, size)
        if done != length:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"short read {done} of {length}")
        self.metrics.read_count += 1
        self.metrics.read_bytes += length
        return length

    def _write(
        self, memory: GuestMemory, sector: int, buffers: list[tuple[GuestAddress, int]]
    ) -> None:
        if self.drive.is_read_only:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        length = sum(size for _, size in buffers)
        offset = self._check_range(sector, length)
        with _Views(memory, buffers) as views:
            try:
                done = os.pwritev(self.fd, views, offset) if views else 0
            except OSError as error:
                self.metrics.execute_fails += 1
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"write: {error}") from None
        if done != length:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"short write {done} of {length}")
        self.metrics.write_count += 1
        self.metrics.write_bytes += length

    def _flush(self) -> None:
        self.metrics.flush_count += 1
        if self.drive.cache_type != "Writeback":
            return  # "Unsafe": the host's page cache is as far as data goes
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            self.metrics.execute_fails += 1
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"flush: {error}") from None

    def _note(self, error: _RequestError) -> None:
        self.metrics.invalid_reqs_count += 1
        self._warn("request answered with status %d: %s", error.status, error)

    def _warn(self, message: str, *args: object) -> None:
        if self._log.allow():
            log.warning("drive %s: " + message, self.drive.drive_id, *args)

    # --- host side ------------------------------------------------------------------

    def flush(self) -> None:
        """Make completed writes durable when the cache type promises it."""
        if self.drive.cache_type == "Writeback" and not self.drive.is_read_only:
            os.fdatasync(self.fd)

    def replace_backing(self, path: str) -> None:
        """Point the device at another file (PATCH path_on_host); the caller
        tells the driver the capacity may have changed."""
        fd, size = open_disk(path, self.drive.is_read_only)
        old = self.fd
        self.fd, self.size = fd, size
        self.drive = dataclasses.replace(self.drive, path_on_host=path)
        os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def save(self, slot: MmioSlot, transport: VirtioMmioState) -> BlockState:
        drive = self.drive
        return BlockState(
            drive_id=drive.drive_id,
            path_on_host=drive.path_on_host,
            is_read_only=drive.is_read_only,
            is_root_device=drive.is_root_device,
            partuuid=drive.partuuid,
            cache_type=drive.cache_type,
            slot=slot,
            transport=transport,
        )


def root_args(drive: DriveConfig) -> str:
    """Kernel command-line words naming `drive` as the root file system. A root
    drive is attached first, so without a partuuid it is /dev/vda."""
    device = f"PARTUUID={drive.partuuid}" if drive.partuuid else "/dev/vda"
    return f"root={device} {'ro' if drive.is_read_only else 'rw'}"


def drive_from_state(state: BlockState) -> DriveConfig:
    return DriveConfig(
        drive_id=state.drive_id,
        path_on_host=state.path_on_host,
        is_root_device=state.is_root_device,
        is_read_only=state.is_read_only,
        partuuid=state.partuuid,
        cache_type=state.cache_type,
    )


# --- scatter-gather over guest memory ---------------------------------------------


def _segments(descriptors: list[Descriptor]) -> list[tuple[GuestAddress, int]]:
    return [(d.address, d.length) for d in descriptors if d.length]


def _skip(
    segments: list[tuple[GuestAddress, int]], count: int
) -> list[tuple[GuestAddress, int]]:
    """The segments with their first `count` bytes removed."""
    result = []
    for address, length in segments:
        if count >= length:
            count -= length
            continue
        result.append((GuestAddress(address + count), length - count))
        count = 0
    return result


def _trim_end(
    descriptors: list[Descriptor], count: int
) -> list[tuple[GuestAddress, int]]:
    """The descriptors' segments with their last `count` bytes removed."""
    reversed_segments = [
        (GuestAddress(address + length), length)
        for address, length in reversed(_segments(descriptors))
    ]
    kept = []
    for end, length in reversed_segments:
        if count >= length:
            count -= length
            continue
        kept.append((GuestAddress(end - length), length - count))
        count = 0
    return list(reversed(kept))


def _gather(
    memory: GuestMemory, segments: list[tuple[GuestAddress, int]], count: int
) -> bytes:
    """Up to `count` bytes from the start of `segments`."""
    parts = []
    for address, length in segments:
        if count <= 0:
            break
        take = min(length, count)
        try:
            parts.append(memory.read(address, take))
        except GuestMemoryError:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"header at {address:#x}") from None
        count -= take
    return b"".join(parts)


def _scatter(
    memory: GuestMemory, segments: list[tuple[GuestAddress, int]], data: bytes
) -> int:
    """Write as much of `data` as fits into `segments`; returns bytes written."""
    done = 0
    for address, length in segments:
        if done == len(data):
            break
        piece = data[done : done + length]
        try:
            memory.write(address, piece)
        except GuestMemoryError:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"buffer at {address:#x}") from None
        done += len(piece)
    return done


class _Views:
    """Writable views of guest buffers for one system call, released after it
    (an open view would keep the guest memory mapping from being closed)."""

    def __init__(
        self, memory: GuestMemory, buffers: list[tuple[GuestAddress, int]]
    ) -> None:
        self._memory = memory
        self._buffers = buffers
        self._views: list[memoryview] = []

    def __enter__(self) -> list[memoryview]:
        try:
            for address, length in self._buffers:
                self._views.append(self._memory.view(address, length))
        except GuestMemoryError as error:
            self._release()
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"data buffer: {error}") from None
        return self._views

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        for view in self._views:
            view.release()
        self._views = []

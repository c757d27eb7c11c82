"""Split virtqueues (virtio 1.x, "Split Virtqueues") as the device side sees them.

Theory of operation. A split virtqueue is three areas of guest memory the driver
owns: a descriptor table (16 bytes per entry: address, length, flags, next), an
available ring the driver appends chain heads to, and a used ring the device
returns them on. Every byte of them is under the guest's control, so every value
read from them is treated as hostile:

- every access goes through `GuestMemory`, which refuses any range outside guest
  RAM (`OutOfBoundsError`); the queue turns that into a `VirtqueueError`;
- a head or `next` index must be inside its table, and a chain may visit at most
  as many descriptors as the queue has entries (the driver is not allowed longer
  chains), which also ends any loop;
- an indirect table must be a whole number of descriptors, not empty, reached
  from a descriptor without NEXT, and may not itself point to another table;
- the available index may run ahead of the device by at most the queue size.

A `VirtqueueError` means the driver broke the protocol: the transport marks the
device as needing a reset and stops using it; the monitor carries on.

Memory ordering. The guest's vCPUs write the rings while this thread reads them.
x86 keeps loads in order and stores in order, and the 2-byte indices are read and
written with single aligned accesses (`mmap` slices copy with one load or store
at that size), so reading `idx` before the ring entries it covers is enough. The
one reordering x86 does allow — a later load passing an earlier store — matters
where the device publishes an index and then reads the driver's (EVENT_IDX
notification and interrupt suppression); `_full_fence` closes that window.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import msgspec

from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.memory.guest_memory import GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESCRIPTOR_SIZE = 16
_DESCRIPTOR = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# Alignment the spec requires of each area (virtio 1.x, "Virtqueue Alignment").
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4


class VirtqueueError(Exception):
    """The driver put something in a virtqueue that the device cannot use."""


class QueueConfigError(VirtqueueError):
    """A queue's size or ring addresses are invalid at activation."""


class QueueState(msgspec.Struct, frozen=True):
    """A queue's configuration and the device's position in its rings."""

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    num_added: int = 0


@dataclass(frozen=True)
class Descriptor:
    address: GuestAddress
    length: int
    writable: bool


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    descriptors: list[Descriptor]


_fence_lock = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier. Python has none; taking an uncontended lock is a
    locked read-modify-write, which orders every earlier load and store before
    every later one on x86."""
    with _fence_lock:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """True if moving an index from `old` to `new` crossed `event` (16-bit wrap):
    the EVENT_IDX rule for whether the other side asked to be told."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Queue:
    """One split virtqueue. Not thread-safe: the transport's lock guards it."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # Set from the negotiated features when the device is activated.
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = GuestAddress(0)
        self.avail_ring = GuestAddress(0)
        self.used_ring = GuestAddress(0)
        self.next_avail = 0
        self.next_used = 0
        self.num_added = 0

    # --- configuration ------------------------------------------------------------

    def check(self, memory: GuestMemory) -> None:
        """Raise `QueueConfigError` unless size and rings are usable."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueConfigError(
                f"queue size {size} is not a power of two in 1..{self.max_size}"
            )
        areas = (
            ("descriptor table", self.desc_table, DESC_TABLE_ALIGN, 16 * size),
            ("available ring", self.avail_ring, AVAIL_RING_ALIGN, 6 + 2 * size),
            ("used ring", self.used_ring, USED_RING_ALIGN, 6 + 8 * size),
        )
        for name, address, align, length in areas:
            if address % align:
                raise QueueConfigError(f"{name} at {address:#x} is not {align}-aligned")
            try:
                memory.region_for(address, length)
            except GuestMemoryError:
                raise QueueConfigError(
                    f"{name} {address:#x}+{length:#x} is outside guest memory"
                ) from None

    def areas(self) -> list[tuple[GuestAddress, int]]:
        """The guest ranges the rings occupy (for marking them dirty)."""
        size = self.size
        return [
            (self.desc_table, 16 * size),
            (self.avail_ring, 6 + 2 * size),
            (self.used_ring, 6 + 8 * size),
        ]

    # --- the available ring ---------------------------------------------------------

    def available(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available and the device not taken."""
        avail_idx = self._read_u16(memory, self.avail_ring + 2)
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"available index {avail_idx} is {pending} ahead of the device "
                f"({self.next_avail}); the queue has {self.size} entries"
            )
        return pending

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, walked and checked; None if there is none."""
        if not self.available(memory):
            return None
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        head = self._read_u16(memory, GuestAddress(slot))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return DescriptorChain(head, self._walk(memory, head))

    def _walk(self, memory: GuestMemory, head: int) -> list[Descriptor]:
        if head >= self.size:
            raise VirtqueueError(f"chain head {head} outside a {self.size}-entry table")
        table, entries, index = self.desc_table, self.size, head
        indirect = False
        descriptors: list[Descriptor] = []
        while True:
            address, length, flags, next_index = self._read_descriptor(
                memory, table, index
            )
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, entries = self._indirect_table(
                    memory, address, length, flags, indirect
                )
                indirect, index = True, 0
                continue
            descriptors.append(
                Descriptor(
                    GuestAddress(address), length, bool(flags & VIRTQ_DESC_F_WRITE)
                )
            )
            if len(descriptors) > self.size:
                raise VirtqueueError(
                    f"chain from head {head} is longer than the queue ({self.size}); "
                    "a loop?"
                )
            if not flags & VIRTQ_DESC_F_NEXT:
                return descriptors
            if next_index >= entries:
                raise VirtqueueError(
                    f"descriptor {index} links to {next_index}, outside a "
                    f"{entries}-entry table"
                )
            index = next_index

    def _indirect_table(
        self, memory: GuestMemory, address: int, length: int, flags: int, nested: bool
    ) -> tuple[GuestAddress, int]:
        if not self.indirect:
            raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if nested:
            raise VirtqueueError("an indirect table points to another indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtqueueError("an indirect descriptor also has NEXT set")
        if length == 0 or length % DESCRIPTOR_SIZE:
            raise VirtqueueError(f"indirect table length {length} is not n * 16")
        entries = length // DESCRIPTOR_SIZE
        if entries > self.size:
            raise VirtqueueError(
                f"indirect table of {entries} entries is longer than the queue"
            )
        try:
            memory.region_for(GuestAddress(address), length)
        except GuestMemoryError as error:
            raise VirtqueueError(f"indirect table: {error}") from None
        return GuestAddress(address), entries

    def _read_descriptor(
        self, memory: GuestMemory, table: GuestAddress, index: int
    ) -> tuple[int, int, int, int]:
        address = GuestAddress(table + DESCRIPTOR_SIZE * index)
        try:
            raw = memory.read(address, DESCRIPTOR_SIZE)
        except GuestMemoryError as error:
            raise VirtqueueError(f"descriptor {index}: {error}") from None
        fields: tuple[int, int, int, int] = _DESCRIPTOR.unpack(raw)
        return fields

    # --- the used ring ----------------------------------------------------------------

    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        """Return chain `head` to the driver, `length` bytes written into it."""
        slot = self.used_ring + 4 + 8 * (self.next_used % self.size)
        try:
            memory.write(GuestAddress(slot), _USED_ELEM.pack(head, length))
            self.next_used = (self.next_used + 1) & 0xFFFF
            # The element is in place before the index that publishes it.
            memory.write(
                GuestAddress(self.used_ring + 2), self.next_used.to_bytes(2, "little")
            )
        except GuestMemoryError as error:
            raise VirtqueueError(f"used ring: {error}") from None
        self.num_added += 1

    def needs_interrupt(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was added since the
        last time this was asked (EVENT_IDX's used_event, else the NO_INTERRUPT
        flag)."""
        if self.num_added == 0:
            return False
        _full_fence()
        old = (self.next_used - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            used_event = self._read_u16(memory, self.avail_ring + 4 + 2 * self.size)
            return need_event(used_event, self.next_used, old)
        flags = self._read_u16(memory, self.avail_ring)
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self, memory: GuestMemory) -> bool:
        """Ask the driver to notify on its next addition; returns True if chains
        arrived meanwhile, so the caller must keep going instead of waiting."""
        if self.event_idx:
            avail_event = GuestAddress(self.used_ring + 4 + 8 * self.size)
            try:
                memory.write(avail_event, self.next_avail.to_bytes(2, "little"))
            except GuestMemoryError as error:
                raise VirtqueueError(f"used ring: {error}") from None
            _full_fence()
        return self.available(memory) > 0

    def _read_u16(self, memory: GuestMemory, address: int) -> int:
        try:
            return int.from_bytes(memory.read(GuestAddress(address), 2), "little")
        except GuestMemoryError as error:
            raise VirtqueueError(f"ring access: {error}") from None

    # --- state ------------------------------------------------------------------------

    def save(self) -> QueueState:
        return QueueState(
            max_size=self.max_size,
            size=self.size,
            ready=self.ready,
            desc_table=self.desc_table,
            avail_ring=self.avail_ring,
            used_ring=self.used_ring,
            next_avail=self.next_avail,
            next_used=self.next_used,
            num_added=self.num_added,
        )

    def restore(self, state: QueueState) -> None:
        if state.max_size != self.max_size:
            raise QueueConfigError(
                f"saved queue has {state.max_size} entries at most, this device "
                f"{self.max_size}"
            )
        self.size = state.size
        self.ready = state.ready
        self.desc_table = GuestAddress(state.desc_table)
        self.avail_ring = GuestAddress(state.avail_ring)
        self.used_ring = GuestAddress(state.used_ring)
        self.next_avail = state.next_avail & 0xFFFF
        self.next_used = state.next_used & 0xFFFF
        self.num_added = state.num_added

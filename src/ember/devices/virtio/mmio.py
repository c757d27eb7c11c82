"""The virtio-mmio transport, version 2 (virtio 1.x, "Virtio Over MMIO").

Theory of operation. Each device gets a 4 KiB window in the 32-bit MMIO gap: 32-bit
registers from 0x000 (identification, feature negotiation, queue set-up, status,
interrupt status) and the device's configuration space from 0x100. vCPU threads
reach the registers through the MMIO bus; queue notifications normally do not:
KVM signals one ioeventfd per queue on a write to QueueNotify, and the device
event loop calls `process_queue` on its own thread. Interrupts leave through an
irqfd (an edge on the device's GSI) with the cause in InterruptStatus.

One lock per transport serialises register accesses from any vCPU with queue
processing on the event loop and with snapshotting, so a device never sees its
configuration change under a request.

A driver that breaks the protocol — a malformed chain, rings outside memory —
puts the device into DEVICE_NEEDS_RESET: the device stops touching the queues,
raises a configuration-change interrupt (the spec's way of telling the driver),
and waits for a reset. Every such event is logged (rate-limited) and counted; no
guest input can raise out of the transport into the vCPU or event-loop thread.
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
from collections.abc import Callable
from typing import ClassVar

import msgspec

from ember.devices.bus import RateLimitedLog
from ember.devices.virtio.queue import (
    DescriptorChain,
    Queue,
    QueueConfigError,
    QueueState,
    VirtqueueError,
)
from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.memory.guest_memory import GuestMemoryError

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x52424D45  # "EMBR"
WINDOW_SIZE = 0x1000
CONFIG_OFFSET = 0x100


class Reg(enum.IntEnum):
    """Register offsets in the window."""

    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    CONFIG_GENERATION = 0x0FC


# Device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2

# Feature bits every device here offers.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
COMMON_FEATURES = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
)

# A notification handles at most this many chains per queue entry before handing
# the event loop back to the other devices (it re-arms itself to continue).
BATCH_PER_ENTRY = 4


class VirtioRestoreError(Exception):
    """Saved transport state does not fit the device it is restored into."""


class MmioSlot(msgspec.Struct, frozen=True):
    """Where a device sits: its register window and its interrupt line."""

    base: int
    size: int
    irq: int

    def cmdline_entry(self) -> str:
        """The device as Linux's `virtio_mmio.device=<size>@<base>:<irq>`."""
        size = f"{self.size // 1024}K" if self.size % 1024 == 0 else str(self.size)
        return f"virtio_mmio.device={size}@{self.base:#x}:{self.irq}"


class VirtioMmioState(msgspec.Struct, frozen=True):
    """The transport's registers and its queues, as the driver last left them."""

    device_type: int
    avail_features: int
    acked_features: int
    device_features_select: int
    driver_features_select: int
    queue_select: int
    status: int
    config_generation: int
    interrupt_status: int
    activated: bool
    queues: list[QueueState]


class VirtioDevice(abc.ABC):
    """What a device type adds to the transport: its ID, queues, features,
    configuration space and request handling."""

    device_type: ClassVar[int]
    queue_max_sizes: ClassVar[tuple[int, ...]]

    @abc.abstractmethod
    def features(self) -> int:
        """Device-specific feature bits (the transport adds the common ones)."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes: ...

    acked_features = 0

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have no writable configuration; writes are dropped."""
        log.debug("config write of %d bytes at %#x dropped", len(data), offset)

    @abc.abstractmethod
    def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """Serve one request; returns the bytes written into the chain. Raises
        `VirtqueueError` only when the request cannot even be answered."""

    def activate(self, acked_features: int) -> None:
        """Called when the driver sets DRIVER_OK with valid queues."""
        self.acked_features = acked_features

    def reset(self) -> None:
        """Called when the driver resets the device."""
        self.acked_features = 0


class MmioTransport:
    """One virtio device's register window, queues and interrupt."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: Callable[[], None],
        notify: Callable[[int], None] | None = None,
    ) -> None:
        """`interrupt` raises the device's interrupt line. `notify(queue)` is
        how a QueueNotify write that reaches the MMIO bus (no ioeventfd took it)
        gets to the event loop; without it the queue is processed at once."""
        self.device = device
        self.memory = memory
        self._interrupt = interrupt
        self._notify = notify or self.process_queue
        self.lock = threading.RLock()
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.avail_features = device.features() | COMMON_FEATURES
        self._log = RateLimitedLog()
        self.error_count = 0
        self.interrupt_count = 0
        self._reset_registers()
        self.config_generation = 0

    def route_notifications(self, notify: Callable[[int], None]) -> None:
        """Send QueueNotify writes that reach the bus to `notify(queue)`."""
        self._notify = notify

    def _reset_registers(self) -> None:
        self.acked_features = 0
        self.device_features_select = 0
        self.driver_features_select = 0
        self.queue_select = 0
        self.status = 0
        self.interrupt_status = 0
        self.activated = False
        for queue in self.queues:
            queue.reset()

    @property
    def broken(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    # --- registers (vCPU threads) -----------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                data = self.device.read_config(offset - CONFIG_OFFSET, size)
                return data.ljust(size, b"\0")[:size]
            if size != 4 or offset % 4:
                self._warn("%d-byte register read at %#x ignored", size, offset)
                return b"\0" * size
            return self._read_register(offset).to_bytes(4, "little")

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        match offset:
            case Reg.MAGIC:
                return MAGIC
            case Reg.VERSION:
                return VERSION
            case Reg.DEVICE_ID:
                return self.device.device_type
            case Reg.VENDOR_ID:
                return VENDOR_ID
            case Reg.DEVICE_FEATURES:
                if self.device_features_select > 1:
                    return 0
                shift = 32 * self.device_features_select
                return (self.avail_features >> shift) & 0xFFFFFFFF
            case Reg.QUEUE_NUM_MAX:
                return queue.max_size if queue is not None else 0
            case Reg.QUEUE_READY:
                return int(queue is not None and queue.ready)
            case Reg.INTERRUPT_STATUS:
                return self.interrupt_status
            case Reg.STATUS:
                return self.status
            case (
                Reg.SHM_LEN_LOW
                | Reg.SHM_LEN_HIGH
                | Reg.SHM_BASE_LOW
                | Reg.SHM_BASE_HIGH
            ):
                return 0xFFFFFFFF  # no shared memory regions
            case Reg.CONFIG_GENERATION:
                return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                if self.status & STATUS_DRIVER:
                    self.device.write_config(offset - CONFIG_OFFSET, data)
                return
            if len(data) != 4 or offset % 4:
                self._warn("%d-byte register write at %#x ignored", len(data), offset)
                return
            value = int.from_bytes(data, "little")
            if offset == Reg.QUEUE_NOTIFY:
                notify = True
            else:
                notify = False
                self._write_register(offset, value)
        if notify:
            # Outside the lock: processing inline takes it again.
            self._notify(value)

    def _write_register(self, offset: int, value: int) -> None:
        match offset:
            case Reg.DEVICE_FEATURES_SEL:
                self.device_features_select = value
            case Reg.DRIVER_FEATURES:
                self._set_driver_features(value)
            case Reg.DRIVER_FEATURES_SEL:
                self.driver_features_select = value
            case Reg.QUEUE_SEL:
                self.queue_select = value
            case Reg.INTERRUPT_ACK:
                self.interrupt_status &= ~value
            case Reg.STATUS:
                self._set_status(value)
            case Reg.SHM_SEL:
                pass
            case _:
                self._write_queue_register(offset, value)

    def _set_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK or not self.status & STATUS_DRIVER:
            self._warn("driver features written in status %#x; ignored", self.status)
            return
        if self.driver_features_select > 1:
            return
        shift = 32 * self.driver_features_select
        mask = 0xFFFFFFFF << shift
        self.acked_features = (self.acked_features & ~mask) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        allowed = self.status & STATUS_FEATURES_OK and not self.status & (
            STATUS_DRIVER_OK | STATUS_FAILED
        )
        if queue is None or not allowed:
            self._warn("queue register %#x written in status %#x", offset, self.status)
            return
        match offset:
            case Reg.QUEUE_NUM:
                queue.size = value
            case Reg.QUEUE_READY:
                queue.ready = value == 1
            case Reg.QUEUE_DESC_LOW | Reg.QUEUE_DESC_HIGH:
                queue.desc_table = _set_half(queue.desc_table, offset & 4, value)
            case Reg.QUEUE_DRIVER_LOW | Reg.QUEUE_DRIVER_HIGH:
                queue.avail_ring = _set_half(queue.avail_ring, offset & 4, value)
            case Reg.QUEUE_DEVICE_LOW | Reg.QUEUE_DEVICE_HIGH:
                queue.used_ring = _set_half(queue.used_ring, offset & 4, value)
            case _:
                self._warn("write to register %#x ignored", offset)

    def _selected_queue(self) -> Queue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_registers()
            return
        old = self.status
        if value & old != old & ~STATUS_DEVICE_NEEDS_RESET:
            self._warn("status %#x -> %#x clears bits; ignored", old, value)
            return
        new = value | (old & STATUS_DEVICE_NEEDS_RESET)
        accepting = new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK
        if accepting and not self._features_acceptable():
            new &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                self._warn("DRIVER_OK before FEATURES_OK; ignored")
                return
            self.status = new
            self._activate()
            return
        self.status = new

    def _features_acceptable(self) -> bool:
        unknown = self.acked_features & ~self.avail_features
        if unknown:
            self._warn("driver accepted unoffered features %#x", unknown)
            return False
        if not self.acked_features & (1 << VIRTIO_F_VERSION_1):
            self._warn("driver did not accept VIRTIO_F_VERSION_1 (legacy driver?)")
            return False
        return True

    def _activate(self) -> None:
        try:
            for queue in self.queues:
                if queue.ready:
                    queue.check(self.memory)
        except QueueConfigError as error:
            self._fail(f"activation: {error}")
            return
        self._apply_features()
        self.device.activate(self.acked_features)
        self.activated = True
        log.debug("virtio device type %d activated", self.device.device_type)

    def _apply_features(self) -> None:
        for queue in self.queues:
            queue.event_idx = bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX))
            queue.indirect = bool(
                self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC)
            )

    # --- queues (event-loop thread) ---------------------------------------------

    def process_queue(self, index: int) -> None:
        """Serve every chain available on queue `index`; never raises."""
        with self.lock:
            finished = self._serve_safely(index)
        if not finished:
            self._notify(index)  # more work: come back after the other devices

    def _serve_safely(self, index: int) -> bool:
        """Serve queue `index` within a budget; True unless work is left."""
        if not self.activated or self.broken or index >= len(self.queues):
            return True
        queue = self.queues[index]
        if not queue.ready:
            return True
        try:
            return self._serve(index, queue)
        except (VirtqueueError, GuestMemoryError) as error:
            self._fail(f"queue {index}: {error}")
        except Exception as error:  # a device bug must not stop the event loop
            log.exception("virtio device type %d failed", self.device.device_type)
            self._fail(f"queue {index}: monitor error: {error}")
        return True

    def _serve(self, index: int, queue: Queue) -> bool:
        budget = BATCH_PER_ENTRY * queue.size
        try:
            while budget:
                chain = queue.pop(self.memory)
                if chain is None:
                    if queue.enable_notification(self.memory):
                        continue
                    return True
                written = self.device.handle(index, chain, self.memory)
                queue.add_used(self.memory, chain.head, written)
                budget -= 1
            return False
        finally:
            if queue.needs_interrupt(self.memory):
                self._raise(INTERRUPT_USED_BUFFER)

    def drain(self) -> None:
        """Serve everything already available on every queue (before a
        snapshot, with the vCPUs paused, this leaves nothing in flight)."""
        with self.lock:
            for index in range(len(self.queues)):
                while not self._serve_safely(index):
                    pass

    def kick(self) -> None:
        """Look at every ready queue once (after a restore: a notification the
        old process never saw must not leave a request waiting forever), and
        re-raise an interrupt the driver has not acknowledged yet."""
        with self.lock:
            pending = self.interrupt_status
            ready = [i for i, q in enumerate(self.queues) if q.ready]
        if pending:
            self._interrupt()
        for index in ready:
            self._notify(index)

    # --- interrupts and failure -------------------------------------------------

    def _raise(self, cause: int) -> None:
        self.interrupt_status |= cause
        self.interrupt_count += 1
        self._interrupt()

    def config_changed(self) -> None:
        """Tell the driver the configuration space changed."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & STATUS_DRIVER_OK:
                self._raise(INTERRUPT_CONFIG_CHANGE)

    def _fail(self, reason: str) -> None:
        self.error_count += 1
        if self._log.allow():
            log.warning(
                "virtio device type %d needs a reset (%d errors): %s",
                self.device.device_type,
                self.error_count,
                reason,
            )
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._raise(INTERRUPT_CONFIG_CHANGE)

    def _warn(self, message: str, *args: object) -> None:
        if self._log.allow():
            log.warning(
                "virtio device type %d: " + message, self.device.device_type, *args
            )

    # --- state ------------------------------------------------------------------

    def save(self) -> VirtioMmioState:
        with self.lock:
            return VirtioMmioState(
                device_type=self.device.device_type,
                avail_features=self.avail_features,
                acked_features=self.acked_features,
                device_features_select=self.device_features_select,
                driver_features_select=self.driver_features_select,
                queue_select=self.queue_select,
                status=self.status,
                config_generation=self.config_generation,
                interrupt_status=self.interrupt_status,
                activated=self.activated,
                queues=[queue.save() for queue in self.queues],
            )

    def restore(self, state: VirtioMmioState) -> None:
        if state.device_type != self.device.device_type:
            raise VirtioRestoreError(
                f"saved device type {state.device_type}, this device is "
                f"{self.device.device_type}"
            )
        if state.acked_features & ~self.avail_features:
            raise VirtioRestoreError(
                f"the driver accepted features {state.acked_features:#x} this device "
                f"does not offer ({self.avail_features:#x})"
            )
        if len(state.queues) != len(self.queues):
            raise VirtioRestoreError(
                f"saved {len(state.queues)} queues, this device has {len(self.queues)}"
            )
        with self.lock:
            try:
                for queue, saved in zip(self.queues, state.queues, strict=True):
                    queue.restore(saved)
            except QueueConfigError as error:
                raise VirtioRestoreError(str(error)) from None
            self.acked_features = state.acked_features
            self.device_features_select = state.device_features_select
            self.driver_features_select = state.driver_features_select
            self.queue_select = state.queue_select
            self.status = state.status
            self.config_generation = state.config_generation
            self.interrupt_status = state.interrupt_status
            self.activated = state.activated
            self._apply_features()
            if self.activated:
                self.device.activate(self.acked_features)

    def queue_areas(self) -> list[tuple[int, int]]:
        """Guest ranges of every ready queue's rings."""
        with self.lock:
            if not self.activated:
                return []
            areas: list[tuple[int, int]] = []
            for queue in self.queues:
                if queue.ready:
                    areas.extend(queue.areas())
            return areas


def _set_half(address: int, high: int, value: int) -> GuestAddress:
    if high:
        return GuestAddress((address & 0xFFFFFFFF) | (value << 32))
    return GuestAddress((address & ~0xFFFFFFFF) | value)

"""Wiring a virtio-mmio device into a running VM.

A device's window goes on the MMIO bus (registers, read and written by vCPU
threads). Each queue gets an eventfd that KVM signals on a 4-byte write of the
queue's index to QueueNotify (an ioeventfd with a data match), so a notification
never leaves the kernel on the vCPU side; the device event loop wakes on it and
serves the queue. The interrupt line is an irqfd the caller provides.

`allocate_slots` takes windows and GSIs from the microVM's one
`ResourceAllocator`, which also places the ACPI devices, so the DSDT, the
`virtio_mmio.device=` entries and the devices agree by construction. Like
Firecracker's, windows start at the bottom of the 32-bit MMIO gap and GSIs at 5.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Generic, TypeVar

from ember.devices.mmio_bus import MmioBus
from ember.devices.virtio.mmio import (
    WINDOW_SIZE,
    MmioSlot,
    MmioTransport,
    Reg,
    VirtioDevice,
)
from ember.vmm.resources import ResourceAllocator, ResourceError

if TYPE_CHECKING:
    from ember.kvm.system import VmFd
    from ember.vmm.event_loop import EventLoop

log = logging.getLogger(__name__)

D = TypeVar("D", bound=VirtioDevice)


class SlotAllocationError(Exception):
    """No MMIO window or interrupt line is left for another device."""


def allocate_slots(count: int, resources: ResourceAllocator) -> list[MmioSlot]:
    """A window and an interrupt line for each of `count` virtio-mmio devices."""
    try:
        return [
            MmioSlot(
                base=resources.allocate_mmio(WINDOW_SIZE),
                size=WINDOW_SIZE,
                irq=resources.allocate_gsi(),
            )
            for _ in range(count)
        ]
    except ResourceError as error:
        raise SlotAllocationError(
            f"no room for {count} virtio devices: {error}"
        ) from None


class MmioAttachment(Generic[D]):
    """A device and its transport in the VM: bus window, queue eventfds."""

    def __init__(
        self,
        device: D,
        transport: MmioTransport,
        slot: MmioSlot,
        vm: VmFd,
        bus: MmioBus,
        loop: EventLoop,
    ) -> None:
        self.device = device
        self.transport = transport
        self.slot = slot
        self._vm = vm
        self._bus = bus
        self._loop = loop
        self._notify_fds: list[int] = []
        try:
            for index in range(len(transport.queues)):
                self._wire_queue(index)
            transport.route_notifications(self.notify)
            bus.register(slot.base, slot.size, transport)
        except BaseException:
            self.close()
            raise

    def _wire_queue(self, index: int) -> None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._notify_fds.append(fd)
        self._vm.ioeventfd(fd, self.slot.base + Reg.QUEUE_NOTIFY, 4, datamatch=index)

        def on_notify(events: int) -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
            self.transport.process_queue(index)

        self._loop.add(fd, on_notify)

    def notify(self, index: int) -> None:
        """Have the event loop serve queue `index` (any thread)."""
        if 0 <= index < len(self._notify_fds):
            os.eventfd_write(self._notify_fds[index], 1)

    def close(self) -> None:
        self._bus.unregister(self.slot.base)
        for index, fd in enumerate(self._notify_fds):
            self._loop.remove(fd)
            with contextlib.suppress(OSError, ValueError):
                self._vm.ioeventfd(
                    fd,
                    self.slot.base + Reg.QUEUE_NOTIFY,
                    4,
                    datamatch=index,
                    deassign=True,
                )
            os.close(fd)
        self._notify_fds = []

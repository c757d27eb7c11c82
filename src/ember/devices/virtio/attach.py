"""Wiring a virtio-mmio device into a running VM.

A device's window goes on the MMIO bus (registers, read and written by vCPU
threads). Each queue gets an eventfd that KVM signals on a 4-byte write of the
queue's index to QueueNotify (an ioeventfd with a data match), so a notification
never leaves the kernel on the vCPU side; the device event loop wakes on it and
serves the queue. The interrupt line is an irqfd the caller provides.

Until the shared resource allocator exists, `allocate_slots` hands out windows
from the start of the 32-bit MMIO gap and GSIs from 5 up, as Firecracker does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Generic, TypeVar

from ember.arch.x86_64 import layout
from ember.devices.mmio_bus import MmioBus
from ember.devices.virtio.mmio import (
    WINDOW_SIZE,
    MmioSlot,
    MmioTransport,
    Reg,
    VirtioDevice,
)

if TYPE_CHECKING:
    from ember.kvm.system import VmFd
    from ember.vmm.event_loop import EventLoop

log = logging.getLogger(__name__)

D = TypeVar("D", bound=VirtioDevice)

FIRST_GSI = 5
LAST_GSI = 23  # the IOAPIC has 24 pins


class SlotAllocationError(Exception):
    """No MMIO window or interrupt line is left for another device."""


def allocate_slots(count: int) -> list[MmioSlot]:
    # TODO: take windows and GSIs from the shared resource allocator (issue 5,
    # ACPI part) once it lands, so the DSDT and these agree by construction.
    if FIRST_GSI + count - 1 > LAST_GSI:
        raise SlotAllocationError(
            f"{count} virtio devices need GSIs {FIRST_GSI}..{FIRST_GSI + count - 1}; "
            f"the IOAPIC ends at {LAST_GSI}"
        )
    return [
        MmioSlot(
            base=layout.MMIO32_START + index * WINDOW_SIZE,
            size=WINDOW_SIZE,
            irq=FIRST_GSI + index,
        )
        for index in range(count)
    ]


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

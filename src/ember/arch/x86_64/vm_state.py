"""VM-wide KVM state on x86-64: the interrupt controllers, the PIT and kvmclock."""

from __future__ import annotations

import ctypes

import msgspec

from ember.kvm import structs as s
from ember.kvm.system import VmFd

KVM_CLOCK_REALTIME = 1 << 2


class VmStateError(Exception):
    """VM-wide state could not be put back into KVM."""


class KvmVmState(msgspec.Struct, frozen=True):
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes


def _raw(value: ctypes.Structure) -> bytes:
    return bytes(memoryview(value).cast("B"))


def _load(cls: type[ctypes.Structure], data: bytes, what: str) -> ctypes.Structure:
    if len(data) != ctypes.sizeof(cls):
        raise VmStateError(
            f"saved {what} holds {len(data)} bytes, KVM expects {ctypes.sizeof(cls)}"
        )
    return cls.from_buffer_copy(data)


def save_vm(vm: VmFd) -> KvmVmState:
    return KvmVmState(
        pic_master=_raw(vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=_raw(vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=_raw(vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)),
        pit=_raw(vm.get_pit2()),
        clock=_raw(vm.get_clock()),
    )


def restore_vm(vm: VmFd, state: KvmVmState, clock_realtime: bool = False) -> None:
    """PIT, then kvmclock, then the interrupt controllers.

    The clock goes back with flags 0 by default: guest monotonic time resumes where
    it stopped. With `clock_realtime`, KVM advances it by the wall time that passed.
    """
    vm.set_pit2(_load(s.KvmPitState2, state.pit, "PIT state"))  # type: ignore[arg-type]
    saved_clock = _load(s.KvmClockData, state.clock, "kvmclock")
    clock = s.KvmClockData()
    clock.clock = saved_clock.clock
    if clock_realtime:
        if not saved_clock.flags & KVM_CLOCK_REALTIME:
            raise VmStateError(
                "clock_realtime asked, but the snapshot's clock has no "
                "realtime reference"
            )
        clock.flags = KVM_CLOCK_REALTIME
        clock.realtime = saved_clock.realtime
    vm.set_clock(clock)
    for data, what in (
        (state.pic_master, "PIC master"),
        (state.pic_slave, "PIC slave"),
        (state.ioapic, "IOAPIC"),
    ):
        vm.set_irqchip(_load(s.KvmIrqchip, data, what))  # type: ignore[arg-type]

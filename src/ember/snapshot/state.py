"""The typed state of a whole microVM, composed from each part's own state.

Names follow Firecracker's (`MicrovmState`, `VmInfo`, ...) so people who know one
can read the other, but the encoding is Ember's own (MessagePack via msgspec).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ember.arch.x86_64.vcpu_state import VcpuState
from ember.arch.x86_64.vm_state import KvmVmState
from ember.devices.acpi.vmclock import VmClockState
from ember.devices.acpi.vmgenid import VmGenIdState
from ember.devices.legacy.i8042 import I8042State
from ember.devices.legacy.serial import SerialState
from ember.devices.virtio.block import BlockState


class BootSourceInfo(msgspec.Struct, frozen=True):
    kernel_image_path: str
    boot_args: str
    initrd_path: str | None = None


class VmInfo(msgspec.Struct, frozen=True):
    mem_size_mib: int
    smt: bool = False
    cpu_template: str = "None"
    boot_source: BootSourceInfo | None = None
    huge_pages: Literal["None", "2M", "Transparent"] = "None"
    nested_virtualization: bool = False


class KvmState(msgspec.Struct, frozen=True):
    """KVM capabilities the snapshot relies on beyond the defaults (none yet)."""

    kvm_cap_modifiers: list[int] = []


class MemoryRegionState(msgspec.Struct, frozen=True):
    base_address: int
    size: int
    region_type: Literal["Dram", "Hotplug"] = "Dram"
    slot_count: int = 1
    plugged: list[bool] = msgspec.field(default_factory=lambda: [True])


class VmState(msgspec.Struct, frozen=True):
    memory: list[MemoryRegionState]
    kvm: KvmVmState


class DevicesState(msgspec.Struct, frozen=True):
    serial: SerialState
    i8042: I8042State
    # Added with virtio; older state files have none.
    block: list[BlockState] = []
    # Added with ACPI; a guest restored from an older file gets neither.
    vmgenid: VmGenIdState | None = None
    vmclock: VmClockState | None = None


class MicrovmState(msgspec.Struct, frozen=True):
    vm_info: VmInfo
    kvm_state: KvmState
    vm_state: VmState
    vcpu_states: list[VcpuState]
    device_states: DevicesState

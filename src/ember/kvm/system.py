"""Thin wrappers over /dev/kvm, a VM descriptor and a vCPU descriptor.

Each method is named after the ioctl it issues and does nothing else; policy (what
to put in CPUID, which MSRs to save) lives in `ember.arch` and `ember.vmm`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import TypeVar

from ember.kvm import ioctls as nr
from ember.kvm import structs as s
from ember.kvm.fd import FdHolder, KvmError

KVM_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256
MAX_MSR_INDICES = 1024

T = TypeVar("T", bound=ctypes.Structure)


class KvmUnavailableError(Exception):
    """/dev/kvm cannot be opened or speaks an unexpected API version."""


class Kvm(FdHolder):
    """The /dev/kvm system descriptor."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise KvmUnavailableError(
                f"cannot open {path}: {error.strerror}"
            ) from error
        super().__init__(fd, "/dev/kvm")
        version = self.ioctl("KVM_GET_API_VERSION", nr.KVM_GET_API_VERSION)
        if version != nr.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"{path} speaks KVM API {version}, not 12")

    def check_extension(self, capability: int) -> int:
        return self.ioctl("KVM_CHECK_EXTENSION", nr.KVM_CHECK_EXTENSION, capability)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl("KVM_GET_VCPU_MMAP_SIZE", nr.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[s.KvmCpuidEntry2]:
        cpuid = s.cpuid2_struct(MAX_CPUID_ENTRIES)()
        cpuid.nent = MAX_CPUID_ENTRIES
        self.ioctl("KVM_GET_SUPPORTED_CPUID", nr.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [_copy_entry(cpuid.entries[i]) for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        return self._msr_list("KVM_GET_MSR_INDEX_LIST", nr.KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list(
            "KVM_GET_MSR_FEATURE_INDEX_LIST", nr.KVM_GET_MSR_FEATURE_INDEX_LIST
        )

    def _msr_list(self, name: str, request: int) -> list[int]:
        msr_list = s.msr_list_struct(MAX_MSR_INDICES)()
        msr_list.nmsrs = MAX_MSR_INDICES
        self.ioctl(name, request, msr_list)
        return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def create_vm(self) -> VmFd:
        fd = self.ioctl("KVM_CREATE_VM", nr.KVM_CREATE_VM, 0)
        return VmFd(fd, self.vcpu_mmap_size())


def _copy_entry(entry: s.KvmCpuidEntry2) -> s.KvmCpuidEntry2:
    copy = s.KvmCpuidEntry2()
    ctypes.pointer(copy)[0] = entry
    return copy


class VmFd(FdHolder):
    """A KVM virtual machine."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd, "VM")
        self._vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, capability: int) -> int:
        return self.ioctl("KVM_CHECK_EXTENSION", nr.KVM_CHECK_EXTENSION, capability)

    def set_tss_address(self, address: int) -> None:
        self.ioctl("KVM_SET_TSS_ADDR", nr.KVM_SET_TSS_ADDR, address)

    def create_irqchip(self) -> None:
        self.ioctl("KVM_CREATE_IRQCHIP", nr.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = s.KVM_PIT_SPEAKER_DUMMY) -> None:
        config = s.KvmPitConfig(flags=flags)
        self.ioctl("KVM_CREATE_PIT2", nr.KVM_CREATE_PIT2, config)

    def set_user_memory_region(
        self, slot: int, guest_address: int, size: int, host_address: int, flags: int
    ) -> None:
        region = s.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_address,
            memory_size=size,
            userspace_addr=host_address,
        )
        self.ioctl("KVM_SET_USER_MEMORY_REGION", nr.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array[ctypes.c_uint64]) -> None:
        """Fill `bitmap` (one bit per 4 KiB page) and clear KVM's copy."""
        log = s.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self.ioctl("KVM_GET_DIRTY_LOG", nr.KVM_GET_DIRTY_LOG, log)

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        flags = s.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        request = s.KvmIrqfd(fd=eventfd, gsi=gsi, flags=flags)
        self.ioctl("KVM_IRQFD", nr.KVM_IRQFD, request)

    def ioeventfd(
        self,
        eventfd: int,
        address: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        flags = 0
        if datamatch is not None:
            flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= s.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = s.KvmIoeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags
        )
        self.ioctl("KVM_IOEVENTFD", nr.KVM_IOEVENTFD, request)

    def irq_line(self, irq: int, level: int) -> None:
        self.ioctl("KVM_IRQ_LINE", nr.KVM_IRQ_LINE, s.KvmIrqLevel(irq=irq, level=level))

    def get_irqchip(self, chip_id: int) -> s.KvmIrqchip:
        chip = s.KvmIrqchip(chip_id=chip_id)
        self.ioctl("KVM_GET_IRQCHIP", nr.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.KvmIrqchip) -> None:
        self.ioctl("KVM_SET_IRQCHIP", nr.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.KvmPitState2:
        pit = s.KvmPitState2()
        self.ioctl("KVM_GET_PIT2", nr.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: s.KvmPitState2) -> None:
        self.ioctl("KVM_SET_PIT2", nr.KVM_SET_PIT2, pit)

    def get_clock(self) -> s.KvmClockData:
        clock = s.KvmClockData()
        self.ioctl("KVM_GET_CLOCK", nr.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: s.KvmClockData) -> None:
        self.ioctl("KVM_SET_CLOCK", nr.KVM_SET_CLOCK, clock)

    def create_vcpu(self, index: int) -> VcpuFd:
        fd = self.ioctl("KVM_CREATE_VCPU", nr.KVM_CREATE_VCPU, index)
        return VcpuFd(fd, index, self._vcpu_mmap_size)


class VcpuFd(FdHolder):
    """A KVM vCPU and its shared kvm_run page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd, f"vCPU {index}")
        self.index = index
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED)
        # SAFETY: kvm_run lives at offset 0 of the vCPU mapping, which stays mapped
        # until close() drops this view first.
        self.kvm_run: s.KvmRun | None = s.KvmRun.from_buffer(self.run_mmap)

    def close(self) -> None:
        self.kvm_run = None
        if not self.run_mmap.closed:
            self.run_mmap.close()
        super().close()

    def run(self) -> int:
        """Enter the guest; returns 0, or -errno (EINTR means kicked)."""
        from ember.kvm.fd import raw_ioctl

        return raw_ioctl(self.fileno(), nr.KVM_RUN, None)

    def _get(self, name: str, request: int, value: T) -> T:
        self.ioctl(name, request, value)
        return value

    def get_regs(self) -> s.KvmRegs:
        return self._get("KVM_GET_REGS", nr.KVM_GET_REGS, s.KvmRegs())

    def set_regs(self, regs: s.KvmRegs) -> None:
        self.ioctl("KVM_SET_REGS", nr.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        return self._get("KVM_GET_SREGS", nr.KVM_GET_SREGS, s.KvmSregs())

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self.ioctl("KVM_SET_SREGS", nr.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.KvmFpu:
        return self._get("KVM_GET_FPU", nr.KVM_GET_FPU, s.KvmFpu())

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        self.ioctl("KVM_SET_FPU", nr.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int = ctypes.sizeof(s.KvmXsave)) -> bytes:
        """XSAVE area; `size` beyond 4 KiB uses KVM_GET_XSAVE2."""
        buffer = (ctypes.c_uint8 * max(size, ctypes.sizeof(s.KvmXsave)))()
        if size > ctypes.sizeof(s.KvmXsave):
            self.ioctl("KVM_GET_XSAVE2", _sized(nr.KVM_GET_XSAVE2, size), buffer)
        else:
            self.ioctl("KVM_GET_XSAVE", nr.KVM_GET_XSAVE, buffer)
        return bytes(buffer)

    def set_xsave(self, data: bytes) -> None:
        buffer = (ctypes.c_uint8 * max(len(data), 4096)).from_buffer_copy(
            data.ljust(4096, b"\0")
        )
        self.ioctl("KVM_SET_XSAVE", nr.KVM_SET_XSAVE, buffer)

    def get_xcrs(self) -> s.KvmXcrs:
        return self._get("KVM_GET_XCRS", nr.KVM_GET_XCRS, s.KvmXcrs())

    def set_xcrs(self, xcrs: s.KvmXcrs) -> None:
        self.ioctl("KVM_SET_XCRS", nr.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> s.KvmDebugregs:
        return self._get("KVM_GET_DEBUGREGS", nr.KVM_GET_DEBUGREGS, s.KvmDebugregs())

    def set_debugregs(self, regs: s.KvmDebugregs) -> None:
        self.ioctl("KVM_SET_DEBUGREGS", nr.KVM_SET_DEBUGREGS, regs)

    def get_lapic(self) -> s.KvmLapicState:
        return self._get("KVM_GET_LAPIC", nr.KVM_GET_LAPIC, s.KvmLapicState())

    def set_lapic(self, lapic: s.KvmLapicState) -> None:
        self.ioctl("KVM_SET_LAPIC", nr.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        state = self._get("KVM_GET_MP_STATE", nr.KVM_GET_MP_STATE, s.KvmMpState())
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        self.ioctl("KVM_SET_MP_STATE", nr.KVM_SET_MP_STATE, s.KvmMpState(mp_state))

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        events = s.KvmVcpuEvents()
        return self._get("KVM_GET_VCPU_EVENTS", nr.KVM_GET_VCPU_EVENTS, events)

    def set_vcpu_events(self, events: s.KvmVcpuEvents) -> None:
        self.ioctl("KVM_SET_VCPU_EVENTS", nr.KVM_SET_VCPU_EVENTS, events)

    def get_cpuid2(self) -> list[s.KvmCpuidEntry2]:
        cpuid = s.cpuid2_struct(MAX_CPUID_ENTRIES)()
        cpuid.nent = MAX_CPUID_ENTRIES
        self.ioctl("KVM_GET_CPUID2", nr.KVM_GET_CPUID2, cpuid)
        return [_copy_entry(cpuid.entries[i]) for i in range(cpuid.nent)]

    def set_cpuid2(self, entries: list[s.KvmCpuidEntry2]) -> None:
        cpuid = s.cpuid2_struct(len(entries))()
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        self.ioctl("KVM_SET_CPUID2", nr.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first it cannot read, so the result may be
        shorter than `indices`."""
        msrs = s.msrs_struct(len(indices))()
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        count = self.ioctl("KVM_GET_MSRS", nr.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first refusal)."""
        msrs = s.msrs_struct(len(values))()
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return self.ioctl("KVM_SET_MSRS", nr.KVM_SET_MSRS, msrs)

    def get_tsc_khz(self) -> int:
        return self.ioctl("KVM_GET_TSC_KHZ", nr.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        self.ioctl("KVM_SET_TSC_KHZ", nr.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        self.ioctl("KVM_KVMCLOCK_CTRL", nr.KVM_KVMCLOCK_CTRL)


def _sized(request: int, size: int) -> int:
    """Re-encode an ioctl number with a different argument size (KVM_GET_XSAVE2)."""
    return (request & ~(0x3FFF << 16)) | (size << 16)


__all__ = ["Kvm", "KvmError", "KvmUnavailableError", "VcpuFd", "VmFd"]

"""Saving and restoring one x86-64 vCPU, in the order KVM needs.

Save: MP state first (reading it can flush pending LAPIC events into the LAPIC
state read later), then registers, FPU/vector state, LAPIC, TSC frequency, CPUID,
MSRs, and vCPU events last. Restore goes the other way round where it matters:
CPUID before anything that depends on features, LAPIC before the MSRs (the
TSC-deadline MSR is only writable once the LAPIC is in deadline mode), TSC before
TSC_DEADLINE, and events last so a pending exception is not lost to a register
write.

KVM structures without a monitor-side meaning (XSAVE area, LAPIC page, debug
registers, events) are kept as the kernel's own bytes: their layout is the stable
uapi, checked by `tests/test_kvm_layout.py`.
"""

from __future__ import annotations

import ctypes
import logging

import msgspec

from ember.arch.x86_64.cpuid import vendor_string
from ember.arch.x86_64.msrs import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE
from ember.kvm import structs as s
from ember.kvm.system import VcpuFd

log = logging.getLogger(__name__)

# Saved but never restored: reading them is fine, writing is refused or harmful.
MSRS_NOT_RESTORED = frozenset({0x17B})  # IA32_MCG_CTL
# Restored in a second pass, after IA32_TSC, so the deadline is relative to it.
DEFERRED_MSRS = (MSR_IA32_TSC_DEADLINE,)


class CpuidEntry(msgspec.Struct, frozen=True, array_like=True):
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def saved_cpu_vendor(cpuid: list[CpuidEntry]) -> bytes:
    """The vendor string recorded in a saved CPUID table (leaf 0)."""
    for entry in cpuid:
        if entry.function == 0:
            return vendor_string(entry.ebx, entry.ecx, entry.edx)
    return b""


class VcpuState(msgspec.Struct, frozen=True):
    """Everything KVM needs to bring one vCPU back exactly where it was."""

    index: int
    cpuid: list[CpuidEntry]
    msrs: dict[int, int]
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    vcpu_events: bytes
    mp_state: int
    tsc_khz: int | None


class VcpuRestoreError(Exception):
    """A vCPU's state could not be put back into KVM."""


def _raw(value: ctypes.Structure) -> bytes:
    return bytes(memoryview(value).cast("B"))


def _struct_from_bytes(
    cls: type[ctypes.Structure], data: bytes, what: str
) -> ctypes.Structure:
    if len(data) != ctypes.sizeof(cls):
        raise VcpuRestoreError(
            f"{what} holds {len(data)} bytes, KVM expects {ctypes.sizeof(cls)}"
        )
    return cls.from_buffer_copy(data)


def save_vcpu(fd: VcpuFd, msr_indices: list[int], xsave_size: int) -> VcpuState:
    mp_state = fd.get_mp_state()
    regs = _raw(fd.get_regs())
    sregs = _raw(fd.get_sregs())
    xsave = fd.get_xsave(xsave_size)
    xcrs = _raw(fd.get_xcrs())
    debugregs = _raw(fd.get_debugregs())
    lapic = _raw(fd.get_lapic())
    try:
        tsc_khz: int | None = fd.get_tsc_khz()
    except OSError:
        log.warning(
            "vCPU %d: TSC frequency unknown; restore on another CPU model "
            "may misbehave",
            fd.index,
        )
        tsc_khz = None
    cpuid = [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in fd.get_cpuid2()
    ]
    msrs = _read_msrs(fd, msr_indices)
    events = _raw(fd.get_vcpu_events())
    return VcpuState(
        index=fd.index,
        cpuid=cpuid,
        msrs=msrs,
        regs=regs,
        sregs=sregs,
        xsave=xsave,
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=lapic,
        vcpu_events=events,
        mp_state=mp_state,
        tsc_khz=tsc_khz,
    )


def _read_msrs(fd: VcpuFd, indices: list[int]) -> dict[int, int]:
    """Read every MSR KVM lists; KVM stops at the first unreadable one, so skip
    it and carry on rather than lose the rest."""
    values: dict[int, int] = {}
    remaining = list(indices)
    while remaining:
        got = fd.get_msrs(remaining)
        values.update(got)
        consumed = len(got)
        if consumed < len(remaining):
            log.debug(
                "vCPU %d: MSR %#x unreadable, skipped", fd.index, remaining[consumed]
            )
            consumed += 1
        remaining = remaining[consumed:]
    return values


def restore_vcpu(fd: VcpuFd, state: VcpuState) -> None:
    entries = []
    for item in state.cpuid:
        entry = s.KvmCpuidEntry2()
        entry.function, entry.index, entry.flags = item.function, item.index, item.flags
        entry.eax, entry.ebx, entry.ecx, entry.edx = (
            item.eax,
            item.ebx,
            item.ecx,
            item.edx,
        )
        entries.append(entry)
    fd.set_cpuid2(entries)
    fd.set_mp_state(state.mp_state)
    fd.set_regs(_struct_from_bytes(s.KvmRegs, state.regs, "regs"))  # type: ignore[arg-type]
    fd.set_sregs(_struct_from_bytes(s.KvmSregs, state.sregs, "sregs"))  # type: ignore[arg-type]
    fd.set_xsave(state.xsave)
    fd.set_xcrs(_struct_from_bytes(s.KvmXcrs, state.xcrs, "xcrs"))  # type: ignore[arg-type]
    fd.set_debugregs(
        _struct_from_bytes(s.KvmDebugregs, state.debugregs, "debugregs")  # type: ignore[arg-type]
    )
    fd.set_lapic(_struct_from_bytes(s.KvmLapicState, state.lapic, "lapic"))  # type: ignore[arg-type]
    _restore_msrs(fd, state.msrs)
    fd.set_vcpu_events(
        _struct_from_bytes(s.KvmVcpuEvents, state.vcpu_events, "vcpu events")  # type: ignore[arg-type]
    )


def _restore_msrs(fd: VcpuFd, msrs: dict[int, int]) -> None:
    first = {
        index: value
        for index, value in msrs.items()
        if index not in MSRS_NOT_RESTORED and index not in DEFERRED_MSRS
    }
    deferred = {index: msrs[index] for index in DEFERRED_MSRS if index in msrs}
    if deferred.get(MSR_IA32_TSC_DEADLINE) == 0 and MSR_IA32_TSC in msrs:
        # A zero deadline means "no timer armed", but a guest that armed one just
        # before the snapshot would then wait forever; firing once is harmless.
        deferred[MSR_IA32_TSC_DEADLINE] = msrs[MSR_IA32_TSC]
    for batch in (first, deferred):
        if not batch:
            continue
        accepted = fd.set_msrs(batch)
        if accepted != len(batch):
            refused = list(batch)[accepted]
            raise VcpuRestoreError(
                f"vCPU {fd.index}: KVM accepted {accepted} of {len(batch)} MSRs "
                f"(refused {refused:#x})"
            )

"""CPUID for a guest: KVM's supported list, normalized for one vCPU of N.

KVM reports what the host can virtualize; the guest must also see a consistent
topology (its own APIC id, N logical processors in one package, no SMT), the
hypervisor bit, and no features Ember does not model (performance counters).
"""

from __future__ import annotations

import ctypes

from ember.kvm.structs import KvmCpuidEntry2

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX: more than one logical processor per package
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

INTEL = b"GenuineIntel"
AMD = b"AuthenticAMD"


def vendor_string(ebx: int, ecx: int, edx: int) -> bytes:
    """The 12-byte vendor string CPUID leaf 0 spells out in EBX, EDX, ECX."""
    return b"".join(value.to_bytes(4, "little") for value in (ebx, edx, ecx))


def vendor(entries: list[KvmCpuidEntry2]) -> bytes:
    """The vendor string of a KVM CPUID table's leaf 0."""
    for entry in entries:
        if entry.function == 0:
            return vendor_string(entry.ebx, entry.ecx, entry.edx)
    return b""


def _bits_for(count: int) -> int:
    """Width of an APIC-id field that can number `count` items."""
    return max(0, (count - 1).bit_length())


def _copy(entry: KvmCpuidEntry2) -> KvmCpuidEntry2:
    copy = KvmCpuidEntry2()
    ctypes.pointer(copy)[0] = entry
    return copy


def normalize_cpuid(
    supported: list[KvmCpuidEntry2], vcpu_index: int, vcpu_count: int
) -> list[KvmCpuidEntry2]:
    """The CPUID table for vCPU `vcpu_index` of `vcpu_count`."""
    is_amd = vendor(supported) == AMD
    entries = [_copy(entry) for entry in supported]
    for entry in entries:
        leaf = entry.function
        if leaf == 0x1:
            _leaf_1(entry, vcpu_index, vcpu_count)
        elif leaf == 0x4 and not is_amd:
            _leaf_4(entry, vcpu_count)
        elif leaf == 0x6:
            entry.ecx &= ~(1 << 3)  # no energy-performance bias MSR
        elif leaf == 0xA:
            entry.eax = entry.ebx = entry.ecx = entry.edx = 0  # no PMU
        elif leaf in (0xB, 0x1F):
            _extended_topology(entry, vcpu_index, vcpu_count)
        elif leaf == 0x80000008 and is_amd:
            entry.ecx = (entry.ecx & ~0xFF) | (vcpu_count - 1)
    return entries


def _leaf_1(entry: KvmCpuidEntry2, vcpu_index: int, vcpu_count: int) -> None:
    # EBX: [31:24] initial APIC id, [23:16] logical processors per package,
    # [15:8] CLFLUSH line size in qwords.
    entry.ebx = (vcpu_index << 24) | (vcpu_count << 16) | (8 << 8)
    entry.ecx |= HYPERVISOR_BIT
    if vcpu_count > 1:
        entry.edx |= HTT_BIT
    else:
        entry.edx &= ~HTT_BIT


def _leaf_4(entry: KvmCpuidEntry2, vcpu_count: int) -> None:
    # EAX[31:26] = cores per package - 1; [25:14] = threads sharing this cache - 1.
    cache_level = (entry.eax >> 5) & 0x7
    eax = entry.eax & 0x3FFF
    eax |= (vcpu_count - 1) << 26
    if cache_level == 3:
        eax |= (vcpu_count - 1) << 14
    entry.eax = eax


def _extended_topology(entry: KvmCpuidEntry2, vcpu_index: int, vcpu_count: int) -> None:
    # One thread per core, every core in one package.
    entry.edx = vcpu_index
    if entry.index == 0:  # SMT level
        entry.eax = 0
        entry.ebx = 1
        entry.ecx = (1 << 8) | 0
    elif entry.index == 1:  # core level
        entry.eax = _bits_for(vcpu_count)
        entry.ebx = vcpu_count
        entry.ecx = (2 << 8) | 1
    else:
        entry.eax = entry.ebx = 0
        entry.ecx = entry.index

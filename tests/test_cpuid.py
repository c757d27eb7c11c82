"""CPUID normalization for one vCPU of N (no KVM needed)."""

from __future__ import annotations

from ember.arch.x86_64.cpuid import (
    HTT_BIT,
    HYPERVISOR_BIT,
    normalize_cpuid,
    vendor,
)
from ember.kvm.structs import KvmCpuidEntry2


def entry(function: int, index: int = 0, **registers: int) -> KvmCpuidEntry2:
    value = KvmCpuidEntry2(function=function, index=index)
    for name, register in registers.items():
        setattr(value, name, register)
    return value


def intel_leaves() -> list[KvmCpuidEntry2]:
    name = b"GenuineIntel"
    ebx, edx, ecx = (int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))
    return [
        entry(0, eax=0x1F, ebx=ebx, ecx=ecx, edx=edx),
        entry(1, ebx=0xFF00_0800, ecx=1 << 24, edx=0),
        entry(4, 0, eax=(1 << 5) | 0x1),  # L1 data cache
        entry(4, 3, eax=(3 << 5) | 0x3),  # L3 unified cache
        entry(0xA, eax=0x07300805),
        entry(0xB, 0),
        entry(0xB, 1),
        entry(0x40000000, eax=0x40000001),
    ]


def by_leaf(
    entries: list[KvmCpuidEntry2], function: int, index: int = 0
) -> KvmCpuidEntry2:
    return next(e for e in entries if e.function == function and e.index == index)


def test_vendor_string() -> None:
    assert vendor(intel_leaves()) == b"GenuineIntel"


def test_leaf_1_carries_apic_id_count_and_hypervisor_bit() -> None:
    for index in (0, 5):
        leaf = by_leaf(normalize_cpuid(intel_leaves(), index, 8), 1)
        assert leaf.ebx >> 24 == index
        assert (leaf.ebx >> 16) & 0xFF == 8
        assert leaf.ecx & HYPERVISOR_BIT
        assert leaf.ecx & (1 << 24)  # TSC deadline kept
        assert leaf.edx & HTT_BIT


def test_single_vcpu_has_no_htt() -> None:
    leaf = by_leaf(normalize_cpuid(intel_leaves(), 0, 1), 1)
    assert not leaf.edx & HTT_BIT


def test_extended_topology_one_thread_per_core() -> None:
    entries = normalize_cpuid(intel_leaves(), 3, 6)
    smt, core = by_leaf(entries, 0xB, 0), by_leaf(entries, 0xB, 1)
    assert (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xFF) == (0, 1, 1)
    assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF) == (3, 6, 2)
    assert smt.edx == core.edx == 3  # x2APIC id


def test_cache_leaf_core_counts_and_no_pmu() -> None:
    entries = normalize_cpuid(intel_leaves(), 0, 4)
    assert by_leaf(entries, 4, 0).eax >> 26 == 3
    assert (by_leaf(entries, 4, 3).eax >> 14) & 0xFFF == 3
    assert by_leaf(entries, 0xA).eax == 0


def test_input_is_not_modified() -> None:
    supported = intel_leaves()
    normalize_cpuid(supported, 1, 2)
    assert by_leaf(supported, 1).ebx == 0xFF00_0800
    assert by_leaf(normalize_cpuid(supported, 1, 2), 0x40000000).eax == 0x40000001

"""The Intel MultiProcessor table (MP spec 1.4) that tells a guest about its CPUs.

Linux looks for the floating pointer structure in the last KiB of base memory
(639 KiB, which is EBDA_START); the configuration table follows it directly. The
table describes one processor per vCPU, an ISA bus, one I/O APIC with ISA IRQs
0-15 wired to pins 0-15 (as KVM's in-kernel I/O APIC routes them), and the
virtual-wire setup of each local APIC: ExtINT on LINT0, NMI on LINT1.
"""

from __future__ import annotations

import struct

from ember.arch.x86_64.layout import (
    EBDA_START,
    IOAPIC_START,
    LAPIC_START,
    MAX_VCPUS,
)
from ember.memory import GuestAddress, GuestMemory, OutOfBoundsError

# Floating pointer: "_MP_", config table address, length in 16-byte units, spec
# revision, checksum, five feature bytes (all zero: a config table is present
# and the machine uses virtual wire mode, no IMCR).
_FLOATING_POINTER = struct.Struct("<4sIBBB5s")
# Config table header: "PCMP", base table length, spec revision, checksum, OEM
# id, product id, OEM table pointer and size, entry count, local APIC address,
# extended table length and checksum, reserved.
_CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
# Entry type 0: type, local APIC id, APIC version, flags, CPU signature, CPU
# feature flags, 8 reserved bytes.
_PROCESSOR_ENTRY = struct.Struct("<BBBBII8s")
# Entry type 1: type, bus id, bus type string (6 bytes, space padded).
_BUS_ENTRY = struct.Struct("<BB6s")
# Entry type 2: type, I/O APIC id, version, flags, address.
_IOAPIC_ENTRY = struct.Struct("<BBBBI")
# Entry types 3 and 4: type, interrupt type, flags, source bus id, source bus
# IRQ, destination APIC id, destination pin (I/O APIC INTIN or local LINTIN).
_INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")

_SPEC_REVISION = 4  # MP spec 1.4
_OEM_ID = b"EMBER".ljust(8)
_PRODUCT_ID = b"MICROVM".ljust(12)

_PROCESSOR, _BUS, _IOAPIC, _IO_INTERRUPT, _LOCAL_INTERRUPT = range(5)
_CPU_ENABLED = 1 << 0
_CPU_BOOTSTRAP = 1 << 1
_IOAPIC_ENABLED = 1 << 0
_LOCAL_APIC_VERSION = 0x14  # integrated xAPIC, as KVM reports it
_IOAPIC_VERSION = 0x11
_INT, _NMI, _SMI, _EXTINT = range(4)  # interrupt types
_CONFORMS_TO_BUS = 0  # polarity and trigger mode follow the bus (ISA: edge, high)
_ISA_BUS_ID = 0
_ISA_IRQS = 16
_ALL_LOCAL_APICS = 0xFF

# Family 6, with the FPU and an on-chip APIC: enough for a guest that only reads
# the table to count CPUs; the real identity comes from CPUID.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_CPU_FEATURES = (1 << 0) | (1 << 9)

# Everything must stay in base memory, below the VGA hole at 640 KiB.
_BASE_MEMORY_END = 0xA0000


class MpTableError(Exception):
    """The MP table could not be written."""


class VcpuCountError(MpTableError):
    """The vCPU count is outside what the MP table (and Ember) supports."""


class MpTableDoesNotFitError(MpTableError):
    """Guest memory does not hold the MP table's place in base memory."""


def check_vcpu_count(vcpu_count: int) -> None:
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise VcpuCountError(
            f"mptable: {vcpu_count} vCPUs requested, supported are 1 to {MAX_VCPUS}"
        )


def write_mptable(
    memory: GuestMemory,
    vcpu_count: int,
    *,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    cpu_features: int = DEFAULT_CPU_FEATURES,
) -> GuestAddress:
    """Write the MP table at EBDA_START; returns the floating pointer's address."""
    table = build_mptable(vcpu_count, cpu_signature, cpu_features)
    try:
        memory.write(EBDA_START, table)
    except OutOfBoundsError:
        raise MpTableDoesNotFitError(
            f"mptable: guest memory does not cover {EBDA_START:#x}-"
            f"{EBDA_START + len(table):#x}, where the MP table goes"
        ) from None
    return EBDA_START


def build_mptable(
    vcpu_count: int,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    cpu_features: int = DEFAULT_CPU_FEATURES,
) -> bytes:
    """The floating pointer followed by the configuration table, as bytes."""
    check_vcpu_count(vcpu_count)
    entries = _entries(vcpu_count, cpu_signature, cpu_features)
    config_address = EBDA_START + _FLOATING_POINTER.size
    config = _config_table(entries)
    if config_address + len(config) > _BASE_MEMORY_END:
        raise MpTableDoesNotFitError(
            f"mptable: {len(config)}-byte table at {config_address:#x} would run "
            f"past {_BASE_MEMORY_END:#x}"
        )
    return _floating_pointer(config_address) + config


def _floating_pointer(config_address: int) -> bytes:
    unsummed = _FLOATING_POINTER.pack(
        b"_MP_", config_address, 1, _SPEC_REVISION, 0, bytes(5)
    )
    return _with_checksum(unsummed, checksum_offset=10)


def _config_table(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    unsummed = _CONFIG_HEADER.pack(
        b"PCMP",
        _CONFIG_HEADER.size + len(body),
        _SPEC_REVISION,
        0,  # checksum, filled in below
        _OEM_ID,
        _PRODUCT_ID,
        0,  # no OEM table
        0,
        len(entries),
        LAPIC_START,
        0,  # no extended table
        0,
        0,
    )
    return _with_checksum(unsummed + body, checksum_offset=7)


def _entries(vcpu_count: int, cpu_signature: int, cpu_features: int) -> list[bytes]:
    ioapic_id = vcpu_count  # the first APIC id after the vCPUs' 0..n-1
    entries = [
        _processor_entry(index, cpu_signature, cpu_features)
        for index in range(vcpu_count)
    ]
    entries.append(_BUS_ENTRY.pack(_BUS, _ISA_BUS_ID, b"ISA".ljust(6)))
    entries.append(
        _IOAPIC_ENTRY.pack(
            _IOAPIC, ioapic_id, _IOAPIC_VERSION, _IOAPIC_ENABLED, IOAPIC_START
        )
    )
    entries.extend(_interrupt_entries(ioapic_id))
    return entries


def _interrupt_entries(ioapic_id: int) -> list[bytes]:
    def entry(kind: int, interrupt_type: int, irq: int, apic: int, pin: int) -> bytes:
        return _INTERRUPT_ENTRY.pack(
            kind, interrupt_type, _CONFORMS_TO_BUS, _ISA_BUS_ID, irq, apic, pin
        )

    entries = [
        entry(_IO_INTERRUPT, _INT, irq, ioapic_id, irq) for irq in range(_ISA_IRQS)
    ]
    # Virtual wire: the PIC's output reaches the bootstrap CPU's LINT0, and NMIs
    # reach every CPU through LINT1.
    entries.append(entry(_LOCAL_INTERRUPT, _EXTINT, 0, 0, 0))
    entries.append(entry(_LOCAL_INTERRUPT, _NMI, 0, _ALL_LOCAL_APICS, 1))
    return entries


def _processor_entry(apic_id: int, cpu_signature: int, cpu_features: int) -> bytes:
    flags = _CPU_ENABLED | (_CPU_BOOTSTRAP if apic_id == 0 else 0)
    return _PROCESSOR_ENTRY.pack(
        _PROCESSOR,
        apic_id,
        _LOCAL_APIC_VERSION,
        flags,
        cpu_signature,
        cpu_features,
        bytes(8),
    )


def _with_checksum(data: bytes, checksum_offset: int) -> bytes:
    """Set the checksum byte so that all bytes of `data` sum to 0 mod 256."""
    summed = bytearray(data)
    summed[checksum_offset] = (-sum(summed)) & 0xFF
    return bytes(summed)

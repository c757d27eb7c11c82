"""The fixed-layout ACPI tables: RSDP, XSDT, FADT and MADT.

Every table but the RSDP starts with the 36-byte system description header
(signature, length, revision, checksum, OEM and creator ids); all bytes of a
table, checksum included, sum to zero modulo 256. Layouts follow ACPI 6.5
chapter 5.2; offsets are given where a field is set.

The FADT describes a hardware-reduced machine (no PM timer, no fixed-feature
registers, no SCI, no FACS), as microVM monitors do: devices signal events
through a Generic Event Device in the DSDT instead.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

OEM_ID = b"EMBER "
OEM_TABLE_ID = b"EMBERVM "
OEM_REVISION = 1
CREATOR_ID = b"EMBR"
CREATOR_REVISION = 1

# Signature, length, revision, checksum, OEM id, OEM table id, OEM revision,
# creator id, creator revision.
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = _HEADER.size
_CHECKSUM_OFFSET = 9


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with a zero in its place) sum to 0."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header with length and checksum, then `body`."""
    table = bytearray(
        _HEADER.pack(
            signature,
            HEADER_SIZE + len(body),
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
        + body
    )
    table[_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


# --- RSDP -------------------------------------------------------------------

# Revision 2: "RSD PTR ", checksum of the first 20 bytes, OEM id, revision,
# RSDT address (none: 0), length, XSDT address, checksum of all 36 bytes,
# three reserved bytes.
_RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIZE = _RSDP.size


def rsdp(xsdt_address: int) -> bytes:
    table = bytearray(
        _RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_address, 0, b"")
    )
    table[8] = checksum(table[:20])
    table[32] = checksum(table)
    return bytes(table)


def xsdt(table_addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addresses))


# --- FADT -------------------------------------------------------------------

FADT_SIZE = 276  # ACPI 6.5
FADT_REVISION = 6
FADT_MINOR_REVISION = 5

# IA-PC boot architecture flags (offset 109).
IAPC_8042 = 1 << 1  # an i8042 answers at 0x60/0x64 (Ember's, for reset)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3  # no PCI, so no MSI
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
# Fixed feature flags (offset 112).
FADT_POWER_BUTTON = 1 << 4  # set: no fixed power button
FADT_SLEEP_BUTTON = 1 << 5  # set: no fixed sleep button
FADT_HW_REDUCED_ACPI = 1 << 20

HYPERVISOR_VENDOR_ID = b"EMBERKVM"


def fadt(dsdt_address: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, value)

    put("<I", 40, dsdt_address)  # DSDT (32-bit)
    put(
        "<H",
        109,
        IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_CMOS_RTC_NOT_PRESENT,
    )
    put("<I", 112, FADT_HW_REDUCED_ACPI | FADT_POWER_BUTTON | FADT_SLEEP_BUTTON)
    put("<B", 131, FADT_MINOR_REVISION)
    put("<Q", 140, dsdt_address)  # X_DSDT
    put("<8s", 268, HYPERVISOR_VENDOR_ID)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# --- MADT -------------------------------------------------------------------

MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # a dual 8259 PIC is present (KVM's)
_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0: uid, APIC id, flags
_IO_APIC = struct.Struct("<BBBBII")  # type 1: id, reserved, address, GSI base
_SOURCE_OVERRIDE = struct.Struct("<BBBBIH")  # type 2: bus, source, GSI, flags
_LOCAL_APIC_NMI = struct.Struct("<BBBHB")  # type 4: uid, flags, LINT#
_LAPIC_ENABLED = 1 << 0
_ALL_PROCESSORS = 0xFF
_CONFORMS_TO_BUS = 0  # polarity and trigger as the bus defines (ISA: edge, high)


def madt(
    vcpu_count: int,
    lapic_address: int,
    ioapic_id: int,
    ioapic_address: int,
    identity_irqs: Sequence[int],
) -> bytes:
    """One enabled local APIC per vCPU (APIC id = vCPU index), one IOAPIC at
    GSI 0, an identity source override for each ISA IRQ in `identity_irqs`
    and NMI on every local APIC's LINT1.

    KVM's default routing sends ISA IRQ n to IOAPIC pin n, the timer
    included; the overrides say so explicitly, because PC firmware usually
    reroutes the timer to pin 2 and some guests assume that."""
    body = struct.pack("<II", lapic_address, MADT_PCAT_COMPAT)
    for index in range(vcpu_count):
        body += _LOCAL_APIC.pack(0, 8, index, index, _LAPIC_ENABLED)
    body += _IO_APIC.pack(1, 12, ioapic_id, 0, ioapic_address, 0)
    for irq in identity_irqs:
        body += _SOURCE_OVERRIDE.pack(2, 10, 0, irq, irq, _CONFORMS_TO_BUS)
    body += _LOCAL_APIC_NMI.pack(4, 6, _ALL_PROCESSORS, _CONFORMS_TO_BUS, 1)
    return sdt(b"APIC", MADT_REVISION, body)

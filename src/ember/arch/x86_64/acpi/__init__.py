"""ACPI tables for an x86-64 microVM: where they go and how they are written.

`write_acpi_tables` lays them out in guest memory from `ACPI_START`: the RSDP
first (16-byte aligned, where a guest scanning 0xE0000-0xFFFFF finds it), then
the DSDT, FADT, MADT and XSDT, each 8-byte aligned. The XSDT lists the FADT
and the MADT; the FADT points to the DSDT. It returns the RSDP's address,
which the boot protocol hands to the kernel (PVH start info or zero page).
"""

from __future__ import annotations

from collections.abc import Sequence

from ember.arch.x86_64 import layout
from ember.arch.x86_64.acpi import tables
from ember.arch.x86_64.acpi.dsdt import (
    LegacyDevices,
    NotifyingDevice,
    VirtioMmioAcpiDevice,
    build_dsdt,
)
from ember.memory import GuestAddress, GuestMemory

__all__ = [
    "AcpiTablesTooLargeError",
    "LegacyDevices",
    "NotifyingDevice",
    "VirtioMmioAcpiDevice",
    "build_dsdt",
    "write_acpi_tables",
]

# The ISA IRQs Ember wires, stated as identity overrides in the MADT.
IDENTITY_IRQS = (layout.PIT_IRQ, layout.I8042_IRQ, layout.SERIAL_IRQ)


class AcpiTablesTooLargeError(Exception):
    """The tables do not fit between ACPI_START and ACPI_END."""


def build_acpi_tables(
    vcpu_count: int,
    virtio_devices: Sequence[VirtioMmioAcpiDevice] = (),
    *,
    vmgenid: NotifyingDevice | None = None,
    vmclock: NotifyingDevice | None = None,
    base: int = layout.ACPI_START,
) -> list[tuple[int, bytes]]:
    """(guest address, bytes) of every table, the RSDP first."""
    placed: list[tuple[int, bytes]] = []
    cursor = base + tables.RSDP_SIZE

    def place(table: bytes) -> int:
        nonlocal cursor
        address = (cursor + 7) & ~7
        placed.append((address, table))
        cursor = address + len(table)
        return address

    dsdt_address = place(build_dsdt(virtio_devices, vmgenid=vmgenid, vmclock=vmclock))
    fadt_address = place(tables.fadt(dsdt_address))
    madt_address = place(
        tables.madt(
            vcpu_count,
            layout.LAPIC_START,
            ioapic_id=vcpu_count,  # as in the MP table: the first id after the CPUs
            ioapic_address=layout.IOAPIC_START,
            identity_irqs=IDENTITY_IRQS,
        )
    )
    xsdt_address = place(tables.xsdt([fadt_address, madt_address]))
    return [(base, tables.rsdp(xsdt_address)), *placed]


def write_acpi_tables(
    memory: GuestMemory,
    vcpu_count: int,
    virtio_devices: Sequence[VirtioMmioAcpiDevice] = (),
    *,
    vmgenid: NotifyingDevice | None = None,
    vmclock: NotifyingDevice | None = None,
) -> GuestAddress:
    """Write the tables into guest memory; returns the RSDP's address."""
    placed = build_acpi_tables(
        vcpu_count, virtio_devices, vmgenid=vmgenid, vmclock=vmclock
    )
    end = max(address + len(table) for address, table in placed)
    if end > layout.ACPI_END:
        raise AcpiTablesTooLargeError(
            f"ACPI tables need {end - layout.ACPI_START:#x} bytes from "
            f"{layout.ACPI_START:#x}; only {layout.ACPI_END - layout.ACPI_START:#x} "
            "are set aside"
        )
    for address, table in placed:
        memory.write(GuestAddress(address), table)
    return GuestAddress(placed[0][0])

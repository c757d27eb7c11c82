"""ACPI tables and the AML encoder: layouts, checksums, and what a decompiler
nobody here wrote (ACPICA's iasl) makes of them."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ember.arch.x86_64 import layout
from ember.arch.x86_64.acpi import (
    AcpiTablesTooLargeError,
    NotifyingDevice,
    VirtioMmioAcpiDevice,
    aml,
    build_acpi_tables,
    build_dsdt,
    tables,
    write_acpi_tables,
)
from ember.memory import GuestAddress, GuestMemory
from ember.vmm.resources import ResourceAllocator, ResourceError

VIRTIO = [
    VirtioMmioAcpiDevice(0xC000_0000, 0x1000, 5),
    VirtioMmioAcpiDevice(0xC000_1000, 0x1000, 6),
]
GENID = NotifyingDevice(layout.VMGENID_START, 7)
CLOCK = NotifyingDevice(layout.VMCLOCK_START, 8)

# --- AML encoding -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "encoded"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # 62 + 1 byte = 63, the one-byte limit
        (63, b"\x41\x04"),  # 63 + 2 = 65 = 0x41: low nibble 1, then 0x04
        (0xFFD, b"\x4f\xff"),  # 0xFFD + 2 = 0xFFF, the two-byte limit
        (0xFFE, b"\x81\x00\x01"),  # 0xFFE + 3 = 0x1001
        (0xFFFFC, b"\x8f\xff\xff"),
        (0xFFFFD, b"\xc1\x00\x00\x01"),
    ],
)
def test_pkg_length_counts_itself_and_grows_at_each_limit(
    body: int, encoded: bytes
) -> None:
    assert aml.pkg_length(body) == encoded


def test_pkg_length_limit() -> None:
    with pytest.raises(aml.AmlError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xDE000, b"\x0c\x00\xe0\x0d\x00"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
    ],
)
def test_integers_take_the_shortest_form(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_names_and_paths() -> None:
    assert aml.name_seg("GED") == b"GED_"
    assert aml.name_string("VGEN") == b"VGEN"
    assert aml.name_string("\\_SB_.VGEN") == b"\\\x2e_SB_VGEN"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    for bad in ("TOOLONG", "1ABC", "a"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)


def test_eisa_id_is_stored_most_significant_byte_first() -> None:
    # PNP0A03, the usual example: the DWord 0x030AD041.
    assert aml.eisa_id("PNP0A03") == b"\x0c" + (0x030AD041).to_bytes(4, "little")
    with pytest.raises(aml.AmlError):
        aml.eisa_id("pnp0501")


def test_resource_descriptors() -> None:
    assert aml.memory32_fixed(0xDF000, 0x1000) == bytes.fromhex(
        "86 0900 01 00f00d00 00100000"
    )
    # Consumer, edge, active high, exclusive; two GSIs.
    assert aml.interrupt([5, 6]) == bytes.fromhex("89 0a00 03 02 05000000 06000000")
    assert aml.io_port(0x3F8, 8) == bytes.fromhex("47 01 f803 f803 01 08")
    assert aml.irq_no_flags(4) == bytes.fromhex("22 1000")
    template = aml.resource_template([aml.irq_no_flags(1)])
    assert template == bytes.fromhex("11 08 0a 05 22 0200 79 00")


def test_method_returning_a_package() -> None:
    encoded = aml.method(
        "ADDR", 0, [aml.return_(aml.package([aml.integer(0xDE000), aml.integer(0)]))]
    )
    assert encoded == bytes.fromhex("14 10 41444452 00 a4 12 08 02 0c00e00d00 00")


# --- tables --------------------------------------------------------------------


def _tables() -> dict[bytes, tuple[int, bytes]]:
    placed = build_acpi_tables(2, VIRTIO, vmgenid=GENID, vmclock=CLOCK)
    return {table[:4]: (address, table) for address, table in placed}


def test_every_table_sums_to_zero_and_states_its_length() -> None:
    for signature, (_, table) in _tables().items():
        if signature == b"RSD ":
            assert sum(table[:20]) % 256 == 0
            assert sum(table) % 256 == 0
            continue
        assert sum(table) % 256 == 0, signature
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
        assert table[10:16] == b"EMBER "


def test_rsdp_revision_2_points_to_the_xsdt() -> None:
    found = _tables()
    address, rsdp = found[b"RSD "]
    assert address == layout.ACPI_START
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2 and len(rsdp) == 36
    assert struct.unpack_from("<IQ", rsdp, 20) == (36, found[b"XSDT"][0])


def test_xsdt_lists_fadt_and_madt_and_the_fadt_the_dsdt() -> None:
    found = _tables()
    xsdt = found[b"XSDT"][1]
    listed = struct.unpack_from("<2Q", xsdt, 36)
    assert listed == (found[b"FACP"][0], found[b"APIC"][0])
    fadt = found[b"FACP"][1]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5
    dsdt_address = found[b"DSDT"][0]
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_address
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_address
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & tables.FADT_HW_REDUCED_ACPI
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & tables.IAPC_8042
    assert boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT


def test_madt_has_one_enabled_local_apic_per_vcpu() -> None:
    madt = tables.madt(3, 0xFEE00000, 3, 0xFEC00000, (0, 4))
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)
    entries = []
    offset = 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    lapics = [body for kind, body in entries if kind == 0]
    assert [(b[2], b[3], b[4]) for b in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    (ioapic,) = [body for kind, body in entries if kind == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, 3, 0, 0xFEC00000, 0)
    overrides = [struct.unpack("<BBBBIH", b) for kind, b in entries if kind == 2]
    assert [(o[3], o[4]) for o in overrides] == [(0, 0), (4, 4)]
    assert [b for kind, b in entries if kind == 4] == [bytes([4, 6, 0xFF, 0, 0, 1])]


def test_dsdt_lists_devices_by_name() -> None:
    dsdt = build_dsdt(VIRTIO, vmgenid=GENID, vmclock=CLOCK)
    for name in (b"COM1", b"PS2_", b"V000", b"V001", b"VGEN", b"VCLK", b"GED_"):
        assert b"\x5b\x82" in dsdt and name in dsdt
    assert b"LNRO0005\0" in dsdt and b"VMGENCTR\0" in dsdt and b"AMZNC10C\0" in dsdt
    assert aml.memory32_fixed(0xC000_1000, 0x1000) + aml.interrupt([6]) in dsdt
    # Without VMGenID and VMClock there is no event device either.
    bare = build_dsdt([])
    assert b"GED_" not in bare and b"VGEN" not in bare


def test_tables_are_written_to_guest_memory() -> None:
    with GuestMemory.anonymous([(0, 2 << 20)]) as memory:
        rsdp = write_acpi_tables(memory, 1, VIRTIO, vmgenid=GENID, vmclock=CLOCK)
        assert rsdp == layout.ACPI_START
        assert memory.read(rsdp, 8) == b"RSD PTR "
        xsdt = memory.read_u64(GuestAddress(rsdp + 24))
        assert memory.read(GuestAddress(xsdt), 4) == b"XSDT"
        # The monitor wrote them, so a diff snapshot holds them.
        region = memory.regions[0]
        assert region.monitor_dirty[layout.ACPI_START // 4096]


def test_tables_that_do_not_fit_are_refused() -> None:
    many = [
        VirtioMmioAcpiDevice(0xC000_0000 + i * 0x1000, 0x1000, 5) for i in range(4000)
    ]
    with (
        GuestMemory.anonymous([(0, 2 << 20)]) as memory,
        pytest.raises(AcpiTablesTooLargeError),
    ):
        write_acpi_tables(memory, 1, many)


# --- what ACPICA's disassembler reads --------------------------------------------


def _disassemble(tmp_path: Path, name: str, table: bytes) -> str:
    if shutil.which("iasl") is None:
        pytest.skip("iasl (acpica-tools) is not installed")
    path = tmp_path / f"{name}.dat"
    path.write_bytes(table)
    result = subprocess.run(
        ["iasl", "-d", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return (tmp_path / f"{name}.dsl").read_text()


def test_iasl_decompiles_the_dsdt(tmp_path: Path) -> None:
    source = _disassemble(
        tmp_path, "dsdt", build_dsdt(VIRTIO, vmgenid=GENID, vmclock=CLOCK)
    )
    for expected in (
        'DefinitionBlock ("", "DSDT", 2, "EMBER ", "EMBERVM ", 0x00000001)',
        'Name (_HID, EisaId ("PNP0501")',
        'Name (_HID, EisaId ("PNP0303")',
        'Name (_HID, "LNRO0005")',
        "0xC0001000,         // Address Base",
        'Name (_HID, "VMGENCTR")',
        'Name (_CID, "VM_Gen_Counter")',
        "Method (ADDR, 0, NotSerialized)",
        "0x000DE000,",
        'Name (_HID, "AMZNC10C")',
        "0x000DF000,         // Address Base",
        'Name (_HID, "ACPI0013"',
        "Method (_EVT, 1, NotSerialized)",
        "If ((Arg0 == 0x07))",
        "Notify (\\_SB.VGEN, 0x80)",
        "Notify (\\_SB.VCLK, 0x80)",
    ):
        assert expected in source, expected


def test_iasl_reads_the_data_tables(tmp_path: Path) -> None:
    found = _tables()
    madt = _disassemble(tmp_path, "apic", found[b"APIC"][1])
    assert madt.count("[Processor Local APIC]") == 2
    assert "[I/O APIC]" in madt and "[Local APIC NMI]" in madt
    fadt = _disassemble(tmp_path, "facp", found[b"FACP"][1])
    assert "Hardware Reduced (V5) : 1" in fadt
    xsdt = _disassemble(tmp_path, "xsdt", found[b"XSDT"][1])
    assert "ACPI Table Address   1" in xsdt


# --- resources -------------------------------------------------------------------


def test_allocator_hands_out_gsis_from_5_and_skips_reserved_ones() -> None:
    resources = ResourceAllocator()
    resources.reserve_gsi(6)
    assert [resources.allocate_gsi() for _ in range(3)] == [5, 7, 8]
    with pytest.raises(ResourceError):
        resources.reserve_gsi(7)
    with pytest.raises(ResourceError):
        resources.reserve_gsi(4)
    for _ in range(9, 24):
        resources.allocate_gsi()
    with pytest.raises(ResourceError, match="5-23"):
        resources.allocate_gsi()


def test_allocator_mmio_windows_are_aligned_and_disjoint() -> None:
    resources = ResourceAllocator()
    assert resources.allocate_mmio(0x1000) == layout.MMIO32_START
    resources.reserve_mmio(layout.MMIO32_START + 0x1000, 0x1000)
    assert resources.allocate_mmio(0x2000) == layout.MMIO32_START + 0x2000
    assert resources.allocate_mmio(0x100) == layout.MMIO32_START + 0x4000
    with pytest.raises(ResourceError, match="overlaps"):
        resources.reserve_mmio(layout.MMIO32_START + 0x2800, 0x1000)
    with pytest.raises(ResourceError, match="outside"):
        resources.reserve_mmio(layout.IOAPIC_START - 0x800, 0x1000)


def test_allocator_runs_out_below_the_ioapic() -> None:
    resources = ResourceAllocator(mmio_end=layout.MMIO32_START + 0x3000)
    resources.allocate_mmio(0x2000)
    with pytest.raises(ResourceError, match="no 0x2000-byte"):
        resources.allocate_mmio(0x2000)

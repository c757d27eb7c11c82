"""The Intel MP table: checksums, entries, and its place in base memory."""

from __future__ import annotations

import struct

import pytest

from ember.arch.x86_64.layout import MiB, ram_layout
from ember.arch.x86_64.mptable import (
    MpTableDoesNotFitError,
    VcpuCountError,
    build_mptable,
    write_mptable,
)
from ember.memory import GuestAddress, GuestMemory

EBDA_START = 0x9FC00
CONFIG_START = EBDA_START + 16
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def split_entries(config: bytes) -> list[bytes]:
    entries = []
    position = 44  # entries follow the 44-byte config table header
    while position < len(config):
        size = ENTRY_SIZES[config[position]]
        entries.append(config[position : position + size])
        position += size
    return entries


def parse(vcpu_count: int, **options: int) -> tuple[bytes, bytes, list[bytes]]:
    """The floating pointer, config table and its entries for `vcpu_count`."""
    table = build_mptable(vcpu_count, **options)
    floating = table[:16]
    config_length = struct.unpack_from("<H", table, 16 + 4)[0]
    config = table[16 : 16 + config_length]
    assert len(table) == 16 + config_length
    return floating, config, split_entries(config)


def test_floating_pointer() -> None:
    floating, _, _ = parse(1)
    signature, config_address, length, revision = struct.unpack_from("<4sIBB", floating)
    assert (signature, config_address, length, revision) == (
        b"_MP_",
        CONFIG_START,
        1,
        4,
    )
    assert floating[11:16] == bytes(5)  # config table present, virtual wire mode
    assert sum(floating) % 256 == 0


@pytest.mark.parametrize("vcpu_count", [1, 2, 7, 32])
def test_config_table_header_and_checksum(vcpu_count: int) -> None:
    _, config, entries = parse(vcpu_count)
    assert config[:4] == b"PCMP"
    assert config[6] == 4  # spec revision 1.4
    assert sum(config) % 256 == 0
    assert config[8:16] == b"EMBER   "
    assert struct.unpack_from("<H", config, 34)[0] == len(entries)
    assert struct.unpack_from("<I", config, 36)[0] == 0xFEE00000  # local APIC
    assert len(entries) == vcpu_count + 1 + 1 + 16 + 2


def test_processor_entries() -> None:
    _, _, entries = parse(4, cpu_signature=0x806F8, cpu_features=0x1234)
    processors = [struct.unpack("<BBBBII8s", e) for e in entries if e[0] == 0]
    assert [(p[1], p[3]) for p in processors] == [(0, 0b11), (1, 1), (2, 1), (3, 1)]
    assert {(p[4], p[5]) for p in processors} == {(0x806F8, 0x1234)}


def test_bus_and_ioapic_entries() -> None:
    _, _, entries = parse(3)
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus == b"\x01\x00ISA   "
    (ioapic,) = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapic == (2, 3, 0x11, 1, 0xFEC00000)  # id follows the vCPUs' ids


def test_isa_irqs_go_to_matching_ioapic_pins() -> None:
    _, _, entries = parse(2)
    irqs = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert irqs == [(3, 0, 0, 0, irq, 2, irq) for irq in range(16)]


def test_local_interrupts_are_virtual_wire() -> None:
    _, _, entries = parse(2)
    local = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    extint, nmi = 3, 1
    assert local == [(4, extint, 0, 0, 0, 0, 0), (4, nmi, 0, 0, 0, 0xFF, 1)]


@pytest.mark.parametrize("vcpu_count", [0, -1, 33])
def test_vcpu_count_out_of_range(vcpu_count: int) -> None:
    with pytest.raises(VcpuCountError, match=f"{vcpu_count} vCPUs requested"):
        build_mptable(vcpu_count)


def test_largest_table_stays_below_640k() -> None:
    assert EBDA_START + len(build_mptable(32)) <= 0xA0000


def test_write_mptable_places_it_at_ebda() -> None:
    with GuestMemory.anonymous(ram_layout(2 * MiB)) as memory:
        assert write_mptable(memory, 2) == EBDA_START
        table = build_mptable(2)
        assert memory.read(GuestAddress(EBDA_START), len(table)) == table


def test_memory_without_base_memory() -> None:
    with (
        GuestMemory.anonymous([(0, 0x80000)]) as memory,
        pytest.raises(MpTableDoesNotFitError, match="does not cover 0x9fc00"),
    ):
        write_mptable(memory, 1)

"""Initial register state of the boot vCPU for each entry protocol.

PVH enters a 32-bit flat protected-mode kernel with paging off (EBX = start info);
the 64-bit Linux boot protocol enters long mode with identity-mapped page tables
(RSI = zero page). Either way the descriptor tables the segment registers claim to
come from are also written to guest memory, because a kernel may reload them.
"""

from __future__ import annotations

import struct

from ember.arch.x86_64 import layout
from ember.kvm.structs import KvmFpu, KvmLapicState, KvmRegs, KvmSegment, KvmSregs
from ember.memory import GuestMemory

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

RFLAGS_RESERVED = 1 << 1

# GDT flag words (access byte in bits 0-7, flags nibble in bits 12-15).
CODE32 = 0xC09B
CODE64 = 0xA09B
DATA = 0xC093
TSS32 = 0x008B
TSS64 = 0x808B

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def segment_from_gdt(entry: int, selector: int) -> KvmSegment:
    """The hidden part of a segment register, as loading `selector` would set it."""
    segment = KvmSegment()
    segment.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    segment.g = (entry >> 55) & 1
    segment.limit = (raw_limit << 12) | 0xFFF if segment.g else raw_limit
    segment.selector = selector
    segment.type = (entry >> 40) & 0xF
    segment.s = (entry >> 44) & 1
    segment.dpl = (entry >> 45) & 3
    segment.present = (entry >> 47) & 1
    segment.avl = (entry >> 52) & 1
    segment.l = (entry >> 53) & 1
    segment.db = (entry >> 54) & 1
    segment.unusable = 0 if segment.present else 1
    return segment


def _write_gdt(memory: GuestMemory, entries: list[int]) -> None:
    memory.write(layout.BOOT_GDT_START, struct.pack(f"<{len(entries)}Q", *entries))
    memory.write_u64(layout.BOOT_IDT_START, 0)


def _load_segments(sregs: KvmSregs, gdt: list[int]) -> None:
    code = segment_from_gdt(gdt[1], CODE_SELECTOR)
    data = segment_from_gdt(gdt[2], DATA_SELECTOR)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(gdt[3], TSS_SELECTOR)
    sregs.gdt.base = layout.BOOT_GDT_START
    sregs.gdt.limit = len(gdt) * 8 - 1
    sregs.idt.base = layout.BOOT_IDT_START
    sregs.idt.limit = 7


def pvh_sregs(memory: GuestMemory, sregs: KvmSregs) -> None:
    """32-bit flat protected mode, paging off, as the PVH boot ABI requires."""
    gdt = [0, gdt_entry(CODE32, 0, 0xFFFFF), gdt_entry(DATA, 0, 0xFFFFF)]
    gdt.append(gdt_entry(TSS32, 0, 0x67))
    _write_gdt(memory, gdt)
    _load_segments(sregs, gdt)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0


def long_mode_sregs(memory: GuestMemory, sregs: KvmSregs) -> None:
    """64-bit mode with the first GiB identity-mapped by 2 MiB pages."""
    gdt = [0, gdt_entry(CODE64, 0, 0xFFFFF), gdt_entry(DATA, 0, 0xFFFFF)]
    gdt.append(gdt_entry(TSS64, 0, 0xFFFFF))
    _write_gdt(memory, gdt)
    _load_segments(sregs, gdt)
    _write_identity_page_tables(memory)
    sregs.cr3 = layout.PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA


def _write_identity_page_tables(memory: GuestMemory) -> None:
    present_writable = 0x3
    huge = 0x80
    memory.write_u64(layout.PML4_START, layout.PDPTE_START | present_writable)
    memory.write_u64(layout.PDPTE_START, layout.PDE_START | present_writable)
    entries = [(index << 21) | huge | present_writable for index in range(512)]
    memory.write(layout.PDE_START, struct.pack("<512Q", *entries))


def boot_regs(entry: int, boot_struct: int, protocol: str) -> KvmRegs:
    regs = KvmRegs()
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry
    if protocol == "pvh":
        regs.rbx = boot_struct
    else:
        regs.rsi = boot_struct
        regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    return regs


def boot_fpu() -> KvmFpu:
    fpu = KvmFpu()
    fpu.fcw = 0x37F  # x87 default control word after FINIT
    fpu.mxcsr = 0x1F80  # all SSE exceptions masked
    return fpu


APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_lint_modes(lapic: KvmLapicState) -> None:
    """LINT0 carries the PIC's ExtINT, LINT1 the NMI line, as on a PC."""
    raw = memoryview(lapic.regs).cast("B")
    for offset, mode in (
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ):
        value = struct.unpack_from("<I", raw, offset)[0]
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", raw, offset, value)

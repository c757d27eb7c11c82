"""The PVH start info (`struct hvm_start_info`) and the tables it points to.

A PVH kernel starts in 32-bit protected mode with EBX holding the start info's
address. The start info carries the command line, the modules (the initrd is
module 0) and, from version 1, the memory map; layouts follow Xen's public
`arch-x86/hvm/start_info.h`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ember.arch.x86_64.e820 import E820Entry
from ember.arch.x86_64.layout import (
    PVH_INFO_START,
    PVH_MEMMAP_START,
    PVH_MODLIST_START,
)
from ember.memory import GuestAddress, GuestMemory

HVM_START_MAGIC = 0x336EC578
# Version 1 added memmap_paddr and memmap_entries.
HVM_START_VERSION = 1

# hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved (56 bytes).
START_INFO = struct.Struct("<IIIIQQQQII")
# hvm_modlist_entry: paddr, size, cmdline_paddr, reserved (32 bytes).
MODLIST_ENTRY = struct.Struct("<QQQQ")
# hvm_memmap_table_entry: addr, size, type, reserved (24 bytes); the types are
# the e820 ones.
MEMMAP_ENTRY = struct.Struct("<QQII")


def write_pvh_start_info(
    memory: GuestMemory,
    *,
    cmdline_address: GuestAddress,
    initrd: tuple[GuestAddress, int] | None,
    e820: Sequence[E820Entry],
    rsdp_address: GuestAddress,
) -> GuestAddress:
    """Write the start info, module list and memory map; returns the start info."""
    modules = _write_modlist(memory, initrd)
    memmap = b"".join(
        MEMMAP_ENTRY.pack(entry.address, entry.size, entry.type, 0) for entry in e820
    )
    memory.write(PVH_MEMMAP_START, memmap)
    start_info = START_INFO.pack(
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,  # flags
        modules,
        PVH_MODLIST_START if modules else 0,
        cmdline_address,
        rsdp_address,
        PVH_MEMMAP_START,
        len(e820),
        0,  # reserved
    )
    memory.write(PVH_INFO_START, start_info)
    return PVH_INFO_START


def _write_modlist(memory: GuestMemory, initrd: tuple[GuestAddress, int] | None) -> int:
    """Write the module list (just the initrd, if any); returns its length."""
    if initrd is None:
        return 0
    address, size = initrd
    # The initrd has no command line of its own: cmdline_paddr 0.
    memory.write(PVH_MODLIST_START, MODLIST_ENTRY.pack(address, size, 0, 0))
    return 1

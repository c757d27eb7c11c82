"""The zero page (`struct boot_params`) for the 64-bit Linux boot protocol.

The kernel finds it through RSI at its 64-bit entry. For a bzImage it starts from
the image's own setup header, as the protocol asks; for an ELF vmlinux, which has
no setup header, Ember fills in the few fields the kernel reads on that path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ember.arch.x86_64.e820 import E820Entry
from ember.arch.x86_64.layout import ZERO_PAGE_START
from ember.boot import setup_header as hdr
from ember.memory import GuestAddress, GuestMemory

_E820_ENTRY = struct.Struct("<QQI")

# No real-mode setup code runs on the 64-bit path, so the heap is never used;
# Ember still declares the largest heap the 64 KiB setup segment allows (its end
# minus the 0x200 the protocol subtracts), which is what the protocol recommends
# for modern kernels.
_HEAP_END_PTR = 0x10000 - 0x200

# Like other VMMs, tell an ELF kernel it may be placed at 16 MiB boundaries.
_ELF_KERNEL_ALIGNMENT = 0x1000000


def build_zero_page(
    *,
    setup_header: bytes | None,
    cmdline_address: GuestAddress,
    cmdline_size: int,
    initrd: tuple[GuestAddress, int] | None,
    e820: Sequence[E820Entry],
    rsdp_address: GuestAddress,
) -> bytes:
    """The zero page's bytes; `setup_header` is a bzImage's header from 0x1f1."""
    page = bytearray(hdr.ZERO_PAGE_SIZE)
    if setup_header is None:
        _fill_elf_header(page, cmdline_size)
    else:
        _fill_bzimage_header(page, setup_header)
    struct.pack_into("<I", page, hdr.CMD_LINE_PTR, cmdline_address)
    if initrd is not None:
        struct.pack_into("<II", page, hdr.RAMDISK_IMAGE, *initrd)
    struct.pack_into("<Q", page, hdr.ACPI_RSDP_ADDR, rsdp_address)
    _fill_e820(page, e820)
    return bytes(page)


def write_zero_page(memory: GuestMemory, page: bytes) -> GuestAddress:
    memory.write(ZERO_PAGE_START, page)
    return ZERO_PAGE_START


def _fill_elf_header(page: bytearray, cmdline_size: int) -> None:
    struct.pack_into("<H", page, hdr.BOOT_FLAG, hdr.BOOT_FLAG_VALUE)
    page[hdr.HEADER_MAGIC : hdr.HEADER_MAGIC + 4] = hdr.HEADER_MAGIC_VALUE
    page[hdr.TYPE_OF_LOADER] = hdr.UNDEFINED_LOADER
    struct.pack_into("<I", page, hdr.KERNEL_ALIGNMENT, _ELF_KERNEL_ALIGNMENT)
    struct.pack_into("<I", page, hdr.CMDLINE_SIZE, cmdline_size)


def _fill_bzimage_header(page: bytearray, setup_header: bytes) -> None:
    end = min(hdr.SETUP_HEADER_START + len(setup_header), hdr.SETUP_HEADER_LIMIT)
    page[hdr.SETUP_HEADER_START : end] = setup_header[: end - hdr.SETUP_HEADER_START]
    page[hdr.TYPE_OF_LOADER] = hdr.UNDEFINED_LOADER
    page[hdr.LOADFLAGS] |= hdr.LOADED_HIGH | hdr.CAN_USE_HEAP
    struct.pack_into("<H", page, hdr.HEAP_END_PTR, _HEAP_END_PTR)


def _fill_e820(page: bytearray, e820: Sequence[E820Entry]) -> None:
    if len(e820) > hdr.E820_TABLE_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries do not fit in the zero page")
    for index, entry in enumerate(e820):
        offset = hdr.E820_TABLE + index * _E820_ENTRY.size
        _E820_ENTRY.pack_into(page, offset, entry.address, entry.size, entry.type)
    page[hdr.E820_ENTRIES] = len(e820)

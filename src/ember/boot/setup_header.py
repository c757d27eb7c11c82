"""Offsets in the Linux x86 boot sector, setup header and zero page.

The setup header sits at the same offsets in a bzImage file and in the zero page
(`struct boot_params`), which is why a loader can copy it across byte for byte.
All offsets are from the start of the image (or of the zero page).
"""

# Setup header fields (boot protocol 2.x).
SETUP_HEADER_START = 0x1F1  # the header begins with setup_sects
SETUP_SECTS = 0x1F1  # u8: 512-byte setup sectors after the boot sector; 0 means 4
BOOT_FLAG = 0x1FE  # u16: 0xAA55, the classic boot-sector signature
# A two-byte short jump at 0x200 skips the header; its displacement (the byte at
# 0x201) counts from 0x202, so the header ends at 0x202 plus that byte.
JUMP_LENGTH = 0x201
JUMP_BASE = 0x202
HEADER_MAGIC = 0x202  # 4 bytes: "HdrS"
VERSION = 0x206  # u16: boot protocol version, major in the high byte
TYPE_OF_LOADER = 0x210  # u8
LOADFLAGS = 0x211  # u8
CODE32_START = 0x214  # u32
RAMDISK_IMAGE = 0x218  # u32
RAMDISK_SIZE = 0x21C  # u32
HEAP_END_PTR = 0x224  # u16
CMD_LINE_PTR = 0x228  # u32
INITRD_ADDR_MAX = 0x22C  # u32: highest address the initrd may occupy (2.03+)
KERNEL_ALIGNMENT = 0x230  # u32
XLOADFLAGS = 0x236  # u16 (2.12+)
CMDLINE_SIZE = 0x238  # u32: longest command line without its NUL (2.06+)
INIT_SIZE = 0x260  # u32: memory the kernel needs from its load address (2.10+)

# The zero page reserves space up to 0x290 for the setup header; a future,
# longer header is cut there rather than spilling into the next zero page fields.
SETUP_HEADER_LIMIT = 0x290

# Zero page fields outside the setup header.
ACPI_RSDP_ADDR = 0x070  # u64 (2.14+)
E820_ENTRIES = 0x1E8  # u8: number of valid e820 table entries
E820_TABLE = 0x2D0  # 128 entries of {u64 address, u64 size, u32 type}
E820_TABLE_MAX_ENTRIES = 128
ZERO_PAGE_SIZE = 0x1000

BOOT_FLAG_VALUE = 0xAA55
HEADER_MAGIC_VALUE = b"HdrS"
# "Loader not in the registered list": the ID the protocol reserves for others.
UNDEFINED_LOADER = 0xFF

# loadflags bits.
LOADED_HIGH = 1 << 0  # protected-mode code is loaded at 1 MiB
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# xloadflags bits.
XLF_KERNEL_64 = 1 << 0  # a 64-bit entry point sits at load address + 0x200

# Protocol versions at which fields appear.
VERSION_CMDLINE_SIZE = 0x206
VERSION_INIT_SIZE = 0x20A
VERSION_XLOADFLAGS = 0x20C

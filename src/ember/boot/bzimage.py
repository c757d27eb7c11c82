"""Loading a bzImage through the 64-bit Linux boot protocol.

A bzImage is a boot sector plus real-mode setup code (`setup_sects` sectors of
512 bytes), then the protected-mode kernel. Ember never runs the setup code: it
copies the protected-mode part to 1 MiB and enters its 64-bit entry at load
address + 0x200 with a zero page built from the image's own setup header.
"""

from __future__ import annotations

import struct

from ember.arch.x86_64.layout import HIMEM_START
from ember.boot import setup_header as hdr
from ember.boot.errors import (
    BzImageMagicError,
    BzImageNot64BitError,
    BzImageTruncatedError,
    BzImageVersionError,
    KernelPlacementError,
)
from ember.boot.image_file import ImageFile
from ember.boot.kernel_image import LoadedKernel
from ember.memory import GuestAddress, GuestMemory, OutOfBoundsError

MIN_BOOT_PROTOCOL = 0x206
SECTOR_SIZE = 512
# With setup_sects 0, old images meant 4 setup sectors.
DEFAULT_SETUP_SECTS = 4
# The 64-bit entry point (startup_64) sits 0x200 bytes into the protected-mode code.
ENTRY_64_OFFSET = 0x200
# Ember always loads at 1 MiB, the protocol's default; a relocatable kernel moves
# itself to an aligned address when it decompresses, so pref_address is not needed.
LOAD_ADDRESS = HIMEM_START


def is_bzimage(first_bytes: bytes) -> bool:
    """A boot-sector signature or a 'HdrS' magic marks a Linux boot image."""
    boot_flag = first_bytes[hdr.BOOT_FLAG : hdr.BOOT_FLAG + 2]
    magic = first_bytes[hdr.HEADER_MAGIC : hdr.HEADER_MAGIC + 4]
    return (
        boot_flag == struct.pack("<H", hdr.BOOT_FLAG_VALUE)
        or magic == hdr.HEADER_MAGIC_VALUE
    )


def load_bzimage(memory: GuestMemory, image: ImageFile) -> LoadedKernel:
    header = read_setup_header(image)
    kernel_offset = _protected_mode_offset(image, header)
    kernel_size = image.size - kernel_offset
    claimed = max(kernel_size, _init_size(header))
    try:
        memory.region_for(LOAD_ADDRESS, claimed)
    except OutOfBoundsError:
        raise KernelPlacementError(
            f"kernel {image.path}: protected-mode kernel at {LOAD_ADDRESS:#x} "
            f"({claimed:#x} bytes with room to decompress) does not fit in "
            "guest memory"
        ) from None

    image.copy_to_memory(memory, LOAD_ADDRESS, kernel_offset, kernel_size)
    return LoadedKernel(
        protocol="linux64",
        entry=GuestAddress(LOAD_ADDRESS + ENTRY_64_OFFSET),
        start=LOAD_ADDRESS,
        end=GuestAddress(LOAD_ADDRESS + claimed),
        cmdline_limit=_u32(header, hdr.CMDLINE_SIZE),
        initrd_end_limit=GuestAddress(_u32(header, hdr.INITRD_ADDR_MAX) + 1),
        setup_header=header[hdr.SETUP_HEADER_START :],
    )


def read_setup_header(image: ImageFile) -> bytes:
    """The image's first bytes up to the end of its setup header, checked.

    The result is indexed by image offset, so the constants in `setup_header`
    apply directly; it ends where the header says it ends.
    """
    raw = image.read_at(0, hdr.SETUP_HEADER_LIMIT)
    if raw[hdr.HEADER_MAGIC : hdr.HEADER_MAGIC + 4] != hdr.HEADER_MAGIC_VALUE:
        raise BzImageMagicError(
            f"kernel {image.path}: bzImage setup header has no 'HdrS' magic"
        )
    version = _u16(raw, hdr.VERSION)
    if version < MIN_BOOT_PROTOCOL:
        raise BzImageVersionError(
            f"kernel {image.path}: bzImage boot protocol {_version_text(version)} "
            f"is older than {_version_text(MIN_BOOT_PROTOCOL)}, the oldest Ember "
            "supports"
        )
    xloadflags = _u16(raw, hdr.XLOADFLAGS) if version >= hdr.VERSION_XLOADFLAGS else 0
    if not xloadflags & hdr.XLF_KERNEL_64:
        raise BzImageNot64BitError(
            f"kernel {image.path}: bzImage has no 64-bit entry point "
            "(XLF_KERNEL_64 is not set)"
        )
    header_end = min(hdr.JUMP_BASE + raw[hdr.JUMP_LENGTH], hdr.SETUP_HEADER_LIMIT)
    # Fields past the end of the file or of the header read as zero.
    return raw[:header_end].ljust(hdr.SETUP_HEADER_LIMIT, b"\0")


def _protected_mode_offset(image: ImageFile, header: bytes) -> int:
    setup_sects = header[hdr.SETUP_SECTS] or DEFAULT_SETUP_SECTS
    # The boot sector itself comes first, then the setup sectors.
    offset = (setup_sects + 1) * SECTOR_SIZE
    if offset >= image.size:
        raise BzImageTruncatedError(
            f"kernel {image.path}: bzImage is {image.size} bytes and ends inside "
            f"its {offset}-byte setup code, with no protected-mode kernel"
        )
    return offset


def _init_size(header: bytes) -> int:
    if _u16(header, hdr.VERSION) < hdr.VERSION_INIT_SIZE:
        return 0
    return _u32(header, hdr.INIT_SIZE)


def _version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def _u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")

"""Tiny synthetic kernels for the boot tests, packed by hand with struct.

The other test_boot_* modules import the builders from here; the few tests at the
bottom check that the builders produce what the formats say.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")


@dataclass
class Segment:
    """A program header and its file bytes; `memsz` None means len(data)."""

    paddr: int
    data: bytes
    memsz: int | None = None
    type: int = PT_LOAD
    align: int = 0x1000


def elf_note(name: bytes, note_type: int, desc: bytes, alignment: int = 4) -> bytes:
    def pad(raw: bytes) -> bytes:
        return raw + bytes(-len(raw) % alignment)

    header = struct.pack("<III", len(name), len(desc), note_type)
    return header + pad(name) + pad(desc)


def pvh_note(entry: int, desc_size: int = 4) -> bytes:
    return elf_note(
        b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(desc_size, "little")
    )


def note_segment(notes: bytes, align: int = 4) -> Segment:
    return Segment(paddr=0, data=notes, type=PT_NOTE, align=align)


def build_elf(
    segments: list[Segment],
    *,
    entry: int = 0x100000,
    elf_class: int = 2,
    data_encoding: int = 1,
    elf_type: int = 2,
    machine: int = 62,
    phentsize: int = PROGRAM_HEADER.size,
) -> bytes:
    """An ELF64 file: header, program headers, then each segment's bytes."""
    ident = b"\x7fELF" + bytes([elf_class, data_encoding, 1]) + bytes(9)
    phoff = ELF_HEADER.size
    data_offset = phoff + len(segments) * PROGRAM_HEADER.size
    header = ELF_HEADER.pack(
        ident, elf_type, machine, 1, entry, phoff, 0, 0,
        ELF_HEADER.size, phentsize, len(segments), 0, 0, 0,
    )  # fmt: skip
    program_headers = b""
    data = b""
    for segment in segments:
        memsz = len(segment.data) if segment.memsz is None else segment.memsz
        program_headers += PROGRAM_HEADER.pack(
            segment.type, 5, data_offset + len(data), segment.paddr,
            segment.paddr, len(segment.data), memsz, segment.align,
        )  # fmt: skip
        data += segment.data
    return header + program_headers + data


@dataclass
class BzImageSpec:
    """The setup header fields the tests vary; the rest are left zero."""

    payload: bytes = b"\x90" * 0x400
    setup_sects: int = 4
    version: int = 0x20F
    xloadflags: int = 1  # XLF_KERNEL_64
    loadflags: int = 1  # LOADED_HIGH
    cmdline_size: int = 2047
    initrd_addr_max: int = 0x7FFFFFFF
    init_size: int = 0
    magic: bytes = b"HdrS"
    header_end: int = 0x26C
    vid_mode: int = 0xFFFF


def build_bzimage(spec: BzImageSpec | None = None) -> bytes:
    spec = spec or BzImageSpec()
    setup_sects = spec.setup_sects or 4
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = spec.setup_sects
    struct.pack_into("<H", image, 0x1FA, spec.vid_mode)
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200] = 0xEB  # short jmp over the header
    image[0x201] = spec.header_end - 0x202
    image[0x202:0x206] = spec.magic
    struct.pack_into("<H", image, 0x206, spec.version)
    image[0x211] = spec.loadflags
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x22C, spec.initrd_addr_max)
    struct.pack_into("<I", image, 0x230, 0x200000)  # kernel_alignment
    image[0x234] = 1  # relocatable_kernel
    struct.pack_into("<H", image, 0x236, spec.xloadflags)
    struct.pack_into("<I", image, 0x238, spec.cmdline_size)
    struct.pack_into("<I", image, 0x260, spec.init_size)
    return bytes(image) + spec.payload


def test_elf_builder_lays_out_header_then_program_headers() -> None:
    image = build_elf([Segment(0x100000, b"abc")])
    fields = ELF_HEADER.unpack_from(image)
    assert fields[0][:4] == b"\x7fELF"
    assert fields[5] == 64 and fields[10] == 1
    offset = PROGRAM_HEADER.unpack_from(image, 64)[2]
    assert image[offset:] == b"abc"


def test_bzimage_builder_places_payload_after_setup_sectors() -> None:
    image = build_bzimage(BzImageSpec(payload=b"KERNEL", setup_sects=2))
    assert image[0x202:0x206] == b"HdrS"
    assert image[3 * 512 :] == b"KERNEL"


def test_pvh_note_is_padded_to_four_bytes() -> None:
    assert len(pvh_note(0x100000)) == 12 + 4 + 4
    assert len(elf_note(b"GNU\0", 3, b"12345")) == 12 + 4 + 8

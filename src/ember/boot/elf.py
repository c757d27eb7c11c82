"""Loading an ELF64 `vmlinux` (or the project's test guest) into guest memory.

PT_LOAD segments go to their physical addresses (p_paddr), because the guest
starts with paging off (PVH) or identity-mapped, never at its virtual addresses.
A kernel that carries a Xen PHYS32_ENTRY note is booted through PVH at the note's
32-bit entry; any other kernel through the 64-bit Linux boot protocol at e_entry.
Every offset and size read from the file is checked against the file's size
before it is used, so a damaged file gives an error, never a stray read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ember.arch.x86_64.layout import HIMEM_START, MMIO32_START
from ember.boot.cmdline import MAX_CMDLINE_LENGTH
from ember.boot.errors import (
    ElfTruncatedError,
    InvalidElfError,
    InvalidPvhNoteError,
    KernelLoadError,
    KernelPlacementError,
    UnsupportedElfError,
)
from ember.boot.image_file import ImageFile
from ember.boot.kernel_image import LoadedKernel, Protocol
from ember.memory import GuestAddress, GuestMemory, OutOfBoundsError

ELF_MAGIC = b"\x7fELF"

# e_ident: magic, class, data encoding, version, then padding to 16 bytes.
_EI_CLASS = 4
_EI_DATA = 5
_ELFCLASS32 = 1
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_X86_64 = 62

# Elf64_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags,
# ehsize, phentsize, phnum, shentsize, shnum, shstrndx (64 bytes in all).
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align.
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
# Elf64_Nhdr: namesz, descsz, type; name and desc follow, each padded.
_NOTE_HEADER = struct.Struct("<III")

_PT_LOAD = 1
_PT_NOTE = 4

# Real kernels have a handful of program headers and a few hundred bytes of
# notes; the caps keep a hostile file from making us read megabytes of headers.
_MAX_PROGRAM_HEADERS = 128
_MAX_NOTE_SEGMENT = 1024 * 1024

# The PVH entry note: owner "Xen", type XEN_ELFNOTE_PHYS32_ENTRY.
_XEN_NOTE_NAME = b"Xen"
_XEN_ELFNOTE_PHYS32_ENTRY = 18

_ZERO_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class _ElfHeader:
    entry: int
    phoff: int
    phentsize: int
    phnum: int


@dataclass(frozen=True)
class _ProgramHeader:
    index: int
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


def is_elf(first_bytes: bytes) -> bool:
    return first_bytes.startswith(ELF_MAGIC)


def load_elf(memory: GuestMemory, image: ImageFile) -> LoadedKernel:
    """Check every header, copy the PT_LOAD segments and find the entry point."""
    header = _read_elf_header(image)
    program_headers = _read_program_headers(image, header)
    segments = [ph for ph in program_headers if ph.type == _PT_LOAD and ph.memsz]
    if not segments:
        raise InvalidElfError(f"kernel {image.path}: ELF has no PT_LOAD segment")
    for segment in segments:
        _check_segment_placement(memory, image, segment)
    protocol, entry = _choose_entry(memory, image, header, program_headers)

    for segment in segments:
        _load_segment(memory, image, segment)
    return LoadedKernel(
        protocol=protocol,
        entry=entry,
        start=GuestAddress(min(segment.paddr for segment in segments)),
        end=GuestAddress(max(segment.end for segment in segments)),
        cmdline_limit=MAX_CMDLINE_LENGTH,
        initrd_end_limit=MMIO32_START,
    )


def _choose_entry(
    memory: GuestMemory,
    image: ImageFile,
    header: _ElfHeader,
    program_headers: Sequence[_ProgramHeader],
) -> tuple[Protocol, GuestAddress]:
    """PVH at the note's entry if the kernel has the note, else 64-bit at e_entry."""
    pvh_entry = _find_pvh_entry(image, program_headers)
    if pvh_entry is None:
        _check_entry(memory, image, header.entry, InvalidElfError, "ELF entry point")
        return "linux64", GuestAddress(header.entry)
    _check_entry(memory, image, pvh_entry, InvalidPvhNoteError, "PVH entry point")
    return "pvh", GuestAddress(pvh_entry)


def _read_elf_header(image: ImageFile) -> _ElfHeader:
    raw = image.read_at(0, _ELF64_HEADER.size)
    _check_identity(image, raw)
    if len(raw) < _ELF64_HEADER.size:
        raise ElfTruncatedError(
            f"kernel {image.path}: ELF truncated: the file is {len(raw)} bytes, "
            f"shorter than the {_ELF64_HEADER.size}-byte ELF64 header"
        )
    fields = _ELF64_HEADER.unpack(raw)
    elf_type, machine, entry, phoff = fields[1], fields[2], fields[4], fields[5]
    phentsize, phnum = fields[9], fields[10]
    if elf_type != _ET_EXEC:
        raise UnsupportedElfError(
            f"kernel {image.path}: ELF type {elf_type} is not an executable (ET_EXEC)"
        )
    if machine != _EM_X86_64:
        raise UnsupportedElfError(
            f"kernel {image.path}: ELF machine {machine} is not x86-64 ({_EM_X86_64})"
        )
    return _ElfHeader(entry=entry, phoff=phoff, phentsize=phentsize, phnum=phnum)


def _check_identity(image: ImageFile, raw: bytes) -> None:
    """Refuse anything but a little-endian ELF64 before reading further fields."""
    if len(raw) <= _EI_DATA:
        raise ElfTruncatedError(
            f"kernel {image.path}: ELF truncated: the file is {len(raw)} bytes, "
            "too short for the ELF identification"
        )
    elf_class, encoding = raw[_EI_CLASS], raw[_EI_DATA]
    if elf_class == _ELFCLASS32:
        raise UnsupportedElfError(
            f"kernel {image.path}: 32-bit ELF is not supported, Ember needs an "
            "ELF64 x86-64 kernel"
        )
    if elf_class != _ELFCLASS64:
        raise UnsupportedElfError(f"kernel {image.path}: unknown ELF class {elf_class}")
    if encoding != _ELFDATA2LSB:
        raise UnsupportedElfError(
            f"kernel {image.path}: ELF data encoding {encoding} is not little-endian"
        )


def _read_program_headers(image: ImageFile, header: _ElfHeader) -> list[_ProgramHeader]:
    if header.phentsize != _PROGRAM_HEADER.size:
        raise InvalidElfError(
            f"kernel {image.path}: ELF program header size is {header.phentsize}, "
            f"expected {_PROGRAM_HEADER.size}"
        )
    if not 0 < header.phnum <= _MAX_PROGRAM_HEADERS:
        raise InvalidElfError(
            f"kernel {image.path}: ELF has {header.phnum} program headers, "
            f"expected 1 to {_MAX_PROGRAM_HEADERS}"
        )
    table_size = header.phnum * _PROGRAM_HEADER.size
    if header.phoff + table_size > image.size:
        first_cut = max(0, image.size - header.phoff) // _PROGRAM_HEADER.size
        raise ElfTruncatedError(
            f"kernel {image.path}: ELF truncated: program header {first_cut} "
            "lies beyond the end of the file"
        )
    table = image.read_at(header.phoff, table_size)
    return [
        _parse_program_header(image, index, table, index * _PROGRAM_HEADER.size)
        for index in range(header.phnum)
    ]


def _parse_program_header(
    image: ImageFile, index: int, table: bytes, position: int
) -> _ProgramHeader:
    fields = _PROGRAM_HEADER.unpack_from(table, position)
    p_type, _, offset, _, paddr, filesz, memsz, align = fields
    header = _ProgramHeader(index, p_type, offset, paddr, filesz, memsz, align)
    if p_type not in (_PT_LOAD, _PT_NOTE):
        return header
    if filesz and offset + filesz > image.size:
        raise ElfTruncatedError(
            f"kernel {image.path}: ELF truncated: segment {index} data "
            f"(offset {offset:#x}, {filesz:#x} bytes) lies beyond the end of the file"
        )
    if p_type == _PT_LOAD and filesz > memsz:
        raise InvalidElfError(
            f"kernel {image.path}: ELF segment {index} has more file bytes "
            f"({filesz:#x}) than memory bytes ({memsz:#x})"
        )
    return header


def _check_segment_placement(
    memory: GuestMemory, image: ImageFile, segment: _ProgramHeader
) -> None:
    if segment.paddr < HIMEM_START:
        raise KernelPlacementError(
            f"kernel {image.path}: segment {segment.index} at {segment.paddr:#x} "
            f"lies below {HIMEM_START:#x}, where Ember keeps boot structures"
        )
    try:
        memory.region_for(GuestAddress(segment.paddr), segment.memsz)
    except OutOfBoundsError:
        raise KernelPlacementError(
            f"kernel {image.path}: segment {segment.index} at {segment.paddr:#x} "
            f"({segment.memsz:#x} bytes) does not fit in guest memory"
        ) from None


def _load_segment(
    memory: GuestMemory, image: ImageFile, segment: _ProgramHeader
) -> None:
    address = GuestAddress(segment.paddr)
    image.copy_to_memory(memory, address, segment.offset, segment.filesz)
    # The rest of p_memsz is .bss: guest memory may be reused, so zero it.
    _zero_guest_range(
        memory, GuestAddress(address + segment.filesz), segment.memsz - segment.filesz
    )


def _zero_guest_range(memory: GuestMemory, address: GuestAddress, length: int) -> None:
    zeros = bytes(min(length, _ZERO_CHUNK))
    done = 0
    while done < length:
        count = min(length - done, _ZERO_CHUNK)
        memory.write(GuestAddress(address + done), zeros[:count])
        done += count


def _check_entry(
    memory: GuestMemory,
    image: ImageFile,
    entry: int,
    error: type[KernelLoadError],
    what: str,
) -> None:
    try:
        memory.region_for(GuestAddress(entry))
    except OutOfBoundsError:
        raise error(
            f"kernel {image.path}: {what} {entry:#x} lies outside guest memory"
        ) from None


def _find_pvh_entry(
    image: ImageFile, program_headers: Sequence[_ProgramHeader]
) -> int | None:
    for segment in program_headers:
        if segment.type != _PT_NOTE:
            continue
        if segment.filesz > _MAX_NOTE_SEGMENT:
            raise InvalidElfError(
                f"kernel {image.path}: ELF note segment {segment.index} is "
                f"{segment.filesz} bytes, more than the {_MAX_NOTE_SEGMENT} accepted"
            )
        notes = image.read_at(segment.offset, segment.filesz)
        entry = _pvh_entry_in_notes(image, segment, notes)
        if entry is not None:
            return entry
    return None


def _pvh_entry_in_notes(
    image: ImageFile, segment: _ProgramHeader, notes: bytes
) -> int | None:
    # Notes are padded to 4 bytes, except in segments aligned to 8 (a layout
    # some toolchains use for 64-bit notes).
    alignment = 8 if segment.align == 8 else 4
    position = 0
    while position + _NOTE_HEADER.size <= len(notes):
        name_size, desc_size, note_type = _NOTE_HEADER.unpack_from(notes, position)
        name_start = position + _NOTE_HEADER.size
        desc_start = name_start + _align_up(name_size, alignment)
        if desc_start + desc_size > len(notes):
            raise InvalidElfError(
                f"kernel {image.path}: ELF note at offset {position:#x} of segment "
                f"{segment.index} runs past the end of its segment"
            )
        name = notes[name_start : name_start + name_size].rstrip(b"\0")
        if name == _XEN_NOTE_NAME and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
            return _parse_pvh_entry(image, notes[desc_start : desc_start + desc_size])
        position = desc_start + _align_up(desc_size, alignment)
    return None


def _parse_pvh_entry(image: ImageFile, desc: bytes) -> int:
    # The descriptor is a 32-bit address, though some kernels store it as a
    # 64-bit value (".quad"); the upper half must then be zero.
    if len(desc) not in (4, 8):
        raise InvalidPvhNoteError(
            f"kernel {image.path}: PVH entry note has a {len(desc)}-byte "
            "descriptor, expected 4 or 8"
        )
    entry = int.from_bytes(desc, "little")
    if entry >= 1 << 32:
        raise InvalidPvhNoteError(
            f"kernel {image.path}: PVH entry point {entry:#x} is not a 32-bit address"
        )
    return entry


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment

"""Loading synthetic ELF64 kernels: segments, PVH note, zero page, bad headers."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.arch.x86_64.layout import MiB, ram_layout
from ember.boot import (
    BootInfo,
    ElfTruncatedError,
    InvalidElfError,
    InvalidPvhNoteError,
    KernelLoadError,
    KernelPlacementError,
    UnsupportedElfError,
    load_kernel,
)
from ember.memory import GuestAddress, GuestMemory
from test_boot_images import (
    PT_LOAD,
    Segment,
    build_elf,
    elf_note,
    note_segment,
    pvh_note,
)

MEMORY_SIZE = 32 * MiB
KERNEL_BASE = 0x100000
PVH_ENTRY = 0x100040


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(ram_layout(MEMORY_SIZE)) as guest_memory:
        yield guest_memory


def load(
    memory: GuestMemory,
    tmp_path: Path,
    image: bytes,
    *,
    cmdline: str = "console=ttyS0",
    initrd_path: str | None = None,
) -> BootInfo:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(image)
    return load_kernel(
        memory, str(kernel), initrd_path=initrd_path, cmdline=cmdline, vcpu_count=1
    )


def expect_error(
    memory: GuestMemory, tmp_path: Path, image: bytes, error: type[KernelLoadError]
) -> str:
    """Load `image`, expect exactly `error`; returns its one-line message."""
    with pytest.raises(KernelLoadError) as caught:
        load(memory, tmp_path, image)
    assert type(caught.value) is error
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "vmlinux") in message
    return message


def test_segments_land_at_their_physical_addresses(
    memory: GuestMemory, tmp_path: Path
) -> None:
    text = bytes(range(256)) * 4
    data = b"DATA" * 8
    image = build_elf([Segment(KERNEL_BASE, text), Segment(0x300000, data)])

    info = load(memory, tmp_path, image)

    assert memory.read(GuestAddress(KERNEL_BASE), len(text)) == text
    assert memory.read(GuestAddress(0x300000), len(data)) == data
    assert info.kernel_end == 0x300000 + len(data)


def test_bss_beyond_file_bytes_is_zeroed(memory: GuestMemory, tmp_path: Path) -> None:
    # Memory handed to a loader may hold an older guest's bytes.
    memory.write(GuestAddress(KERNEL_BASE), b"\xff" * 0x3000)
    image = build_elf([Segment(KERNEL_BASE, b"code", memsz=0x2000)])

    info = load(memory, tmp_path, image)

    assert memory.read(GuestAddress(KERNEL_BASE), 4) == b"code"
    assert memory.read(GuestAddress(KERNEL_BASE + 4), 0x2000 - 4) == bytes(0x1FFC)
    assert memory.read(GuestAddress(KERNEL_BASE + 0x2000), 1) == b"\xff"
    assert info.kernel_end == KERNEL_BASE + 0x2000


def test_pvh_note_selects_pvh_entry(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf(
        [Segment(KERNEL_BASE, b"\x90" * 0x100), note_segment(pvh_note(PVH_ENTRY))],
        entry=0x1000000,
    )

    info = load(memory, tmp_path, image)

    assert info.protocol == "pvh"
    assert info.entry == PVH_ENTRY
    assert info.boot_struct == 0x6000
    assert memory.read_u32(GuestAddress(0x6000)) == 0x336EC578


def test_pvh_note_found_among_other_notes(memory: GuestMemory, tmp_path: Path) -> None:
    notes = (
        elf_note(b"GNU\0", 3, b"build-id-bytes")
        + elf_note(b"Xen\0", 6, b"linux\0")  # XEN_ELFNOTE_GUEST_OS
        + pvh_note(PVH_ENTRY)
    )
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(notes)])

    assert load(memory, tmp_path, image).entry == PVH_ENTRY


def test_pvh_note_with_64_bit_descriptor(memory: GuestMemory, tmp_path: Path) -> None:
    notes = pvh_note(PVH_ENTRY, desc_size=8)
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(notes)])

    info = load(memory, tmp_path, image)

    assert (info.protocol, info.entry) == ("pvh", PVH_ENTRY)


def test_notes_in_an_eight_aligned_segment(memory: GuestMemory, tmp_path: Path) -> None:
    notes = elf_note(b"GNU\0", 5, b"12345", alignment=8) + elf_note(
        b"Xen\0", 18, PVH_ENTRY.to_bytes(8, "little"), alignment=8
    )
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(notes, align=8)])

    assert load(memory, tmp_path, image).entry == PVH_ENTRY


def test_no_note_boots_linux64_at_e_entry(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90" * 16)], entry=KERNEL_BASE + 8)

    info = load(memory, tmp_path, image, cmdline="console=ttyS0 quiet")

    assert info.protocol == "linux64"
    assert info.entry == KERNEL_BASE + 8
    assert info.boot_struct == 0x7000
    zero_page = memory.read(GuestAddress(0x7000), 0x1000)
    assert struct.unpack_from("<H", zero_page, 0x1FE)[0] == 0xAA55  # boot_flag
    assert zero_page[0x202:0x206] == b"HdrS"
    assert zero_page[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", zero_page, 0x230)[0] == 0x1000000  # alignment
    assert struct.unpack_from("<I", zero_page, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", zero_page, 0x238)[0] == len("console=ttyS0 quiet")
    assert zero_page[0x1E8] == 2  # e820 entries


def test_pvh_initrd_is_module_zero(memory: GuestMemory, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 100)
    image = build_elf(
        [Segment(KERNEL_BASE, b"\x90"), note_segment(pvh_note(PVH_ENTRY))]
    )

    info = load(memory, tmp_path, image, initrd_path=str(initrd))

    assert info.initrd is not None
    address, size = info.initrd
    start_info = memory.read(GuestAddress(0x6000), 56)
    assert struct.unpack_from("<IQ", start_info, 12) == (1, 0x6040)
    module = struct.unpack("<QQQQ", memory.read(GuestAddress(0x6040), 32))
    assert module == (address, size, 0, 0)
    assert memory.read(address, size) == initrd.read_bytes()


def test_elf32_is_refused(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")], elf_class=1)
    message = expect_error(memory, tmp_path, image, UnsupportedElfError)
    assert "32-bit ELF" in message


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"data_encoding": 2}, "not little-endian"),
        ({"machine": 3}, "not x86-64"),
        ({"elf_type": 3}, "not an executable"),
        ({"elf_class": 7}, "unknown ELF class 7"),
    ],
)
def test_non_x86_64_executables_are_refused(
    memory: GuestMemory, tmp_path: Path, options: dict[str, int], words: str
) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")], **options)
    assert words in expect_error(memory, tmp_path, image, UnsupportedElfError)


def test_header_only_file_is_truncated(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")])[:64]
    message = expect_error(memory, tmp_path, image, ElfTruncatedError)
    assert "program header 0 lies beyond the end of the file" in message


def test_partial_header_is_truncated(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")])[:40]
    message = expect_error(memory, tmp_path, image, ElfTruncatedError)
    assert "ELF64 header" in message


def test_second_program_header_past_eof(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b""), Segment(0x200000, b"")])
    message = expect_error(memory, tmp_path, image[: 64 + 56 + 20], ElfTruncatedError)
    assert "program header 1 lies beyond the end of the file" in message


def test_segment_data_past_eof(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90" * 100)])
    message = expect_error(memory, tmp_path, image[:-1], ElfTruncatedError)
    assert "segment 0 data" in message


def test_more_file_bytes_than_memory_bytes(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90" * 100, memsz=10)])
    expect_error(memory, tmp_path, image, InvalidElfError)


def test_no_loadable_segment(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([note_segment(pvh_note(PVH_ENTRY))])
    assert "no PT_LOAD" in expect_error(memory, tmp_path, image, InvalidElfError)


def test_wrong_program_header_size(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")], phentsize=32)
    expect_error(memory, tmp_path, image, InvalidElfError)


def test_segment_outside_guest_memory(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(MEMORY_SIZE - 0x10, b"\x90" * 0x20)])
    message = expect_error(memory, tmp_path, image, KernelPlacementError)
    assert f"segment 0 at {MEMORY_SIZE - 0x10:#x}" in message
    assert "does not fit in guest memory" in message


def test_bss_outside_guest_memory(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90", memsz=MEMORY_SIZE)])
    expect_error(memory, tmp_path, image, KernelPlacementError)


def test_segment_over_boot_structures(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(0x7000, b"\x90")], entry=0x7000)
    assert "below 0x100000" in expect_error(
        memory, tmp_path, image, KernelPlacementError
    )


def test_entry_outside_guest_memory(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90")], entry=0xFFFFFFFF81000000)
    assert "entry point" in expect_error(memory, tmp_path, image, InvalidElfError)


@pytest.mark.parametrize("desc_size", [2, 16])
def test_pvh_note_with_odd_descriptor(
    memory: GuestMemory, tmp_path: Path, desc_size: int
) -> None:
    notes = elf_note(b"Xen\0", 18, bytes(desc_size))
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(notes)])
    message = expect_error(memory, tmp_path, image, InvalidPvhNoteError)
    assert f"{desc_size}-byte descriptor" in message


def test_pvh_entry_above_4_gib(memory: GuestMemory, tmp_path: Path) -> None:
    notes = pvh_note(1 << 32, desc_size=8)
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(notes)])
    expect_error(memory, tmp_path, image, InvalidPvhNoteError)


def test_pvh_entry_outside_guest_memory(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(pvh_note(1 << 31))])
    expect_error(memory, tmp_path, image, InvalidPvhNoteError)


def test_note_running_past_its_segment(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_elf([Segment(KERNEL_BASE, b"\x90"), note_segment(pvh_note(0)[:-2])])
    assert "runs past the end" in expect_error(memory, tmp_path, image, InvalidElfError)


def test_zero_sized_load_segments_are_ignored(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = build_elf([Segment(0, b"", type=PT_LOAD), Segment(KERNEL_BASE, b"\x90")])
    assert load(memory, tmp_path, image).kernel_end == KERNEL_BASE + 1

"""load_kernel's shared steps: files, command line, initrd, e820, PVH start info."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.arch.x86_64.e820 import E820_RAM, E820Entry, e820_entries
from ember.arch.x86_64.layout import GiB, MiB, ram_layout
from ember.arch.x86_64.mptable import VcpuCountError
from ember.boot import (
    MAX_KERNEL_FILE_BYTES,
    BootInfo,
    CommandLineInvalidError,
    CommandLineTooLongError,
    GuestMemoryTooSmallError,
    InitrdReadError,
    InitrdTooLargeError,
    KernelEmptyError,
    KernelLoadError,
    KernelReadError,
    KernelTooLargeError,
    UnknownKernelFormatError,
    load_kernel,
)
from ember.boot.pvh import MEMMAP_ENTRY, MODLIST_ENTRY, START_INFO
from ember.memory import GuestAddress, GuestMemory
from test_boot_images import Segment, build_bzimage, build_elf, note_segment, pvh_note

MEMORY_SIZE = 32 * MiB
PVH_ENTRY = 0x100000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(ram_layout(MEMORY_SIZE)) as guest_memory:
        yield guest_memory


@pytest.fixture
def pvh_kernel(tmp_path: Path) -> str:
    path = tmp_path / "guest.elf"
    path.write_bytes(
        build_elf([Segment(0x100000, b"\xf4" * 64), note_segment(pvh_note(PVH_ENTRY))])
    )
    return str(path)


@pytest.fixture
def linux64_kernel(tmp_path: Path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(build_elf([Segment(0x1000000, b"\xf4" * 64)], entry=0x1000000))
    return str(path)


def boot(
    memory: GuestMemory,
    kernel: str,
    *,
    initrd: str | None = None,
    cmdline: str = "console=ttyS0",
    vcpu_count: int = 1,
) -> BootInfo:
    return load_kernel(
        memory, kernel, initrd_path=initrd, cmdline=cmdline, vcpu_count=vcpu_count
    )


def one_line_naming(error: BaseException, path: str) -> bool:
    message = str(error)
    return "\n" not in message and path in message


# --- the kernel file --------------------------------------------------------


def test_missing_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(KernelReadError, match="No such file") as caught:
        boot(memory, path)
    assert one_line_naming(caught.value, path)


def test_directory_as_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(KernelReadError, match="not a regular file"):
        boot(memory, str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_unreadable_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(KernelReadError, match="Permission denied"):
        boot(memory, str(path))


def test_empty_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(KernelEmptyError) as caught:
        boot(memory, str(path))
    assert str(caught.value) == f"kernel {path} is empty"


def test_oversized_kernel_is_refused_before_reading(
    memory: GuestMemory, tmp_path: Path
) -> None:
    path = tmp_path / "disk.img"
    with path.open("wb") as file:
        file.truncate(MAX_KERNEL_FILE_BYTES + 1)  # sparse: costs no disk space
    with pytest.raises(KernelTooLargeError) as caught:
        boot(memory, str(path))
    assert one_line_naming(caught.value, str(path))


def test_random_bytes_are_no_known_format(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "noise"
    path.write_bytes(b"\x00\x01\x02\x03" + os.urandom(2000))
    with pytest.raises(UnknownKernelFormatError) as caught:
        boot(memory, str(path))
    assert str(caught.value) == (
        f"kernel {path}: not an ELF or bzImage (first bytes 00 01 02 03)"
    )


def test_format_is_sniffed_not_taken_from_the_name(
    memory: GuestMemory, tmp_path: Path
) -> None:
    path = tmp_path / "vmlinux.elf"
    path.write_bytes(build_bzimage())
    assert boot(memory, str(path)).entry == 0x100200


# --- vCPUs and memory -------------------------------------------------------


@pytest.mark.parametrize("vcpu_count", [0, 33])
def test_vcpu_count_checked_before_any_file(
    memory: GuestMemory, tmp_path: Path, vcpu_count: int
) -> None:
    with pytest.raises(VcpuCountError):
        boot(memory, str(tmp_path / "nope"), vcpu_count=vcpu_count)


def test_memory_without_the_first_megabyte(pvh_kernel: str) -> None:
    with (
        GuestMemory.anonymous([(0, 512 * 1024)]) as small,
        pytest.raises(GuestMemoryTooSmallError) as caught,
    ):
        boot(small, pvh_kernel)
    assert one_line_naming(caught.value, pvh_kernel)


def test_mptable_is_written(memory: GuestMemory, pvh_kernel: str) -> None:
    boot(memory, pvh_kernel, vcpu_count=4)
    assert memory.read(GuestAddress(0x9FC00), 4) == b"_MP_"


# --- command line -----------------------------------------------------------


def test_cmdline_written_nul_terminated(memory: GuestMemory, pvh_kernel: str) -> None:
    memory.write(GuestAddress(0x20000), b"\xff" * 32)
    boot(memory, pvh_kernel, cmdline="console=ttyS0 reboot=k")
    assert memory.read(GuestAddress(0x20000), 23) == b"console=ttyS0 reboot=k\0"


def test_longest_cmdline_fits(memory: GuestMemory, pvh_kernel: str) -> None:
    boot(memory, pvh_kernel, cmdline="a" * 4095)
    assert memory.read(GuestAddress(0x20000 + 4095), 1) == b"\0"


def test_oversized_cmdline(memory: GuestMemory, pvh_kernel: str) -> None:
    with pytest.raises(CommandLineTooLongError) as caught:
        boot(memory, pvh_kernel, cmdline="a" * 4096)
    assert one_line_naming(caught.value, pvh_kernel)
    assert "4096 bytes, the limit is 4095" in str(caught.value)


def test_cmdline_with_nul(memory: GuestMemory, pvh_kernel: str) -> None:
    with pytest.raises(CommandLineInvalidError, match="NUL byte at offset 4"):
        boot(memory, pvh_kernel, cmdline="quie\0t")


def test_cmdline_that_is_not_utf8(memory: GuestMemory, pvh_kernel: str) -> None:
    with pytest.raises(CommandLineInvalidError, match="UTF-8"):
        boot(memory, pvh_kernel, cmdline="bad\udcff")


# --- initrd -----------------------------------------------------------------


def test_initrd_at_top_of_low_ram(
    memory: GuestMemory, pvh_kernel: str, tmp_path: Path
) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"R" * 8192)
    info = boot(memory, pvh_kernel, initrd=str(initrd))
    assert info.initrd == (MEMORY_SIZE - 8192, 8192)


def test_initrd_below_the_mmio_gap(pvh_kernel: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"R" * 5000)
    with GuestMemory.anonymous(ram_layout(4 * GiB)) as big:
        info = boot(big, pvh_kernel, initrd=str(initrd))
    assert info.initrd == (3 * GiB - 8192, 5000)


def test_initrd_too_large(memory: GuestMemory, pvh_kernel: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    with initrd.open("wb") as file:
        file.truncate(MEMORY_SIZE)
    with pytest.raises(InitrdTooLargeError) as caught:
        boot(memory, pvh_kernel, initrd=str(initrd))
    assert one_line_naming(caught.value, str(initrd))
    assert "does not fit below" in str(caught.value)


def test_initrd_would_overlap_kernel(
    memory: GuestMemory, linux64_kernel: str, tmp_path: Path
) -> None:
    # The kernel occupies 16 MiB..16 MiB+64 of 32 MiB; 16 MiB of initrd collides.
    initrd = tmp_path / "initrd"
    with initrd.open("wb") as file:
        file.truncate(16 * MiB)
    with pytest.raises(InitrdTooLargeError, match="overlapping the kernel"):
        boot(memory, linux64_kernel, initrd=str(initrd))


def test_missing_initrd(memory: GuestMemory, pvh_kernel: str, tmp_path: Path) -> None:
    path = str(tmp_path / "no-initrd")
    with pytest.raises(InitrdReadError) as caught:
        boot(memory, pvh_kernel, initrd=path)
    assert one_line_naming(caught.value, path)


def test_empty_initrd(memory: GuestMemory, pvh_kernel: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    with pytest.raises(InitrdReadError, match="is empty"):
        boot(memory, pvh_kernel, initrd=str(initrd))


# --- e820 and the PVH start info --------------------------------------------


def test_e820_below_the_gap() -> None:
    assert e820_entries(ram_layout(256 * MiB)) == [
        E820Entry(GuestAddress(0), 0x9FC00, E820_RAM),
        E820Entry(GuestAddress(0x100000), 256 * MiB - 0x100000, E820_RAM),
    ]


def test_e820_above_the_gap() -> None:
    assert e820_entries(ram_layout(5 * GiB)) == [
        E820Entry(GuestAddress(0), 0x9FC00, E820_RAM),
        E820Entry(GuestAddress(0x100000), 3 * GiB - 0x100000, E820_RAM),
        E820Entry(GuestAddress(4 * GiB), 2 * GiB, E820_RAM),
    ]


def test_e820_needs_ram_at_zero() -> None:
    with pytest.raises(ValueError, match="start at guest address 0"):
        e820_entries([(0x100000, MiB)])


def read_pvh_memmap(memory: GuestMemory) -> list[tuple[int, int, int]]:
    start_info = START_INFO.unpack(memory.read(GuestAddress(0x6000), START_INFO.size))
    memmap_address, count = start_info[7], start_info[8]
    raw = memory.read(GuestAddress(memmap_address), count * MEMMAP_ENTRY.size)
    return [entry[:3] for entry in MEMMAP_ENTRY.iter_unpack(raw)]


def read_zero_page_e820(memory: GuestMemory) -> list[tuple[int, int, int]]:
    page = memory.read(GuestAddress(0x7000), 0x1000)
    return [
        struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(page[0x1E8])
    ]


@pytest.mark.parametrize("memory_size", [256 * MiB, 3 * GiB, 5 * GiB])
def test_pvh_and_zero_page_carry_the_same_map(
    pvh_kernel: str, linux64_kernel: str, memory_size: int
) -> None:
    expected = [
        (entry.address, entry.size, entry.type)
        for entry in e820_entries(ram_layout(memory_size))
    ]
    with GuestMemory.anonymous(ram_layout(memory_size)) as guest_memory:
        boot(guest_memory, pvh_kernel)
        assert read_pvh_memmap(guest_memory) == expected
        boot(guest_memory, linux64_kernel)
        assert read_zero_page_e820(guest_memory) == expected


def test_pvh_start_info_fields(memory: GuestMemory, pvh_kernel: str) -> None:
    info = boot(memory, pvh_kernel)
    fields = START_INFO.unpack(memory.read(info.boot_struct, START_INFO.size))
    assert fields == (
        0x336EC578,  # magic
        1,  # version
        0,  # flags
        0,  # nr_modules
        0,  # modlist_paddr
        0x20000,  # cmdline_paddr
        0,  # rsdp_paddr
        0x7000,  # memmap_paddr
        2,  # memmap_entries
        0,
    )


def test_rsdp_address_reaches_both_boot_structures(
    memory: GuestMemory, pvh_kernel: str, linux64_kernel: str
) -> None:
    rsdp = GuestAddress(0x000E0000)
    load_kernel(
        memory,
        pvh_kernel,
        initrd_path=None,
        cmdline="",
        vcpu_count=1,
        rsdp_address=rsdp,
    )
    assert memory.read_u64(GuestAddress(0x6000 + 32)) == rsdp
    load_kernel(
        memory,
        linux64_kernel,
        initrd_path=None,
        cmdline="",
        vcpu_count=1,
        rsdp_address=rsdp,
    )
    assert memory.read_u64(GuestAddress(0x7000 + 0x70)) == rsdp  # acpi_rsdp_addr


def test_pvh_struct_layouts() -> None:
    # Sizes of Xen's hvm_start_info, hvm_modlist_entry and hvm_memmap_table_entry.
    assert (START_INFO.size, MODLIST_ENTRY.size, MEMMAP_ENTRY.size) == (56, 32, 24)
    # The start info must end before the module list placed after it.
    assert 0x6000 + START_INFO.size <= 0x6040


def test_every_error_is_a_kernel_load_error() -> None:
    import ember.boot as boot_package

    for name in boot_package.__all__:
        value = getattr(boot_package, name)
        if name.endswith("Error"):
            assert issubclass(value, KernelLoadError), name

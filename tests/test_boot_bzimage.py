"""Loading synthetic bzImages: placement, zero page, broken setup headers."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.arch.x86_64.layout import MiB, ram_layout
from ember.boot import (
    BootInfo,
    BzImageMagicError,
    BzImageNot64BitError,
    BzImageTruncatedError,
    BzImageVersionError,
    CommandLineTooLongError,
    InitrdTooLargeError,
    KernelLoadError,
    KernelPlacementError,
    load_kernel,
)
from ember.memory import GuestAddress, GuestMemory
from test_boot_images import BzImageSpec, build_bzimage

MEMORY_SIZE = 64 * MiB
ZERO_PAGE = GuestAddress(0x7000)


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
    initrd: bytes | None = None,
) -> BootInfo:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        (tmp_path / "initrd").write_bytes(initrd)
        initrd_path = str(tmp_path / "initrd")
    return load_kernel(
        memory, str(kernel), initrd_path=initrd_path, cmdline=cmdline, vcpu_count=2
    )


def expect_error(
    memory: GuestMemory, tmp_path: Path, image: bytes, error: type[KernelLoadError]
) -> str:
    with pytest.raises(KernelLoadError) as caught:
        load(memory, tmp_path, image)
    assert type(caught.value) is error
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "bzImage") in message
    return message


def zero_page_u32(memory: GuestMemory, offset: int) -> int:
    return memory.read_u32(GuestAddress(ZERO_PAGE + offset))


def test_protected_mode_kernel_lands_at_one_mib(
    memory: GuestMemory, tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 8
    info = load(memory, tmp_path, build_bzimage(BzImageSpec(payload=payload)))

    assert memory.read(GuestAddress(0x100000), len(payload)) == payload
    assert info.protocol == "linux64"
    assert info.entry == 0x100000 + 0x200  # startup_64
    assert info.boot_struct == ZERO_PAGE
    assert info.kernel_end == 0x100000 + len(payload)


def test_zero_setup_sects_means_four(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(payload=b"PMODE" * 100, setup_sects=0))
    load(memory, tmp_path, image)
    assert memory.read(GuestAddress(0x100000), 5) == b"PMODE"


def test_init_size_reserves_room_to_decompress(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = build_bzimage(BzImageSpec(init_size=0x800000))
    assert load(memory, tmp_path, image).kernel_end == 0x100000 + 0x800000


def test_zero_page_carries_the_image_header(
    memory: GuestMemory, tmp_path: Path
) -> None:
    load(memory, tmp_path, build_bzimage(), cmdline="root=/dev/vda")

    page = memory.read(ZERO_PAGE, 0x1000)
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x20F  # version
    assert struct.unpack_from("<H", page, 0x1FA)[0] == 0xFFFF  # vid_mode, kept
    assert struct.unpack_from("<I", page, 0x238)[0] == 2047  # cmdline_size, kept
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] == 0x01 | 0x80  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<H", page, 0x224)[0] == 0xFE00  # heap_end_ptr
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert memory.read(GuestAddress(0x20000), 14) == b"root=/dev/vda\0"


def test_zero_page_e820_table(memory: GuestMemory, tmp_path: Path) -> None:
    load(memory, tmp_path, build_bzimage())

    page = memory.read(ZERO_PAGE, 0x1000)
    assert page[0x1E8] == 2
    entries = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(3)]
    assert entries == [
        (0, 0x9FC00, 1),
        (0x100000, MEMORY_SIZE - 0x100000, 1),
        (0, 0, 0),
    ]


def test_initrd_recorded_in_zero_page(memory: GuestMemory, tmp_path: Path) -> None:
    initrd = b"CPIO" * 1000
    info = load(memory, tmp_path, build_bzimage(), initrd=initrd)

    assert info.initrd is not None
    address, size = info.initrd
    assert address % 4096 == 0
    assert address + size <= MEMORY_SIZE
    assert MEMORY_SIZE - (address + size) < 4096  # as high as alignment allows
    assert (zero_page_u32(memory, 0x218), zero_page_u32(memory, 0x21C)) == (
        address,
        size,
    )
    assert memory.read(address, size) == initrd


def test_initrd_respects_initrd_addr_max(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(initrd_addr_max=16 * MiB - 1))
    info = load(memory, tmp_path, image, initrd=b"x" * 5000)

    assert info.initrd is not None
    address, size = info.initrd
    assert address + size <= 16 * MiB
    assert address == 16 * MiB - 8192


def test_initrd_must_not_reach_into_decompression_room(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = build_bzimage(BzImageSpec(init_size=60 * MiB))
    with pytest.raises(InitrdTooLargeError, match="overlapping the kernel"):
        load(memory, tmp_path, image, initrd=bytes(4 * MiB))


def test_cmdline_limited_by_kernel_cmdline_size(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = build_bzimage(BzImageSpec(cmdline_size=10))
    load(memory, tmp_path, image, cmdline="0123456789")
    with pytest.raises(CommandLineTooLongError, match="11 bytes, the limit is 10"):
        load(memory, tmp_path, image, cmdline="0123456789A")


def test_boot_sector_without_hdrs_magic(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(magic=b"\0\0\0\0"))
    message = expect_error(memory, tmp_path, image, BzImageMagicError)
    assert message.endswith("bzImage setup header has no 'HdrS' magic")


def test_old_boot_protocol(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(version=0x205))
    message = expect_error(memory, tmp_path, image, BzImageVersionError)
    assert "boot protocol 2.05 is older than 2.06" in message


def test_image_without_64_bit_entry(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(xloadflags=0))
    assert "XLF_KERNEL_64" in expect_error(
        memory, tmp_path, image, BzImageNot64BitError
    )


def test_protocol_before_xloadflags_is_not_64_bit(
    memory: GuestMemory, tmp_path: Path
) -> None:
    # Before 2.12 the xloadflags bytes belong to other fields and mean nothing.
    image = build_bzimage(BzImageSpec(version=0x20A, xloadflags=1))
    expect_error(memory, tmp_path, image, BzImageNot64BitError)


def test_image_ending_inside_setup_code(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(payload=b""))
    assert "no protected-mode kernel" in expect_error(
        memory, tmp_path, image, BzImageTruncatedError
    )


def test_image_shorter_than_its_header(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage()[:0x204]
    expect_error(memory, tmp_path, image, BzImageMagicError)


def test_kernel_larger_than_guest_memory(memory: GuestMemory, tmp_path: Path) -> None:
    image = build_bzimage(BzImageSpec(init_size=MEMORY_SIZE))
    message = expect_error(memory, tmp_path, image, KernelPlacementError)
    assert "does not fit in guest memory" in message

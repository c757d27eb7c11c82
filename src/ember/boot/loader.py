"""`load_kernel`: everything a vCPU needs in guest memory before its first run.

The steps, in order: check the vCPU count and the low memory the boot structures
need; sniff the kernel's format from its first bytes and load it; check the
command line against the kernel's limit; place the initrd; write the command
line, the boot structure of the kernel's protocol (PVH start info or zero page,
both with the same e820 map) and the MP table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.arch.x86_64.e820 import e820_entries
from ember.arch.x86_64.layout import HIMEM_START
from ember.arch.x86_64.mptable import check_vcpu_count, write_mptable
from ember.boot import setup_header as hdr
from ember.boot.bzimage import is_bzimage, load_bzimage
from ember.boot.cmdline import encode_cmdline, write_cmdline
from ember.boot.elf import is_elf, load_elf
from ember.boot.errors import (
    GuestMemoryTooSmallError,
    KernelEmptyError,
    KernelReadError,
    KernelTooLargeError,
    UnknownKernelFormatError,
)
from ember.boot.image_file import ImageFile
from ember.boot.initrd import load_initrd
from ember.boot.kernel_image import LoadedKernel, Protocol
from ember.boot.pvh import write_pvh_start_info
from ember.boot.zero_page import build_zero_page, write_zero_page
from ember.memory import GuestAddress, GuestMemory

# Far above any kernel image (a vmlinux with full debug information is a few
# hundred MiB), low enough that a wrong path to a disk image is caught at once.
MAX_KERNEL_FILE_BYTES = 1024 * 1024 * 1024

# Enough of the file to tell an ELF (magic at 0) from a bzImage (boot flag at
# 0x1fe, "HdrS" at 0x202).
_SNIFF_BYTES = hdr.SETUP_HEADER_LIMIT

NO_RSDP = GuestAddress(0)


@dataclass(frozen=True)
class BootInfo:
    """Where the guest starts and what it finds there.

    For "pvh": start the vCPU in 32-bit protected mode (paging off) at `entry`
    with EBX = `boot_struct` (the hvm_start_info). For "linux64": start it in
    64-bit long mode with identity-mapped paging at `entry` with RSI =
    `boot_struct` (the zero page). `kernel_end` is the first address past the
    kernel (for a bzImage, past the room it decompresses into).
    """

    protocol: Protocol
    entry: GuestAddress
    boot_struct: GuestAddress
    kernel_end: GuestAddress
    initrd: tuple[GuestAddress, int] | None


def load_kernel(
    memory: GuestMemory,
    kernel_path: str,
    *,
    initrd_path: str | None,
    cmdline: str,
    vcpu_count: int,
    rsdp_address: GuestAddress = NO_RSDP,
) -> BootInfo:
    """Load kernel, initrd, command line, boot structure and MP table.

    Raises a `KernelLoadError` subclass naming the failed step, or
    `VcpuCountError` before touching any file if `vcpu_count` is out of range.
    `rsdp_address` is the ACPI RSDP's address, 0 while there are no ACPI tables.
    """
    check_vcpu_count(vcpu_count)
    _check_low_memory(memory, kernel_path)
    kernel = _load_kernel_image(memory, kernel_path)
    encoded_cmdline = encode_cmdline(cmdline, kernel_path, kernel.cmdline_limit)
    initrd = None if initrd_path is None else load_initrd(memory, initrd_path, kernel)

    cmdline_address = write_cmdline(memory, encoded_cmdline)
    boot_struct = _write_boot_struct(
        memory, kernel, cmdline_address, len(encoded_cmdline), initrd, rsdp_address
    )
    write_mptable(memory, vcpu_count)
    return BootInfo(kernel.protocol, kernel.entry, boot_struct, kernel.end, initrd)


def _write_boot_struct(
    memory: GuestMemory,
    kernel: LoadedKernel,
    cmdline_address: GuestAddress,
    cmdline_length: int,
    initrd: tuple[GuestAddress, int] | None,
    rsdp_address: GuestAddress,
) -> GuestAddress:
    """The PVH start info or the zero page, whichever the kernel's protocol reads."""
    e820 = e820_entries([(region.guest_base, region.size) for region in memory])
    if kernel.protocol == "pvh":
        return write_pvh_start_info(
            memory,
            cmdline_address=cmdline_address,
            initrd=initrd,
            e820=e820,
            rsdp_address=rsdp_address,
        )
    zero_page = build_zero_page(
        setup_header=kernel.setup_header,
        cmdline_address=cmdline_address,
        # An ELF kernel states no limit of its own; report the line actually given.
        cmdline_size=cmdline_length,
        initrd=initrd,
        e820=e820,
        rsdp_address=rsdp_address,
    )
    return write_zero_page(memory, zero_page)


def _check_low_memory(memory: GuestMemory, kernel_path: str) -> None:
    """Boot structures, command line and MP table all live in the first MiB."""
    regions = memory.regions
    if not regions or regions[0].guest_base != 0 or regions[0].size < HIMEM_START:
        covered = (
            f"{regions[0].guest_base:#x}-{regions[0].guest_end:#x}"
            if regions
            else "nothing"
        )
        raise GuestMemoryTooSmallError(
            f"kernel {kernel_path}: guest RAM must cover 0x0-{HIMEM_START:#x} for "
            f"boot structures, its first region covers {covered}"
        )


def _load_kernel_image(memory: GuestMemory, kernel_path: str) -> LoadedKernel:
    with ImageFile(kernel_path, "kernel", KernelReadError) as image:
        if image.size == 0:
            raise KernelEmptyError(f"kernel {kernel_path} is empty")
        if image.size > MAX_KERNEL_FILE_BYTES:
            raise KernelTooLargeError(
                f"kernel {kernel_path} is {image.size} bytes, more than the "
                f"{MAX_KERNEL_FILE_BYTES} Ember accepts"
            )
        first_bytes = image.read_at(0, _SNIFF_BYTES)
        if is_elf(first_bytes):
            return load_elf(memory, image)
        if is_bzimage(first_bytes):
            return load_bzimage(memory, image)
        raise UnknownKernelFormatError(
            f"kernel {kernel_path}: not an ELF or bzImage "
            f"(first bytes {first_bytes[:4].hex(' ')})"
        )

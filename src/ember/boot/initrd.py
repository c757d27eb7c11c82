"""Placing the initrd: page-aligned, as high in low RAM as the kernel allows.

High placement keeps the initrd clear of the kernel, which the kernel expects to
find at the bottom (at 1 MiB or its ELF addresses) and which decompresses and
allocates upwards from there.
"""

from __future__ import annotations

from ember.arch.x86_64.layout import MMIO32_START
from ember.boot.errors import InitrdReadError, InitrdTooLargeError
from ember.boot.image_file import ImageFile
from ember.boot.kernel_image import LoadedKernel
from ember.memory import GuestAddress, GuestMemory

# The kernel maps and frees the initrd in pages, so it starts on a page boundary.
INITRD_ALIGNMENT = 4096


def load_initrd(
    memory: GuestMemory, initrd_path: str, kernel: LoadedKernel
) -> tuple[GuestAddress, int]:
    """Copy the initrd into guest memory; returns its address and size."""
    with ImageFile(initrd_path, "initrd", InitrdReadError) as image:
        if image.size == 0:
            raise InitrdReadError(f"initrd {initrd_path} is empty")
        address = initrd_address(memory, initrd_path, image.size, kernel)
        image.copy_to_memory(memory, address, 0, image.size)
        return address, image.size


def initrd_address(
    memory: GuestMemory, initrd_path: str, size: int, kernel: LoadedKernel
) -> GuestAddress:
    """The highest page-aligned address where `size` bytes fit above the kernel."""
    # The first region holds all RAM below the 32-bit MMIO gap.
    top = min(memory.regions[0].guest_end, MMIO32_START, kernel.initrd_end_limit)
    address = (top - size) // INITRD_ALIGNMENT * INITRD_ALIGNMENT
    if address < kernel.end:
        raise InitrdTooLargeError(
            f"initrd {initrd_path} ({size:#x} bytes) does not fit below {top:#x} "
            f"without overlapping the kernel, which ends at {kernel.end:#x}"
        )
    return GuestAddress(address)

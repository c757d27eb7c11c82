"""Kernel loading for x86-64: ELF (PVH or 64-bit entry) and bzImage.

`load_kernel` is the one entry point; it returns a `BootInfo` telling the vCPU
setup which protocol to start and where. Every failure is a `KernelLoadError`
subclass named after the step that failed.
"""

from ember.boot.errors import (
    BzImageMagicError,
    BzImageNot64BitError,
    BzImageTruncatedError,
    BzImageVersionError,
    CommandLineInvalidError,
    CommandLineTooLongError,
    ElfTruncatedError,
    GuestMemoryTooSmallError,
    InitrdReadError,
    InitrdTooLargeError,
    InvalidElfError,
    InvalidPvhNoteError,
    KernelEmptyError,
    KernelLoadError,
    KernelPlacementError,
    KernelReadError,
    KernelTooLargeError,
    UnknownKernelFormatError,
    UnsupportedElfError,
)
from ember.boot.loader import MAX_KERNEL_FILE_BYTES, NO_RSDP, BootInfo, load_kernel

__all__ = [
    "MAX_KERNEL_FILE_BYTES",
    "NO_RSDP",
    "BootInfo",
    "BzImageMagicError",
    "BzImageNot64BitError",
    "BzImageTruncatedError",
    "BzImageVersionError",
    "CommandLineInvalidError",
    "CommandLineTooLongError",
    "ElfTruncatedError",
    "GuestMemoryTooSmallError",
    "InitrdReadError",
    "InitrdTooLargeError",
    "InvalidElfError",
    "InvalidPvhNoteError",
    "KernelEmptyError",
    "KernelLoadError",
    "KernelPlacementError",
    "KernelReadError",
    "KernelTooLargeError",
    "UnknownKernelFormatError",
    "UnsupportedElfError",
    "load_kernel",
]

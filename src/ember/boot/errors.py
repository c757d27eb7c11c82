"""Why a kernel could not be loaded: one class per step that can fail.

Every message is one line that names the file and the problem, so the API can
hand it to the user as it is.
"""


class KernelLoadError(Exception):
    """Loading the kernel, its initrd or its command line into guest memory failed."""


class KernelReadError(KernelLoadError):
    """The kernel file is missing or cannot be read."""


class KernelEmptyError(KernelLoadError):
    """The kernel file holds no bytes."""


class KernelTooLargeError(KernelLoadError):
    """The kernel file is larger than any kernel Ember will load."""


class UnknownKernelFormatError(KernelLoadError):
    """The file starts with neither the ELF magic nor a bzImage boot sector."""


class UnsupportedElfError(KernelLoadError):
    """The ELF file is valid but not an x86-64 little-endian ELF64 executable."""


class ElfTruncatedError(KernelLoadError):
    """A header, program header or segment lies beyond the end of the file."""


class InvalidElfError(KernelLoadError):
    """The ELF headers or notes hold values no loadable kernel has."""


class InvalidPvhNoteError(KernelLoadError):
    """The kernel's PVH entry note is malformed."""


class BzImageMagicError(KernelLoadError):
    """The image has a boot sector but no 'HdrS' setup header."""


class BzImageVersionError(KernelLoadError):
    """The image speaks a boot protocol older than Ember needs (2.06)."""


class BzImageNot64BitError(KernelLoadError):
    """The image has no 64-bit entry point."""


class BzImageTruncatedError(KernelLoadError):
    """The image ends inside its setup code or holds no protected-mode kernel."""


class KernelPlacementError(KernelLoadError):
    """A part of the kernel would land outside guest RAM or on boot structures."""


class InitrdReadError(KernelLoadError):
    """The initrd file is missing, unreadable or empty."""


class InitrdTooLargeError(KernelLoadError):
    """The initrd does not fit in low RAM between the kernel and its limit."""


class CommandLineTooLongError(KernelLoadError):
    """The command line is longer than the kernel or the boot area accepts."""


class CommandLineInvalidError(KernelLoadError):
    """The command line holds a NUL byte (which would cut it short) or cannot be
    encoded as UTF-8."""


class GuestMemoryTooSmallError(KernelLoadError):
    """Guest RAM does not cover the low megabyte where boot structures live."""

"""The kernel command line: checked, then written NUL-terminated at CMDLINE_START."""

from ember.arch.x86_64.layout import CMDLINE_MAX_SIZE, CMDLINE_START
from ember.boot.errors import CommandLineInvalidError, CommandLineTooLongError
from ember.memory import GuestAddress, GuestMemory

# The boot area holds CMDLINE_MAX_SIZE bytes, and one of them is the final NUL.
MAX_CMDLINE_LENGTH = CMDLINE_MAX_SIZE - 1


def encode_cmdline(cmdline: str, kernel_path: str, kernel_limit: int) -> bytes:
    """The command line's bytes, refused if the kernel could not take all of it.

    `kernel_limit` is the longest line (without its NUL) the kernel accepts; a
    bzImage states it in its header, other kernels get MAX_CMDLINE_LENGTH.
    """
    try:
        encoded = cmdline.encode()
    except UnicodeEncodeError as exc:
        raise CommandLineInvalidError(
            f"kernel {kernel_path}: command line cannot be encoded as UTF-8: {exc}"
        ) from exc
    if b"\0" in encoded:
        raise CommandLineInvalidError(
            f"kernel {kernel_path}: command line contains a NUL byte at offset "
            f"{encoded.index(0)}"
        )
    limit = min(kernel_limit, MAX_CMDLINE_LENGTH)
    if len(encoded) > limit:
        raise CommandLineTooLongError(
            f"kernel {kernel_path}: command line is {len(encoded)} bytes, "
            f"the limit is {limit}"
        )
    return encoded


def write_cmdline(memory: GuestMemory, encoded: bytes) -> GuestAddress:
    """Write the checked command line; returns where it starts."""
    memory.write(CMDLINE_START, encoded + b"\0")
    return CMDLINE_START

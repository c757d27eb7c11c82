"""What a format loader reports once a kernel image is in guest memory."""

from dataclasses import dataclass
from typing import Literal

from ember.memory import GuestAddress

Protocol = Literal["pvh", "linux64"]


@dataclass(frozen=True)
class LoadedKernel:
    """A kernel copied into guest memory, and the limits it sets for the rest.

    `start`/`end` bound the memory the kernel claims (for a bzImage that
    includes the room it needs to decompress itself), so the initrd stays out.
    `setup_header` is the bzImage's own setup header, copied into the zero page;
    None for ELF kernels, whose zero page header is made up from scratch.
    """

    protocol: Protocol
    entry: GuestAddress
    start: GuestAddress
    end: GuestAddress
    cmdline_limit: int
    initrd_end_limit: GuestAddress
    setup_header: bytes | None = None

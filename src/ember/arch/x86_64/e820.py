"""The guest's physical memory map, as the BIOS e820 call would report it.

Both boot paths hand the kernel this map: the Linux zero page as e820 entries,
PVH as the start info's memmap table, whose entries carry the same type numbers.
Like Firecracker, the map lists RAM only: everything between EBDA_START and
1 MiB (EBDA, where the MP table lives, VGA hole, BIOS area, and there the VMGenID
and VMClock pages and the ACPI tables) and the 32-bit MMIO gap are simply
absent, which tells the kernel not to use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.arch.x86_64.layout import EBDA_START, HIMEM_START
from ember.memory import GuestAddress

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    address: GuestAddress
    size: int
    type: int

    @property
    def end(self) -> GuestAddress:
        return GuestAddress(self.address + self.size)


def e820_entries(ram_regions: Sequence[tuple[int, int]]) -> list[E820Entry]:
    """The memory map for RAM `ram_regions`, (guest base, size) in address order.

    The first region must start at 0 (as `ram_layout` builds it); it is split
    around the legacy hole between EBDA_START and 1 MiB. Later regions (RAM above
    the 4 GiB mark) are reported whole.
    """
    if not ram_regions or ram_regions[0][0] != 0:
        raise ValueError("the first RAM region must start at guest address 0")
    low_end = ram_regions[0][1]
    entries = [E820Entry(GuestAddress(0), min(low_end, EBDA_START), E820_RAM)]
    if low_end > HIMEM_START:
        entries.append(E820Entry(HIMEM_START, low_end - HIMEM_START, E820_RAM))
    for base, size in ram_regions[1:]:
        entries.append(E820Entry(GuestAddress(base), size, E820_RAM))
    return entries

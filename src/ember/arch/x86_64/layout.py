"""Where things live in an x86-64 guest's physical address space.

The numbers follow Firecracker's x86-64 layout, so a guest (or a tool) that knows
one knows the other: RAM runs from 0 up to the 32-bit MMIO gap at 3 GiB and resumes
at 4 GiB; boot structures sit in the first megabyte.
"""

from ember.memory.address import GuestAddress

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Boot structures in low memory.
BOOT_GDT_START = GuestAddress(0x500)
BOOT_IDT_START = GuestAddress(0x520)
PVH_INFO_START = GuestAddress(0x6000)
PVH_MODLIST_START = GuestAddress(0x6040)
PVH_MEMMAP_START = GuestAddress(0x7000)
ZERO_PAGE_START = GuestAddress(0x7000)  # Linux boot protocol alternative to PVH
BOOT_STACK_POINTER = GuestAddress(0x8FF0)
PML4_START = GuestAddress(0x9000)
PDPTE_START = GuestAddress(0xA000)
PDE_START = GuestAddress(0xB000)
CMDLINE_START = GuestAddress(0x20000)
CMDLINE_MAX_SIZE = 4096
EBDA_START = GuestAddress(0x9FC00)  # MP table lives here; RAM ends below it
HIMEM_START = GuestAddress(0x100000)  # kernels load at 1 MiB

# Firmware-owned memory between the EBDA and 1 MiB, which the e820 map leaves
# out (so no guest kernel allocates it) but guest RAM still backs. The VMGenID
# and VMClock pages must be RAM the guest can map; the RSDP sits at the start
# of 0xE0000-0xFFFFF, where Linux and the test guest also look for it when the
# boot protocol does not say, and the other ACPI tables follow it.
VMGENID_START = GuestAddress(0xDE000)  # 16 bytes, alone on their page
VMCLOCK_START = GuestAddress(0xDF000)  # one 4 KiB page
ACPI_START = GuestAddress(0xE0000)
ACPI_END = GuestAddress(0x100000)

# The 32-bit MMIO gap: devices and the APICs, never RAM.
MMIO32_START = GuestAddress(3 * GiB)
MMIO32_END = GuestAddress(4 * GiB)
IOAPIC_START = GuestAddress(0xFEC00000)
# Device windows (virtio-mmio) are handed out from MMIO32_START up to here by
# ember.vmm.resources.ResourceAllocator.
MMIO32_DEVICES_END = IOAPIC_START
LAPIC_START = GuestAddress(0xFEE00000)
FIRST_ADDR_PAST_32BITS = GuestAddress(4 * GiB)

# Legacy interrupt lines.
SERIAL_IRQ = 4
I8042_IRQ = 1
PIT_IRQ = 0
# GSIs for devices: IOAPIC pins above the legacy ones Ember wires (0-4), up to
# the last of the in-kernel IOAPIC's 24 pins.
FIRST_DEVICE_GSI = 5
LAST_DEVICE_GSI = 23

MAX_VCPUS = 32


def ram_layout(mem_bytes: int) -> list[tuple[int, int]]:
    """(guest base, size) of each RAM region for `mem_bytes` of memory."""
    if mem_bytes <= 0:
        raise ValueError("guest memory size must be positive")
    below_gap = MMIO32_START
    if mem_bytes <= below_gap:
        return [(0, mem_bytes)]
    return [(0, below_gap), (FIRST_ADDR_PAST_32BITS, mem_bytes - below_gap)]

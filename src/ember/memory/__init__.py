"""Guest memory: regions, guest-physical addresses, bounds-checked access."""

from ember.memory.address import GuestAddress, HostAddress
from ember.memory.guest_memory import (
    GuestMemory,
    GuestMemoryError,
    GuestRegion,
    OutOfBoundsError,
)

__all__ = [
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "HostAddress",
    "OutOfBoundsError",
]

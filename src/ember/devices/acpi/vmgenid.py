"""The Virtual Machine Generation ID: 16 random bytes in guest memory that
change whenever the guest starts again from a snapshot.

The DSDT's `VGEN` device tells the guest where the bytes are (its `ADDR`
method). On every restore the monitor writes a fresh random ID and raises the
device's GSI; the DSDT's event device turns that edge into Notify(VGEN, 0x80),
on which Linux reads the new ID and reseeds its random number generator. The
ID is written only after the vCPUs' and the interrupt controllers' state is
back, so neither overwrites it nor loses the interrupt.

A snapshot keeps only where the ID lives and its GSI: the ID itself is never
reused, a restored guest always gets a new one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import msgspec

from ember.memory import GuestAddress, GuestMemory

log = logging.getLogger(__name__)

GENERATION_ID_SIZE = 16


class VmGenIdState(msgspec.Struct, frozen=True):
    address: int
    gsi: int


class VmGenId:
    """The generation ID at `address`, announced through `trigger` (an irqfd
    edge on `gsi`)."""

    def __init__(
        self,
        memory: GuestMemory,
        address: GuestAddress,
        gsi: int,
        trigger: Callable[[], None],
    ) -> None:
        memory.region_for(address, GENERATION_ID_SIZE)  # raises if outside RAM
        self._memory = memory
        self.address = address
        self.gsi = gsi
        self._trigger = trigger

    @classmethod
    def create(
        cls,
        memory: GuestMemory,
        address: GuestAddress,
        gsi: int,
        trigger: Callable[[], None],
    ) -> VmGenId:
        """A device for a booting guest, holding its first random ID."""
        device = cls(memory, address, gsi, trigger)
        device._write_new_id()
        return device

    @classmethod
    def restore(
        cls,
        memory: GuestMemory,
        state: VmGenIdState,
        trigger: Callable[[], None],
    ) -> VmGenId:
        """The device of a restored guest; call `new_generation` once the VM
        state is in place."""
        return cls(memory, GuestAddress(state.address), state.gsi, trigger)

    def save(self) -> VmGenIdState:
        return VmGenIdState(address=self.address, gsi=self.gsi)

    @property
    def generation_id(self) -> bytes:
        return self._memory.read(self.address, GENERATION_ID_SIZE)

    def new_generation(self) -> bytes:
        """Write a fresh random ID and tell the guest; returns the ID."""
        new_id = self._write_new_id()
        self._trigger()
        log.info("VM generation ID is now %s", new_id.hex())
        return new_id

    def _write_new_id(self) -> bytes:
        new_id = secrets.token_bytes(GENERATION_ID_SIZE)
        self._memory.write(self.address, new_id)  # also marks the page dirty
        return new_id

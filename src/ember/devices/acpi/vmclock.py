"""VMClock: a page of guest memory that tells the guest when its clock was
disrupted and when it was started again from a snapshot.

The page holds Linux's `struct vmclock_abi` (include/uapi/linux/vmclock-abi.h),
little-endian, 112 bytes at its start. Ember publishes no time (clock status
unknown, no counter), only the two counters a guest needs after a restore:
`disruption_marker` (any disruption of the clock) and `vm_generation_counter`
(loaded from a snapshot), under the structure's sequence count.

Restore order, as the ABI asks of a hypervisor: make `seq_count` odd (update in
progress), bump both counters, make `seq_count` even again, then raise the
GSI, which the DSDT's event device turns into Notify(VCLK, 0x80). A reader
that saw the same even `seq_count` before and after reading got a consistent
copy. The monitor keeps the structure in its own state as well and writes the
whole of it to the page, so a guest that scribbled on the page cannot change
what the next snapshot records.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import msgspec

from ember.memory import GuestAddress, GuestMemory

log = logging.getLogger(__name__)

VMCLOCK_MAGIC = 0x4B4C4356  # "VCLK"
VMCLOCK_SIZE = 0x1000  # the page the structure sits in
VMCLOCK_VERSION = 1
VMCLOCK_COUNTER_INVALID = 0xFF
VMCLOCK_STATUS_UNKNOWN = 0
VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT = 1 << 8
VMCLOCK_FLAG_NOTIFICATION_PRESENT = 1 << 9

# magic, size, version, counter_id, time_type, seq_count, disruption_marker,
# flags, pad[2], clock_status, leap_second_smearing_hint, tai_offset_sec,
# leap_indicator, counter_period_shift, counter_value, counter_period_frac_sec,
# counter_period_esterror_rate_frac_sec, counter_period_maxerror_rate_frac_sec,
# time_sec, time_frac_sec, time_esterror_nanosec, time_maxerror_nanosec,
# vm_generation_counter.
ABI = struct.Struct("<IIHBBIQQ2sBBhBBQQQQQQQQQ")
ABI_SIZE = ABI.size  # 112
SEQ_COUNT_OFFSET = 12
DISRUPTION_MARKER_OFFSET = 16  # for readers of the page
VM_GENERATION_COUNTER_OFFSET = 104


class VmClockAbi(msgspec.Struct, frozen=True):
    """The fields of `struct vmclock_abi`, with Ember's defaults."""

    magic: int = VMCLOCK_MAGIC
    size: int = VMCLOCK_SIZE
    version: int = VMCLOCK_VERSION
    counter_id: int = VMCLOCK_COUNTER_INVALID
    time_type: int = 0
    seq_count: int = 0
    disruption_marker: int = 0
    flags: int = VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT | VMCLOCK_FLAG_NOTIFICATION_PRESENT
    clock_status: int = VMCLOCK_STATUS_UNKNOWN
    leap_second_smearing_hint: int = 0
    tai_offset_sec: int = 0
    leap_indicator: int = 0
    counter_period_shift: int = 0
    counter_value: int = 0
    counter_period_frac_sec: int = 0
    counter_period_esterror_rate_frac_sec: int = 0
    counter_period_maxerror_rate_frac_sec: int = 0
    time_sec: int = 0
    time_frac_sec: int = 0
    time_esterror_nanosec: int = 0
    time_maxerror_nanosec: int = 0
    vm_generation_counter: int = 0

    def pack(self) -> bytes:
        return ABI.pack(
            self.magic,
            self.size,
            self.version,
            self.counter_id,
            self.time_type,
            self.seq_count,
            self.disruption_marker,
            self.flags,
            b"",
            self.clock_status,
            self.leap_second_smearing_hint,
            self.tai_offset_sec,
            self.leap_indicator,
            self.counter_period_shift,
            self.counter_value,
            self.counter_period_frac_sec,
            self.counter_period_esterror_rate_frac_sec,
            self.counter_period_maxerror_rate_frac_sec,
            self.time_sec,
            self.time_frac_sec,
            self.time_esterror_nanosec,
            self.time_maxerror_nanosec,
            self.vm_generation_counter,
        )


class VmClockState(msgspec.Struct, frozen=True):
    address: int
    gsi: int
    abi: VmClockAbi


def _u64(value: int) -> int:
    return value & 0xFFFFFFFFFFFFFFFF


class VmClock:
    """The VMClock page at `address`, announced through `trigger` (an irqfd
    edge on `gsi`)."""

    def __init__(
        self,
        memory: GuestMemory,
        address: GuestAddress,
        gsi: int,
        trigger: Callable[[], None],
        abi: VmClockAbi,
    ) -> None:
        if address % VMCLOCK_SIZE:
            raise ValueError(f"the VMClock page at {address:#x} is not page aligned")
        memory.region_for(address, VMCLOCK_SIZE)  # raises if outside RAM
        self._memory = memory
        self.address = address
        self.gsi = gsi
        self._trigger = trigger
        self.abi = abi

    @classmethod
    def create(
        cls,
        memory: GuestMemory,
        address: GuestAddress,
        gsi: int,
        trigger: Callable[[], None],
    ) -> VmClock:
        """A device for a booting guest: the page zeroed, the structure at
        its start."""
        device = cls(memory, address, gsi, trigger, VmClockAbi())
        memory.write(address, device.abi.pack().ljust(VMCLOCK_SIZE, b"\0"))
        return device

    @classmethod
    def restore(
        cls, memory: GuestMemory, state: VmClockState, trigger: Callable[[], None]
    ) -> VmClock:
        """The device of a restored guest; call `new_generation` once the VM
        state is in place."""
        return cls(memory, GuestAddress(state.address), state.gsi, trigger, state.abi)

    def save(self) -> VmClockState:
        return VmClockState(address=self.address, gsi=self.gsi, abi=self.abi)

    def new_generation(self) -> int:
        """Bump the disruption marker and the generation counter under the
        sequence count, then tell the guest; returns the new generation."""
        odd = self.abi.seq_count | 1  # an update is in progress
        self.abi = msgspec.structs.replace(
            self.abi,
            seq_count=(odd + 1) & 0xFFFFFFFF,
            disruption_marker=_u64(self.abi.disruption_marker + 1),
            vm_generation_counter=_u64(self.abi.vm_generation_counter + 1),
        )
        packed = self.abi.pack()
        seq_end = SEQ_COUNT_OFFSET + 4
        # Python's mmap stores are plain stores, made in program order; on x86
        # a guest on another CPU sees them in that order (TSO), which is the
        # ordering the ABI's write barriers ask for.
        self._write(SEQ_COUNT_OFFSET, struct.pack("<I", odd))
        self._write(0, packed[:SEQ_COUNT_OFFSET])
        self._write(seq_end, packed[seq_end:])
        self._write(SEQ_COUNT_OFFSET, packed[SEQ_COUNT_OFFSET:seq_end])
        self._trigger()
        log.info("VMClock generation is now %d", self.abi.vm_generation_counter)
        return self.abi.vm_generation_counter

    def _write(self, offset: int, data: bytes) -> None:
        self._memory.write(GuestAddress(self.address + offset), data)

"""Creating a snapshot of a paused microVM.

Theory of operation. The microVM must be paused: every vCPU is outside KVM_RUN, so
its registers are stable and no guest write can race the memory dump. State is
captured devices first (a device's save may raise an interrupt that must then be
caught in the interrupt-controller state), then vCPUs, then VM-wide KVM state.

Both files are written under temporary names and made durable before either is
renamed over its target, so a failure at any step — a full disk, an unwritable
directory — leaves whatever snapshot was there before untouched. Dirty-page
tracking is consumed only once both files are in place: for a diff, KVM's dirty
log is folded into the monitor's own per-page bytes before writing, so a failed
write loses nothing and a retry is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.arch.x86_64.vcpu_state import save_vcpu
from ember.arch.x86_64.vm_state import save_vm
from ember.kvm import ioctls
from ember.snapshot.atomic import AtomicFile
from ember.snapshot.memory_file import (
    DumpStats,
    dirty_bitmap_for,
    merge_kvm_bitmap,
    write_diff,
    write_full,
)
from ember.snapshot.state import (
    BootSourceInfo,
    DevicesState,
    KvmState,
    MemoryRegionState,
    MicrovmState,
    VmInfo,
    VmState,
)
from ember.snapshot.state_file import encode_state

if TYPE_CHECKING:
    from ember.vmm.microvm import Microvm

log = logging.getLogger(__name__)


class SnapshotCreateError(Exception):
    """A snapshot could not be created; files already on disk are unchanged."""


class NotPausedError(SnapshotCreateError):
    pass


class DiffNeedsDirtyTrackingError(SnapshotCreateError):
    pass


class VmStoppedError(SnapshotCreateError):
    pass


@dataclass(frozen=True)
class SnapshotStats:
    state_bytes: int
    memory_bytes_written: int
    memory_total_bytes: int
    seconds: float


def capture_state(microvm: Microvm) -> MicrovmState:
    microvm.settle_devices()  # nothing in flight, disks flushed
    devices = DevicesState(
        serial=microvm.serial.save(),
        i8042=microvm.i8042.save(),
        block=[
            drive.device.save(drive.slot, drive.transport.save())
            for drive in microvm.drives.values()
        ],
        vmgenid=None if microvm.vmgenid is None else microvm.vmgenid.save(),
        vmclock=None if microvm.vmclock is None else microvm.vmclock.save(),
    )
    msr_indices = microvm.kvm.msr_index_list()
    xsave_size = max(4096, microvm.kvm.check_extension(ioctls.KVM_CAP_XSAVE2))
    vcpus = [save_vcpu(vcpu.fd, msr_indices, xsave_size) for vcpu in microvm.vcpus]
    regions = [
        MemoryRegionState(base_address=region.guest_base, size=region.size)
        for region in microvm.memory
    ]
    boot = microvm.boot_source
    return MicrovmState(
        vm_info=VmInfo(
            mem_size_mib=microvm.machine.mem_size_mib,
            huge_pages=microvm.machine.huge_pages,
            boot_source=None
            if boot is None
            else BootSourceInfo(
                boot.kernel_image_path, boot.boot_args, boot.initrd_path
            ),
        ),
        kvm_state=KvmState(),
        vm_state=VmState(memory=regions, kvm=save_vm(microvm.vm)),
        vcpu_states=vcpus,
        device_states=devices,
    )


def create_snapshot(
    microvm: Microvm,
    state_path: str,
    mem_path: str,
    diff: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SnapshotStats:
    started = time.monotonic()
    if not microvm.paused or microvm.is_stopped:
        raise NotPausedError(
            "cannot snapshot a running microVM: pause it first "
            "(save/restore unavailable while running)"
        )
    if diff and not microvm.machine.track_dirty_pages:
        raise DiffNeedsDirtyTrackingError(
            "diff snapshots need dirty page tracking: boot or load the microVM "
            "with track_dirty_pages enabled"
        )
    state = capture_state(microvm)
    if diff:
        _fold_kvm_dirty_log(microvm)
    encoded = encode_state(state)
    with AtomicFile(mem_path) as mem_file, AtomicFile(state_path) as state_file:
        writer = write_diff if diff else write_full
        dump: DumpStats = writer(microvm.memory, mem_file, progress)
        if microvm.is_stopped:  # e.g. its page-fault handler died: memory is suspect
            reason = microvm.stop_reason
            raise VmStoppedError(
                "the microVM stopped while its memory was written"
                + (f" ({reason.message})" if reason is not None else "")
                + "; no snapshot was written"
            )
        mem_file.prepare()
        state_file.write_all(encoded)
        state_file.prepare()
        mem_file.publish()
        state_file.publish()
    _reset_dirty_tracking(microvm)
    seconds = time.monotonic() - started
    log.info(
        "%s snapshot written: %s (%d bytes), %s (%d of %d bytes) in %.3f s",
        "diff" if diff else "full",
        state_path,
        len(encoded),
        mem_path,
        dump.bytes_written,
        dump.total_bytes,
        seconds,
    )
    return SnapshotStats(len(encoded), dump.bytes_written, dump.total_bytes, seconds)


def _fold_kvm_dirty_log(microvm: Microvm) -> None:
    """Move KVM's dirty log (read-and-clear) into the monitor's page bytes."""
    for slot, region in enumerate(microvm.memory):
        bitmap = dirty_bitmap_for(region)
        microvm.vm.get_dirty_log(slot, bitmap)
        merge_kvm_bitmap(region, bitmap)


def _reset_dirty_tracking(microvm: Microvm) -> None:
    """After a successful snapshot, the next diff starts from here."""
    if microvm.machine.track_dirty_pages:
        for slot, region in enumerate(microvm.memory):
            microvm.vm.get_dirty_log(slot, dirty_bitmap_for(region))
    for region in microvm.memory:
        region.monitor_dirty[:] = bytes(len(region.monitor_dirty))
    # The device writes virtqueues on its own; the next diff must hold them.
    microvm.mark_queues_dirty()

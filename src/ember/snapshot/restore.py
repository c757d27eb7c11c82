"""Restoring a microVM from a state file and a memory file.

Order: read and check the state file · sanity-check its memory layout · map the
memory file privately (lazy, copy-on-write: nothing is read until the guest touches
it) · create the VM, its interrupt controllers and PIT · create vCPUs, scale the
TSC if this host's frequency differs, restore each vCPU · restore VM-wide state
(PIT, kvmclock, PIC, IOAPIC) · rebuild devices and restore their state · give
VMGenID a fresh ID and VMClock a new generation and raise their interrupts (only
now, so the restored interrupt controllers keep them) · start the vCPU threads
paused, and resume if asked.

Any failure closes what was built and raises; the calling process stays usable.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from ember.arch.x86_64.cpuid import vendor
from ember.arch.x86_64.vcpu_state import restore_vcpu, saved_cpu_vendor
from ember.arch.x86_64.vm_state import restore_vm
from ember.devices.virtio.block import BlockError
from ember.devices.virtio.mmio import VirtioRestoreError
from ember.kvm.system import Kvm, VcpuFd
from ember.memory import GuestMemory
from ember.memory.guest_memory import GuestMemoryError
from ember.snapshot.state import MicrovmState
from ember.snapshot.state_file import load_state_file
from ember.vmm.config import BootSource, MachineConfig
from ember.vmm.microvm import Console, Microvm

if TYPE_CHECKING:
    from ember.snapshot.uffd import UffdBackend

log = logging.getLogger(__name__)

TSC_TOLERANCE_PPM = 250
MemBackend = Literal["File", "Uffd"]


class SnapshotLoadError(Exception):
    """A snapshot could not be restored."""


class NoMemoryRegionsError(SnapshotLoadError):
    pass


class NoDramRegionError(SnapshotLoadError):
    pass


class DramMultipleSlotsError(SnapshotLoadError):
    pass


class DramUnpluggedError(SnapshotLoadError):
    pass


class HugePagesNeedUffdError(SnapshotLoadError):
    pass


class CpuVendorMismatchError(SnapshotLoadError):
    pass


class MemoryFileError(SnapshotLoadError):
    pass


class DriveRestoreError(SnapshotLoadError):
    pass


def sanity_check(state: MicrovmState) -> None:
    regions = state.vm_state.memory
    if not regions:
        raise NoMemoryRegionsError("snapshot has no memory regions")
    dram = [region for region in regions if region.region_type == "Dram"]
    if not dram:
        raise NoDramRegionError("snapshot has no DRAM memory region")
    for region in dram:
        if region.slot_count != 1:
            raise DramMultipleSlotsError(
                f"DRAM region at {region.base_address:#x} has {region.slot_count} "
                "slots; DRAM regions have exactly one"
            )
        if not all(region.plugged):
            raise DramUnpluggedError(
                f"DRAM region at {region.base_address:#x} is marked unplugged"
            )
    if not state.vcpu_states:
        raise SnapshotLoadError("snapshot has no vCPUs")


def check_cpu_vendor(kvm: Kvm, state: MicrovmState, strict: bool) -> None:
    host = vendor(kvm.supported_cpuid())
    saved = saved_cpu_vendor(state.vcpu_states[0].cpuid)
    if saved == host:
        log.info("CPU vendor %s matches the snapshot", host.decode(errors="replace"))
        return
    message = (
        f"snapshot was taken on a {saved.decode(errors='replace')} CPU, this host is "
        f"{host.decode(errors='replace')}"
    )
    if strict:
        raise CpuVendorMismatchError(message)
    log.warning("%s; the guest may misbehave", message)


def restore_microvm(
    state_path: str,
    mem_path: str,
    *,
    track_dirty_pages: bool = False,
    resume: bool = True,
    console: Console | None = None,
    clock_realtime: bool = False,
    strict_cpu_vendor: bool = False,
    mem_backend: MemBackend = "File",
    huge_pages_override: Literal["None"] | None = None,
) -> Microvm:
    """Restore a microVM. With `mem_backend="File"`, `mem_path` is the memory
    file, mapped privately. With `"Uffd"`, it is the socket of a page-fault handler
    that serves the memory (Firecracker's `backend_path`; see
    `ember.snapshot.uffd`). `huge_pages_override="None"` restores on 4 KiB pages
    whatever pages the snapshot's guest had (the memory file is the same)."""
    started = time.monotonic()
    state = load_state_file(state_path)
    sanity_check(state)
    huge_pages = huge_pages_override or state.vm_info.huge_pages
    if huge_pages == "2M" and mem_backend != "Uffd":
        raise HugePagesNeedUffdError(
            "cannot restore a hugetlbfs-backed snapshot by mapping the memory file; "
            "use the Uffd backend"
        )
    layout = [(region.base_address, region.size) for region in state.vm_state.memory]
    uffd: UffdBackend | None = None
    if mem_backend == "Uffd":
        from ember.snapshot.uffd import uffd_guest_memory

        memory, uffd = uffd_guest_memory(layout, mem_path, hugetlb=huge_pages == "2M")
    else:
        memory = _file_memory(mem_path, layout)
    machine = MachineConfig(
        vcpu_count=len(state.vcpu_states),
        mem_size_mib=state.vm_info.mem_size_mib,
        track_dirty_pages=track_dirty_pages,
        huge_pages=huge_pages,
    )
    try:
        microvm = Microvm.create(machine, memory)
    except BaseException:
        if uffd is not None:
            uffd.close()
        raise
    microvm.uffd = uffd
    try:
        if uffd is not None:
            uffd.watch(microvm)  # from here on the restore itself may wait for pages
        check_cpu_vendor(microvm.kvm, state, strict_cpu_vendor)
        _restore_into(microvm, state, clock_realtime)
        microvm.attach_devices(console or Console.stdio())
        microvm.serial.restore(state.device_states.serial)
        microvm.i8042.restore(state.device_states.i8042)
        _restore_drives(microvm, state)
        # After vCPU and VM state, so the interrupts they raise are not lost.
        microvm.restore_acpi_devices(
            state.device_states.vmgenid, state.device_states.vmclock
        )
        if uffd is not None:
            uffd.check_handler("the microVM was restored")
        microvm.start(microvm.pending_vcpu_fds, paused=True)
        microvm.kick_devices()
    except BaseException:
        microvm.close()
        raise
    if resume:
        try:
            microvm.resume()
        except BaseException:  # the handler died while we restored
            microvm.close()
            raise
    log.info(
        "microVM restored from %s in %.2f ms",
        state_path,
        (time.monotonic() - started) * 1000,
    )
    return microvm


def _file_memory(mem_path: str, layout: list[tuple[int, int]]) -> GuestMemory:
    try:
        return GuestMemory.from_file(mem_path, layout)
    except OSError as error:
        raise MemoryFileError(
            f"cannot open memory file {mem_path}: {error.strerror}"
        ) from None
    except GuestMemoryError as error:
        raise MemoryFileError(str(error)) from None


def _restore_into(microvm: Microvm, state: MicrovmState, clock_realtime: bool) -> None:
    boot = state.vm_info.boot_source
    if boot is not None:
        microvm.boot_source = BootSource(
            boot.kernel_image_path, boot.boot_args, boot.initrd_path
        )
    fds = microvm.create_vcpus()
    for fd, vcpu_state in zip(fds, state.vcpu_states, strict=True):
        _match_tsc_frequency(fd, vcpu_state.tsc_khz)
        restore_vcpu(fd, vcpu_state)
    restore_vm(microvm.vm, state.vm_state.kvm, clock_realtime)


def _restore_drives(microvm: Microvm, state: MicrovmState) -> None:
    for drive in state.device_states.block:
        try:
            microvm.restore_drive(drive)
        except (BlockError, VirtioRestoreError) as error:
            raise DriveRestoreError(f"drive {drive.drive_id}: {error}") from None


def _match_tsc_frequency(fd: VcpuFd, saved_khz: int | None) -> None:
    if saved_khz is None:
        log.warning("snapshot has no TSC frequency; it may run on another CPU model")
        return
    host_khz = fd.get_tsc_khz()
    if abs(host_khz - saved_khz) * 1_000_000 > TSC_TOLERANCE_PPM * saved_khz:
        log.info("scaling vCPU %d TSC from %d to %d kHz", fd.index, host_khz, saved_khz)
        fd.set_tsc_khz(saved_khz)

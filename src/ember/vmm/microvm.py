"""The running microVM: built from a configuration, driven by vCPU threads and a
device event loop, paused, resumed and stopped from any thread.

Build order (boot): KVM VM with its in-kernel interrupt controllers and PIT · guest
memory registered as KVM slots · kernel, command line and boot tables loaded ·
vCPUs created and given CPUID, MSRs, FPU, LAPIC and (the boot CPU) registers ·
legacy devices wired to ports and interrupt lines · threads started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ember.arch.x86_64 import layout, regs
from ember.arch.x86_64.acpi import (
    NotifyingDevice,
    VirtioMmioAcpiDevice,
    write_acpi_tables,
)
from ember.arch.x86_64.cpuid import normalize_cpuid
from ember.arch.x86_64.msrs import boot_msrs
from ember.boot import load_kernel
from ember.devices.acpi.vmclock import VmClock, VmClockState
from ember.devices.acpi.vmgenid import VmGenId, VmGenIdState
from ember.devices.bus import PortBus
from ember.devices.legacy.i8042 import I8042
from ember.devices.legacy.serial import Serial8250
from ember.devices.mmio_bus import MmioBus
from ember.devices.virtio.attach import (
    MmioAttachment,
    SlotAllocationError,
    allocate_slots,
)
from ember.devices.virtio.block import Block, BlockState, drive_from_state, root_args
from ember.devices.virtio.mmio import MmioSlot, MmioTransport
from ember.kvm.structs import KVM_MEM_LOG_DIRTY_PAGES
from ember.kvm.system import Kvm, VcpuFd, VmFd
from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.memory.guest_memory import GuestMemoryError
from ember.vmm.config import (
    BootSource,
    DriveConfig,
    MachineConfig,
    validate_drives,
    validate_machine,
)
from ember.vmm.event_loop import EventLoop
from ember.vmm.resources import ResourceAllocator, ResourceError
from ember.vmm.vcpu import (
    ExitHandlers,
    VcpuRunState,
    VcpuStop,
    VcpuThread,
    install_kick_handler,
)

if TYPE_CHECKING:
    from ember.snapshot.create import SnapshotStats
    from ember.snapshot.restore import MemBackend
    from ember.snapshot.uffd import UffdBackend

log = logging.getLogger(__name__)

KVM_TSS_ADDRESS = 0xFFFBD000  # three pages KVM needs below 4 GiB, outside RAM
SERIAL_PORT = 0x3F8
I8042_PORT = 0x60
PAUSE_TIMEOUT_S = 5.0


class VmStateError(Exception):
    """An operation was asked of the microVM in a state that does not allow it."""


@dataclass
class Console:
    """Where the guest's serial port writes and what feeds its input."""

    write: Callable[[bytes], None]
    input_fd: int | None = None

    @classmethod
    def stdio(cls) -> Console:
        def write(data: bytes) -> None:
            os.write(1, data)

        return cls(write=write, input_fd=0)


class _Interrupt:
    """An edge on one interrupt line, delivered through an irqfd."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        os.close(self.fd)


class Microvm:
    """A microVM. Build one with `Microvm.boot(...)`."""

    def __init__(
        self, kvm: Kvm, vm: VmFd, memory: GuestMemory, machine: MachineConfig
    ) -> None:
        self.boot_source: BootSource | None = None
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.machine = machine
        self.vcpus: list[VcpuThread] = []
        self.loop = EventLoop()
        self.bus = PortBus()
        self._interrupts: list[_Interrupt] = []
        self._stop_reason: VcpuStop | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._paused = False
        self.mmio_bus = MmioBus()
        self.drives: dict[str, MmioAttachment[Block]] = {}
        self.vmgenid: VmGenId | None = None
        self.vmclock: VmClock | None = None
        self.serial: Serial8250
        self.i8042: I8042
        self._unstarted_fds: list[VcpuFd] = []
        # Set when a page-fault handler serves guest memory; it stops the VM if
        # the handler goes away.
        self.uffd: UffdBackend | None = None

    # --- building ---------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        machine: MachineConfig,
        boot: BootSource,
        console: Console | None = None,
        drives: Sequence[DriveConfig] = (),
    ) -> Microvm:
        """Build a microVM, load its kernel and start it running. Each drive
        becomes a virtio-block device (the root device first, so it is vda)."""
        validate_machine(machine)
        drives = sorted(drives, key=lambda drive: not drive.is_root_device)
        validate_drives(drives)
        resources = ResourceAllocator()
        slots = allocate_slots(len(drives), resources)
        memory = GuestMemory.anonymous(
            layout.ram_layout(machine.mem_size_mib << 20),
            transparent_huge_pages=machine.huge_pages == "Transparent",
            hugetlb=machine.huge_pages == "2M",
        )
        microvm = cls.create(machine, memory)
        microvm.boot_source = boot
        try:
            rsdp = microvm.create_acpi_devices(
                [VirtioMmioAcpiDevice(s.base, s.size, s.irq) for s in slots],
                resources,
            )
            info = load_kernel(
                microvm.memory,
                boot.kernel_image_path,
                initrd_path=boot.initrd_path,
                cmdline=_with_devices(boot.boot_args, drives, slots),
                vcpu_count=machine.vcpu_count,
                rsdp_address=rsdp,
            )
            fds = microvm.create_vcpus()
            microvm._configure_boot_vcpus(fds)
            microvm._set_boot_registers(
                fds[0], info.protocol, info.entry, info.boot_struct
            )
            microvm.attach_devices(console or Console.stdio())
            for drive, slot in zip(drives, slots, strict=True):
                microvm.attach_drive(drive, slot)
            microvm.start(fds, paused=False)
        except BaseException:
            microvm.close()
            raise
        log.info(
            "microVM started: %d vCPUs, %d MiB, %s entry at %#x",
            machine.vcpu_count,
            machine.mem_size_mib,
            info.protocol,
            info.entry,
        )
        return microvm

    @classmethod
    def create(cls, machine: MachineConfig, memory: GuestMemory) -> Microvm:
        """A VM with its interrupt controllers, PIT and memory, no vCPUs yet.
        Takes ownership of `memory`."""
        install_kick_handler()
        try:
            kvm = Kvm()
        except BaseException:
            memory.close()
            raise
        try:
            vm = kvm.create_vm()
        except BaseException:
            memory.close()
            kvm.close()
            raise
        microvm = cls(kvm, vm, memory, machine)
        try:
            vm.set_tss_address(KVM_TSS_ADDRESS)
            vm.create_irqchip()
            vm.create_pit2()
            microvm._register_memory()
        except BaseException:
            microvm.close()
            raise
        return microvm

    def _register_memory(self) -> None:
        flags = KVM_MEM_LOG_DIRTY_PAGES if self.machine.track_dirty_pages else 0
        for slot, region in enumerate(self.memory):
            self.vm.set_user_memory_region(
                slot, region.guest_base, region.size, region.host_address, flags
            )

    def create_vcpus(self) -> list[VcpuFd]:
        fds: list[VcpuFd] = []
        try:
            for index in range(self.machine.vcpu_count):
                fds.append(self.vm.create_vcpu(index))
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        self._unstarted_fds = fds
        return fds

    @property
    def pending_vcpu_fds(self) -> list[VcpuFd]:
        """vCPUs created but not yet started."""
        return list(self._unstarted_fds)

    def _configure_boot_vcpus(self, fds: list[VcpuFd]) -> None:
        supported = self.kvm.supported_cpuid()
        count = self.machine.vcpu_count
        for index, fd in enumerate(fds):
            fd.set_cpuid2(normalize_cpuid(supported, index, count))
            msrs = boot_msrs()
            accepted = fd.set_msrs(msrs)
            if accepted != len(msrs):
                log.warning(
                    "vCPU %d: KVM accepted %d of %d boot MSRs",
                    index,
                    accepted,
                    len(msrs),
                )
            fd.set_fpu(regs.boot_fpu())
            lapic = fd.get_lapic()
            regs.set_lint_modes(lapic)
            fd.set_lapic(lapic)

    def _set_boot_registers(
        self, fd: VcpuFd, protocol: str, entry: int, boot_struct: int
    ) -> None:
        sregs = fd.get_sregs()
        if protocol == "pvh":
            regs.pvh_sregs(self.memory, sregs)
        else:
            regs.long_mode_sregs(self.memory, sregs)
        fd.set_sregs(sregs)
        fd.set_regs(regs.boot_regs(entry, boot_struct, protocol))

    def attach_devices(self, console: Console) -> None:
        serial_irq = self._interrupt(layout.SERIAL_IRQ)
        keyboard_irq = self._interrupt(layout.I8042_IRQ)
        self.serial = Serial8250(console.write, serial_irq.trigger)
        self.i8042 = I8042(self._on_guest_reset, keyboard_irq.trigger)
        self.bus.register(SERIAL_PORT, 8, self.serial)
        self.bus.register(I8042_PORT, 5, self.i8042)
        if console.input_fd is not None:
            self._watch_console_input(console.input_fd)

    def attach_drive(self, drive: DriveConfig, slot: MmioSlot) -> MmioAttachment[Block]:
        """A virtio-block device for `drive` in `slot` (before the vCPUs start:
        the kernel learns about it from the command line or ACPI)."""
        block = Block(drive)
        try:
            transport = MmioTransport(
                block, self.memory, self._interrupt(slot.irq).trigger
            )
            attachment = MmioAttachment(
                block, transport, slot, self.vm, self.mmio_bus, self.loop
            )
        except BaseException:
            block.close()
            raise
        self.drives[drive.drive_id] = attachment
        return attachment

    def restore_drive(self, state: BlockState) -> None:
        """Reopen a saved drive by its path and put its transport back."""
        attachment = self.attach_drive(drive_from_state(state), state.slot)
        attachment.transport.restore(state.transport)

    def update_drive(self, drive_id: str, path_on_host: str) -> None:
        """Back a running drive with another file; the guest is told its
        capacity may have changed."""
        attachment = self.drives.get(drive_id)
        if attachment is None:
            raise KeyError(f"no drive {drive_id!r}")
        with attachment.transport.lock:
            attachment.device.replace_backing(path_on_host)
        attachment.transport.config_changed()

    def settle_devices(self) -> None:
        """Serve every request the guest has made and flush the disks, so a
        snapshot taken now holds no request in flight (vCPUs must be paused)."""
        for attachment in self.drives.values():
            attachment.transport.drain()
            with attachment.transport.lock:
                attachment.device.flush()

    def kick_devices(self) -> None:
        """After a restore: serve what the guest queued before the snapshot and
        re-raise interrupts it has not acknowledged."""
        for attachment in self.drives.values():
            attachment.transport.kick()

    def mark_queues_dirty(self) -> None:
        """Count virtqueue pages as written, so the next diff snapshot has them."""
        for attachment in self.drives.values():
            for address, length in attachment.transport.queue_areas():
                with contextlib.suppress(GuestMemoryError):
                    self.memory.mark_dirty(GuestAddress(address), length)

    def create_acpi_devices(
        self,
        virtio_devices: Sequence[VirtioMmioAcpiDevice],
        resources: ResourceAllocator,
    ) -> GuestAddress:
        """At boot: a VMGenID and a VMClock device on GSIs taken from
        `resources` (which placed the virtio devices), and the ACPI tables that
        describe them all. Returns the RSDP's address for the boot protocol."""
        try:
            genid_gsi = resources.allocate_gsi()
            clock_gsi = resources.allocate_gsi()
        except ResourceError as error:
            raise SlotAllocationError(
                f"no interrupt line left for VMGenID and VMClock: {error}"
            ) from None
        self.vmgenid = VmGenId.create(
            self.memory,
            layout.VMGENID_START,
            genid_gsi,
            self._interrupt(genid_gsi).trigger,
        )
        self.vmclock = VmClock.create(
            self.memory,
            layout.VMCLOCK_START,
            clock_gsi,
            self._interrupt(clock_gsi).trigger,
        )
        return write_acpi_tables(
            self.memory,
            self.machine.vcpu_count,
            virtio_devices,
            vmgenid=NotifyingDevice(self.vmgenid.address, genid_gsi),
            vmclock=NotifyingDevice(self.vmclock.address, clock_gsi),
        )

    def restore_acpi_devices(
        self, vmgenid: VmGenIdState | None, vmclock: VmClockState | None
    ) -> None:
        """After a restore, once vCPU and VM state are in place: a fresh
        generation ID and VMClock generation, each announced by an interrupt
        (the interrupt controllers' restored state would otherwise drop it).
        Snapshots from before these devices existed restore without them."""
        if vmgenid is not None:
            self.vmgenid = VmGenId.restore(
                self.memory, vmgenid, self._interrupt(vmgenid.gsi).trigger
            )
            self.vmgenid.new_generation()
        if vmclock is not None:
            self.vmclock = VmClock.restore(
                self.memory, vmclock, self._interrupt(vmclock.gsi).trigger
            )
            self.vmclock.new_generation()

    def _interrupt(self, gsi: int) -> _Interrupt:
        interrupt = _Interrupt(self.vm, gsi)
        self._interrupts.append(interrupt)
        return interrupt

    def _watch_console_input(self, fd: int) -> None:
        def on_input(events: int) -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove(fd)  # EOF: the guest just stops getting input
                return
            self.serial.enqueue_input(data)

        try:
            self.loop.add(fd, on_input)
        except (OSError, PermissionError) as error:
            # /dev/null and regular files cannot be polled; the guest gets no input.
            log.info("console input fd %d not pollable (%s); ignoring it", fd, error)

    def start(self, fds: list[VcpuFd], paused: bool) -> None:
        handlers = ExitHandlers(
            port_read=self.bus.read,
            port_write=self.bus.write,
            mmio_read=self.mmio_bus.read,
            mmio_write=self.mmio_bus.write,
        )
        self.vcpus = [VcpuThread(fd, handlers, self._on_vcpu_stop) for fd in fds]
        self._unstarted_fds = []
        self.loop.start()
        for vcpu in self.vcpus:
            vcpu.start(paused=paused)
        self._paused = paused

    # --- lifecycle --------------------------------------------------------------

    def _on_guest_reset(self) -> None:
        self._on_vcpu_stop(VcpuStop(-1, 0, "the guest reset itself through the i8042"))

    def _on_vcpu_stop(self, stop: VcpuStop) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = stop
        for vcpu in self.vcpus:
            vcpu.request_stop()
        self._stopped.set()

    @property
    def stop_reason(self) -> VcpuStop | None:
        return self._stop_reason

    @property
    def is_stopped(self) -> bool:
        return self._stopped.is_set()

    def wait(self, timeout: float | None = None) -> VcpuStop | None:
        """Block until the VM stops; returns why (None on timeout)."""
        if not self._stopped.wait(timeout):
            return None
        return self._stop_reason

    def pause(self) -> None:
        """Take every vCPU out of the guest; idempotent."""
        self._require_running_vm("pause")
        for vcpu in self.vcpus:
            vcpu.request_pause()
        for vcpu in self.vcpus:
            if not vcpu.wait_for(VcpuRunState.PAUSED, PAUSE_TIMEOUT_S):
                raise VmStateError(f"vCPU {vcpu.index} did not pause in time")
        self._paused = True

    def resume(self) -> None:
        """Let every vCPU run again; idempotent."""
        self._require_running_vm("resume")
        for vcpu in self.vcpus:
            vcpu.request_resume()
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def _require_running_vm(self, operation: str) -> None:
        if self._stopped.is_set():
            raise VmStateError(f"cannot {operation}: the microVM has stopped")

    def snapshot(
        self,
        state_path: str,
        mem_path: str,
        diff: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> SnapshotStats:
        """Write a snapshot of this paused microVM (see `ember.snapshot.create`)."""
        from ember.snapshot.create import create_snapshot

        return create_snapshot(self, state_path, mem_path, diff=diff, progress=progress)

    @classmethod
    def restore(
        cls,
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
        """A microVM brought back from a snapshot (see `ember.snapshot.restore`).
        With `mem_backend="Uffd"`, `mem_path` is a page-fault handler's socket."""
        from ember.snapshot.restore import restore_microvm

        return restore_microvm(
            state_path,
            mem_path,
            track_dirty_pages=track_dirty_pages,
            resume=resume,
            console=console,
            clock_realtime=clock_realtime,
            strict_cpu_vendor=strict_cpu_vendor,
            mem_backend=mem_backend,
            huge_pages_override=huge_pages_override,
        )

    def stop(self, status: int = 0, message: str = "stopped by the monitor") -> None:
        self._on_vcpu_stop(VcpuStop(-1, status, message))

    def close(self) -> None:
        """Stop everything and release every resource; safe to call twice."""
        self.stop()
        for vcpu in self.vcpus:
            vcpu.join(timeout=5)
        if self.loop is not None:
            with contextlib.suppress(OSError):
                self.loop.stop()
        for vcpu in self.vcpus:
            vcpu.fd.close()
        for fd in self._unstarted_fds:
            fd.close()
        for attachment in self.drives.values():
            attachment.close()
            attachment.device.close()
        self.drives = {}
        for interrupt in self._interrupts:
            interrupt.close()
        self._interrupts = []
        if self.uffd is not None:
            self.uffd.close()  # the handler learns this microVM is gone
        self.memory.close()
        self.vm.close()
        self.kvm.close()


def _with_devices(
    boot_args: str, drives: Sequence[DriveConfig], slots: Sequence[MmioSlot]
) -> str:
    """The command line with the root device and Linux's virtio_mmio.device=
    entries appended (as Firecracker does for kernels that read them)."""
    parts = [boot_args] if boot_args else []
    parts.extend(root_args(drive) for drive in drives if drive.is_root_device)
    parts.extend(slot.cmdline_entry() for slot in slots)
    return " ".join(parts)

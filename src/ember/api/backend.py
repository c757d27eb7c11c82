"""What the API needs from the monitor, and the real thing on KVM.

The controller talks to a `VmBackend` and the `RunningVm` it returns, not to
`Microvm` directly, so that the API's rules can be tested with a fake backend,
without KVM. `KvmBackend` imports the VMM only when it builds a VM: start-up of
the API socket does not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ember.api.drives import AttachedDrive
    from ember.vmm.config import BootSource, DriveConfig, HugePages, MachineConfig
    from ember.vmm.vcpu import VcpuStop


@dataclass(frozen=True)
class BootRequest:
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool
    kernel_image_path: str
    boot_args: str | None
    initrd_path: str | None
    drives: tuple[DriveConfig, ...] = ()
    huge_pages: HugePages = "None"


@dataclass(frozen=True)
class RestoreRequest:
    snapshot_path: str
    mem_file_path: str  # with the Uffd backend, the page-fault handler's socket
    track_dirty_pages: bool
    resume_vm: bool
    clock_realtime: bool
    mem_backend: Literal["File", "Uffd"] = "File"
    # "None": restore on 4 KiB pages whatever the snapshot used (Firecracker's
    # huge_pages override); None: as the snapshot says.
    huge_pages_override: Literal["None"] | None = None


class RunningVm(Protocol):
    """The part of `ember.vmm.microvm.Microvm` the API uses."""

    @property
    def machine(self) -> MachineConfig: ...

    @property
    def boot_source(self) -> BootSource | None: ...

    @property
    def paused(self) -> bool: ...

    @property
    def is_stopped(self) -> bool: ...

    @property
    def drives(self) -> Mapping[str, AttachedDrive]: ...

    def update_drive(self, drive_id: str, path_on_host: str) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def snapshot(
        self, state_path: str, mem_path: str, diff: bool = False
    ) -> object: ...

    def wait(self, timeout: float | None = None) -> VcpuStop | None: ...

    def stop(self, status: int = 0, message: str = "") -> None: ...

    def close(self) -> None: ...


class VmBackend(Protocol):
    def boot(self, request: BootRequest) -> RunningVm: ...

    def restore(self, request: RestoreRequest) -> RunningVm: ...

    def send_ctrl_alt_del(self, vm: RunningVm) -> None: ...


class KvmBackend:
    """Real microVMs, with the guest's serial console on stdin and stdout."""

    def boot(self, request: BootRequest) -> RunningVm:
        from ember.vmm.config import DEFAULT_CMDLINE, BootSource, MachineConfig
        from ember.vmm.microvm import Console, Microvm

        machine = MachineConfig(
            vcpu_count=request.vcpu_count,
            mem_size_mib=request.mem_size_mib,
            track_dirty_pages=request.track_dirty_pages,
            huge_pages=request.huge_pages,
        )
        boot = BootSource(
            kernel_image_path=request.kernel_image_path,
            boot_args=request.boot_args
            if request.boot_args is not None
            else DEFAULT_CMDLINE,
            initrd_path=request.initrd_path,
        )
        return Microvm.boot(
            machine, boot, console=Console.stdio(), drives=request.drives
        )

    def restore(self, request: RestoreRequest) -> RunningVm:
        from ember.vmm.microvm import Console, Microvm

        return Microvm.restore(
            request.snapshot_path,
            request.mem_file_path,
            track_dirty_pages=request.track_dirty_pages,
            resume=request.resume_vm,
            console=Console.stdio(),
            clock_realtime=request.clock_realtime,
            mem_backend=request.mem_backend,
            huge_pages_override=request.huge_pages_override,
        )

    def send_ctrl_alt_del(self, vm: RunningVm) -> None:
        from ember.vmm.microvm import Microvm

        if not isinstance(vm, Microvm):  # pragma: no cover - only fakes differ
            raise TypeError("KvmBackend drives ember.vmm.microvm.Microvm only")
        vm.i8042.send_ctrl_alt_del()


def warm_up_imports() -> None:
    """Load the VMM's modules ahead of the first boot or load request.

    Run on a background thread once the API socket answers: importing the VMM
    costs more than starting the API, and a load request arriving later then
    finds everything in place."""
    import ember.snapshot.create
    import ember.snapshot.restore  # noqa: F401

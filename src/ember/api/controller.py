"""The monitor's side of the API: lifecycle rules and the resources they guard.

One `Controller` lives on the VMM thread (the process's main thread) and executes
one `ApiCall` at a time; the API thread only parses HTTP and waits for the
answer. Every rule Firecracker's API enforces lives here, as plain code over
plain state, so it is tested without sockets or KVM:

- boot resources (machine-config, boot-source, drives) only before start; a
  drive's backing file may be swapped after start (PATCH /drives/{id});
- a snapshot is loaded only into a fresh process: nothing started, nothing loaded,
  no boot resource configured (logger and metrics do not count);
- a snapshot is created only while the microVM is paused;
- pause, resume and Ctrl-Alt-Del only once the microVM exists.

Unlike Firecracker, a load that fails leaves the process as it was: the error is
answered and another load may follow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ember import __version__
from ember.api import drives, models
from ember.api.backend import BootRequest, RestoreRequest, RunningVm, VmBackend
from ember.api.faults import ApiError, fault_for
from ember.api.http import Response
from ember.api.logs import LogSettings
from ember.metrics import Metrics
from ember.vmm.config import DriveConfig

log = logging.getLogger(__name__)

APP_NAME = "Ember"
DEFAULT_INSTANCE_ID = "anonymous-instance"


@dataclass(frozen=True)
class ApiCall:
    """One parsed request: what to do, with its decoded body."""

    operation: str  # a key of Controller.handlers, e.g. "put_machine_config"
    title: str = "Request"  # names the operation in fault messages
    body: msgspec.Struct | None = None
    deprecated: bool = False  # the body used a deprecated field


@dataclass
class MonitorState:
    machine: models.MachineConfiguration = field(
        default_factory=lambda: models.MachineConfiguration(
            vcpu_count=1, mem_size_mib=128
        )
    )
    boot_source: models.BootSource | None = None
    drives: dict[str, DriveConfig] = field(default_factory=dict)
    boot_resources_configured: bool = False
    logger: models.Logger | None = None
    metrics: models.Metrics | None = None
    vm: RunningVm | None = None


def _not_after_start(resource: str) -> ApiError:
    return ApiError(f"{resource} cannot be changed once the microVM has started")


class Controller:
    def __init__(
        self,
        backend: VmBackend,
        metrics: Metrics,
        logs: LogSettings | None = None,
        instance_id: str = DEFAULT_INSTANCE_ID,
        on_vm_created: Callable[[RunningVm], None] | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.logs = logs
        self.instance_id = instance_id
        self.state = MonitorState()
        self._on_vm_created = on_vm_created
        self.handlers: dict[str, Callable[[ApiCall], Response]] = {
            "get_instance_info": self._get_instance_info,
            "get_version": self._get_version,
            "get_vm_config": self._get_vm_config,
            "get_machine_config": self._get_machine_config,
            "put_machine_config": self._put_machine_config,
            "patch_machine_config": self._patch_machine_config,
            "put_boot_source": self._put_boot_source,
            "put_drive": self._put_drive,
            "patch_drive": self._patch_drive,
            "put_actions": self._put_actions,
            "patch_vm": self._patch_vm,
            "put_snapshot_create": self._put_snapshot_create,
            "put_snapshot_load": self._put_snapshot_load,
            "put_logger": self._put_logger,
            "put_metrics": self._put_metrics,
        }
        self._block_counters = drives.BlockCounters()
        metrics.count_devices_with(self._device_counters)

    # --- dispatch -------------------------------------------------------------

    def handle(self, call: ApiCall) -> Response:
        """Execute `call`; every failure becomes an error response here."""
        try:
            response = self.handlers[call.operation](call)
        except Exception as error:
            status, message = fault_for(call.title, error)
            response = fault_response(status, message)
        if call.deprecated:
            response.headers["Deprecation"] = "true"
        return response

    @property
    def vm(self) -> RunningVm | None:
        return self.state.vm

    # --- reading --------------------------------------------------------------

    def instance_state(self) -> str:
        vm = self.state.vm
        if vm is None:
            return "Not started"
        return "Paused" if vm.paused else "Running"

    def _get_instance_info(self, call: ApiCall) -> Response:
        info = models.InstanceInfo(
            app_name=APP_NAME,
            id=self.instance_id,
            state=self.instance_state(),  # type: ignore[arg-type]
            vmm_version=__version__,
        )
        return json_response(info)

    def _get_version(self, call: ApiCall) -> Response:
        return json_response(models.FirecrackerVersion(firecracker_version=__version__))

    def machine_view(self) -> models.MachineConfigurationView:
        vm = self.state.vm
        config = self.state.machine
        if vm is not None:  # after a load, the snapshot decided these
            return models.MachineConfigurationView(
                vcpu_count=vm.machine.vcpu_count,
                mem_size_mib=vm.machine.mem_size_mib,
                smt=False,
                track_dirty_pages=vm.machine.track_dirty_pages,
                huge_pages=vm.machine.huge_pages,
            )
        return models.MachineConfigurationView(
            vcpu_count=config.vcpu_count,
            mem_size_mib=config.mem_size_mib,
            smt=config.smt,
            track_dirty_pages=config.track_dirty_pages,
            huge_pages=config.huge_pages,
        )

    def boot_source_view(self) -> models.BootSourceView | None:
        vm = self.state.vm
        if vm is not None and vm.boot_source is not None:
            boot = vm.boot_source
            return models.BootSourceView(
                boot.kernel_image_path, boot.boot_args, boot.initrd_path
            )
        source = self.state.boot_source
        if source is None:
            return None
        return models.BootSourceView(
            source.kernel_image_path, source.boot_args, source.initrd_path
        )

    def _get_machine_config(self, call: ApiCall) -> Response:
        return json_response(self.machine_view())

    def drive_configs(self) -> list[DriveConfig]:
        """Once the microVM exists, its drives (a PATCH or a snapshot may have
        changed them); before, the configured ones."""
        vm = self.state.vm
        if vm is not None:
            return [attached.device.drive for attached in vm.drives.values()]
        return list(self.state.drives.values())

    def _device_counters(self) -> dict[str, dict[str, int]]:
        vm = self.state.vm
        return self._block_counters.take(vm.drives if vm is not None else {})

    def _get_vm_config(self, call: ApiCall) -> Response:
        config = models.FullVmConfiguration(
            machine_config=self.machine_view(),
            drives=drives.drive_views(self.drive_configs()),
            network_interfaces=[],
            boot_source=self.boot_source_view(),
            logger=self.state.logger,
            metrics=self.state.metrics,
        )
        return json_response(config)

    # --- configuring before boot ------------------------------------------------

    def _put_machine_config(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.MachineConfiguration)
        self._set_machine(call.body)
        return no_content()

    def _patch_machine_config(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.MachineConfigurationUpdate)
        changes = {
            name: value
            for name in call.body.__struct_fields__
            if (value := getattr(call.body, name)) is not msgspec.UNSET
        }
        if not changes:
            raise ApiError("empty PATCH request: name at least one field to change")
        self._set_machine(msgspec.structs.replace(self.state.machine, **changes))
        return no_content()

    def _set_machine(self, config: models.MachineConfiguration) -> None:
        if self.state.vm is not None:
            raise _not_after_start("the machine configuration")
        check_machine_config(config)
        self.state.machine = config
        self.state.boot_resources_configured = True

    def _put_boot_source(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.BootSource)
        if self.state.vm is not None:
            raise _not_after_start("the boot source")
        source = call.body
        check_readable_file("kernel image", source.kernel_image_path)
        if source.initrd_path is not None:
            check_readable_file("initrd", source.initrd_path)
        self.state.boot_source = source
        self.state.boot_resources_configured = True
        return no_content()

    def _put_drive(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.Drive)
        if self.state.vm is not None:
            raise _not_after_start("drives")
        if call.body.path_on_host is not None:
            check_path("path_on_host", call.body.path_on_host)
        drive = drives.drive_config(call.body)
        updated = drives.with_drive(self.state.drives, drive)
        drives.check_backing_file(drive)
        self.state.drives = updated
        self.state.boot_resources_configured = True
        return no_content()

    def _patch_drive(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.PartialDrive)
        vm = self._require_vm("update a drive")
        path = drives.check_update(call.body)
        check_path("path_on_host", path)
        drive_id = call.body.drive_id
        attached = vm.drives.get(drive_id)
        try:
            vm.update_drive(drive_id, path)
        except KeyError:
            raise ApiError(f"unknown drive {drive_id!r}") from None
        except Exception:
            if attached is not None:
                attached.device.metrics.update_fails += 1
            raise
        if attached is not None:
            attached.device.metrics.update_count += 1
        return no_content()

    def _put_logger(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.Logger)
        if self.logs is not None:
            self.logs.apply(call.body)
        self.state.logger = call.body
        return no_content()

    def _put_metrics(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.Metrics)
        from ember.metrics import MetricsError

        body = call.body
        check_path("metrics_path", body.metrics_path)
        try:
            self.metrics.configure(
                body.metrics_path, emit_id=body.emit_id, properties=body.properties
            )
        except MetricsError as error:
            raise ApiError(str(error)) from None
        self.state.metrics = body
        return no_content()

    # --- actions ----------------------------------------------------------------

    def _put_actions(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.InstanceActionInfo)
        action = call.body.action_type
        if action == "FlushMetrics":
            from ember.metrics import MetricsError

            try:
                self.metrics.flush()
            except MetricsError as error:
                raise ApiError(str(error)) from None
        elif action == "InstanceStart":
            self._start()
        else:
            self.backend.send_ctrl_alt_del(self._require_vm("send Ctrl-Alt-Del"))
        return no_content()

    def _start(self) -> None:
        if self.state.vm is not None:
            raise ApiError("the microVM has already started")
        source = self.state.boot_source
        if source is None:
            raise ApiError(
                "cannot start the microVM without a boot source: PUT /boot-source first"
            )
        machine = self.state.machine
        vm = self.backend.boot(
            BootRequest(
                vcpu_count=machine.vcpu_count,
                mem_size_mib=machine.mem_size_mib,
                track_dirty_pages=machine.track_dirty_pages,
                huge_pages=machine.huge_pages,
                kernel_image_path=source.kernel_image_path,
                boot_args=source.boot_args,
                initrd_path=source.initrd_path,
                drives=tuple(self.state.drives.values()),
            )
        )
        self._adopt(vm)

    def _adopt(self, vm: RunningVm) -> None:
        self.state.vm = vm
        if self._on_vm_created is not None:
            self._on_vm_created(vm)

    def _require_vm(self, what: str) -> RunningVm:
        if self.state.vm is None:
            raise ApiError(f"cannot {what} before the microVM has started")
        return self.state.vm

    def _patch_vm(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.Vm)
        if call.body.state == "Paused":
            vm = self._require_vm("pause")
            with self._timed("pause_vm"):
                vm.pause()
            self.metrics.increment("vmm", "pause_count")
        else:
            vm = self._require_vm("resume")
            with self._timed("resume_vm"):
                vm.resume()
            self.metrics.increment("vmm", "resume_count")
        return no_content()

    # --- snapshots --------------------------------------------------------------

    def _put_snapshot_create(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.SnapshotCreateParams)
        body = call.body
        vm = self._require_vm("create a snapshot")
        if not vm.paused:
            raise ApiError(
                "cannot create a snapshot of a running microVM: pause it first "
                '(PATCH /vm {"state": "Paused"})'
            )
        check_path("snapshot_path", body.snapshot_path)
        check_path("mem_file_path", body.mem_file_path)
        diff = body.snapshot_type == "Diff"
        with self._timed("diff_create_snapshot" if diff else "full_create_snapshot"):
            vm.snapshot(body.snapshot_path, body.mem_file_path, diff=diff)
        return no_content()

    def _put_snapshot_load(self, call: ApiCall) -> Response:
        assert isinstance(call.body, models.SnapshotLoadParams)
        if self.state.vm is not None:
            raise ApiError(
                "cannot load a snapshot: this process already runs a microVM "
                "(loading needs a fresh process)"
            )
        if self.state.boot_resources_configured:
            raise ApiError(
                "cannot load a snapshot after boot resources (machine-config, "
                "boot-source, drives) were configured; loading needs a fresh process"
            )
        request = restore_request(call.body)
        with self._timed("load_snapshot"):
            vm = self.backend.restore(request)
        self._adopt(vm)
        return no_content()

    def _timed(self, latency: str) -> _Timer:
        return _Timer(self.metrics, latency)


class _Timer:
    """Records how long its block took as a latency metric, if it succeeded."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name
        self.started = 0

    def __enter__(self) -> None:
        self.started = time.monotonic_ns()

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is None:
            elapsed_us = (time.monotonic_ns() - self.started) // 1000
            self.metrics.record_latency(self.name, elapsed_us)


# --- pure checks ----------------------------------------------------------------


def check_path(name: str, path: str) -> None:
    if not path:
        raise ApiError(f"{name} must not be empty")
    if "\0" in path:
        raise ApiError(f"{name} must not contain a NUL character")


def check_readable_file(what: str, path: str) -> None:
    """Refuse now, at configuration, a file that InstanceStart could not open."""
    check_path(f"{what} path", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ApiError(f"cannot open the {what} {path!r}: {error.strerror}") from None
    os.close(fd)


def check_machine_config(config: models.MachineConfiguration) -> None:
    """What the API accepts but this VMM cannot do yet is refused by name."""
    if config.smt:
        raise ApiError("smt (simultaneous multithreading) is not supported yet")
    if config.huge_pages != "None" and config.mem_size_mib % 2:
        raise ApiError(
            f"huge_pages {config.huge_pages!r} needs mem_size_mib to be a multiple of 2"
        )
    if config.cpu_template != "None":
        raise ApiError("CPU templates are not supported")


def check_load_params(params: models.SnapshotLoadParams) -> None:
    """The body's own consistency, checked when it is parsed (as Firecracker)."""
    if params.mem_backend is not None and params.mem_file_path is not None:
        raise ApiError(
            "give either mem_backend or the deprecated mem_file_path, not both"
        )
    if params.mem_backend is None and params.mem_file_path is None:
        raise ApiError("missing memory source: give mem_backend (or mem_file_path)")


def restore_request(params: models.SnapshotLoadParams) -> RestoreRequest:
    """What to restore, once the body's options are checked against what Ember
    can do."""
    check_load_params(params)
    check_path("snapshot_path", params.snapshot_path)
    backend = params.mem_backend
    if backend is not None:
        mem_path = backend.backend_path
        what = "backend_path" if backend.backend_type == "File" else "Uffd socket path"
    else:
        assert params.mem_file_path is not None
        mem_path, what = params.mem_file_path, "memory file path"
    check_path(what, mem_path)
    uffd = backend is not None and backend.backend_type == "Uffd"
    if params.huge_pages == "2M":
        raise ApiError(
            "huge_pages '2M' as an override is not supported yet; a snapshot of a "
            "microVM backed by 2M pages loads with the default 'Snapshot' and the "
            "Uffd backend"
        )
    if params.huge_pages == "Transparent":
        raise ApiError("huge_pages 'Transparent' is not supported yet")
    if params.network_overrides:
        names = ", ".join(repr(o.iface_id) for o in params.network_overrides)
        raise ApiError(
            f"network override for {names}: Ember snapshots have no network "
            "interfaces yet"
        )
    if params.vsock_override is not None:
        raise ApiError("vsock override: Ember snapshots have no vsock device yet")
    return RestoreRequest(
        snapshot_path=params.snapshot_path,
        mem_file_path=mem_path,
        track_dirty_pages=params.track_dirty_pages or params.enable_diff_snapshots,
        resume_vm=params.resume_vm,
        clock_realtime=params.clock_realtime,
        mem_backend="Uffd" if uffd else "File",
        huge_pages_override="None" if params.huge_pages == "None" else None,
    )


def json_response(value: msgspec.Struct) -> Response:
    return Response(200, msgspec.json.encode(value))


def no_content() -> Response:
    return Response(204)


def fault_response(status: int, message: str) -> Response:
    return Response(status, msgspec.json.encode(models.Fault(message)))

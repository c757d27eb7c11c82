"""The API's rules as plain code: routes, bodies, lifecycle, faults, metrics, logs
and the config file, with a fake VMM (no KVM, no sockets)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ember.api import models
from ember.api.backend import BootRequest, RestoreRequest, RunningVm
from ember.api.config_file import ConfigFileError, config_calls, read_config_file
from ember.api.controller import ApiCall, Controller
from ember.api.faults import ApiError, fault_for
from ember.api.http import Request, Response
from ember.api.logs import InstanceFormatter
from ember.api.routes import ROUTES, count_request, find_route, parse_request
from ember.devices.virtio.block import BlockMetrics
from ember.metrics import Metrics
from ember.vmm.config import DriveConfig


@dataclass(frozen=True)
class FakeMachine:
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool = False
    huge_pages: str = "None"


@dataclass(frozen=True)
class FakeBoot:
    kernel_image_path: str
    boot_args: str = "console=ttyS0"
    initrd_path: str | None = None


@dataclass
class FakeBlock:
    drive: DriveConfig
    metrics: BlockMetrics = field(default_factory=BlockMetrics)


@dataclass
class FakeTransport:
    error_count: int = 0


@dataclass
class FakeAttachedDrive:
    device: FakeBlock
    transport: FakeTransport = field(default_factory=FakeTransport)


@dataclass
class FakeVm:
    machine: Any
    boot_source: Any = None
    paused: bool = False
    is_stopped: bool = False
    snapshots: list[tuple[str, str, bool]] = field(default_factory=list)
    drives: dict[str, FakeAttachedDrive] = field(default_factory=dict)

    def update_drive(self, drive_id: str, path_on_host: str) -> None:
        block = self.drives[drive_id].device
        block.drive = DriveConfig(drive_id, path_on_host)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def snapshot(self, state_path: str, mem_path: str, diff: bool = False) -> object:
        self.snapshots.append((state_path, mem_path, diff))
        return None

    def wait(self, timeout: float | None = None) -> None:
        return None

    def stop(self, status: int = 0, message: str = "") -> None:
        self.is_stopped = True

    def close(self) -> None:
        pass


class LoadFailed(ApiError):
    pass


class FakeBackend:
    def __init__(self) -> None:
        self.booted: list[BootRequest] = []
        self.restored: list[RestoreRequest] = []
        self.ctrl_alt_del = 0
        self.fail_next_restore = False

    def boot(self, request: BootRequest) -> RunningVm:
        self.booted.append(request)
        machine = FakeMachine(request.vcpu_count, request.mem_size_mib)
        drives = {d.drive_id: FakeAttachedDrive(FakeBlock(d)) for d in request.drives}
        return FakeVm(machine, FakeBoot(request.kernel_image_path), drives=drives)

    def restore(self, request: RestoreRequest) -> RunningVm:
        if self.fail_next_restore:
            self.fail_next_restore = False
            raise LoadFailed("bad magic in state file")
        self.restored.append(request)
        return FakeVm(FakeMachine(2, 256, request.track_dirty_pages), paused=True)

    def send_ctrl_alt_del(self, vm: RunningVm) -> None:
        self.ctrl_alt_del += 1


class Api:
    """Requests in, (status, decoded body) out: the API thread and VMM thread in
    one, without the queue."""

    def __init__(self) -> None:
        self.backend = FakeBackend()
        self.metrics = Metrics("test-vm")
        self.controller = Controller(self.backend, self.metrics, None, "test-vm")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = b"" if body is None else json.dumps(body).encode()
        parsed = parse_request(method, path, raw)
        response = (
            parsed if isinstance(parsed, Response) else self.controller.handle(parsed)
        )
        count_request(self.metrics, Request(method, path, {}, raw, True), response)
        self.last = response
        return response.status, json.loads(response.body) if response.body else None


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


def start(api: Api, kernel: str) -> None:
    assert api.call("PUT", "/boot-source", {"kernel_image_path": kernel})[0] == 204
    assert api.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204


LOAD = {
    "snapshot_path": "vm.state",
    "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"},
}


# --- reading --------------------------------------------------------------------------


def test_instance_info_follows_the_lifecycle(api: Api, kernel: str) -> None:
    status, info = api.call("GET", "/")
    assert status == 200
    assert info == {
        "app_name": "Ember",
        "id": "test-vm",
        "state": "Not started",
        "vmm_version": info["vmm_version"],
    }
    start(api, kernel)
    assert api.call("GET", "/")[1]["state"] == "Running"
    assert api.call("PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert api.call("GET", "/")[1]["state"] == "Paused"


def test_machine_config_defaults_put_and_patch(api: Api) -> None:
    assert api.call("GET", "/machine-config")[1] == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert (
        api.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})[0]
        == 204
    )
    assert api.call("PATCH", "/machine-config", {"track_dirty_pages": True})[0] == 204
    config = api.call("GET", "/vm/config")[1]
    assert config["machine-config"]["vcpu_count"] == 2
    assert config["machine-config"]["track_dirty_pages"] is True
    assert config["drives"] == [] and config["network-interfaces"] == []


# --- refusing bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "reason"),
    [
        ("PUT", "/machine-config", {"vcpu_count": 1}, "missing required field"),
        ("PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 1}, "`int`"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 1}, "<= 32"),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 0}, ">= 1"),
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": 1, "mem_size_mib": 1, "vcpus": 2},
            "unknown field `vcpus`",
        ),
        ("PATCH", "/machine-config", {}, "empty PATCH"),
        ("PUT", "/actions", {"action_type": "InstanceHalt"}, "Invalid enum value"),
        ("PATCH", "/vm", {"state": "paused"}, "Invalid enum value"),
        ("PATCH", "/vm", {"state": "Paused", "now": True}, "unknown field"),
        ("PUT", "/boot-source", {}, "`kernel_image_path`"),
        ("PUT", "/boot-source", {"kernel_image_path": "/no/such"}, "cannot open"),
        ("PUT", "/snapshot/create", {"snapshot_path": "s"}, "mem_file_path"),
        (
            "PUT",
            "/snapshot/create",
            {"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Half"},
            "Invalid enum value",
        ),
        ("PUT", "/snapshot/load", {"snapshot_path": "s"}, "missing memory source"),
        (
            "PUT",
            "/snapshot/load",
            {**LOAD, "mem_file_path": "vm.mem"},
            "not both",
        ),
        (
            "PUT",
            "/snapshot/load",
            {**LOAD, "mem_backend": {"backend_type": "Uffd", "backend_path": ""}},
            "Uffd socket path must not be empty",
        ),
        (
            "PUT",
            "/snapshot/load",
            {**LOAD, "huge_pages": "2M"},
            "override is not supported yet",
        ),
        (
            "PUT",
            "/snapshot/load",
            {
                **LOAD,
                "mem_backend": {"backend_type": "Uffd", "backend_path": "s"},
                "huge_pages": "2M",
            },
            "override is not supported yet",
        ),
        (
            "PUT",
            "/snapshot/load",
            {**LOAD, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t"}]},
            "'eth0'",
        ),
        (
            "PUT",
            "/snapshot/load",
            {**LOAD, "vsock_override": {"uds_path": "v"}},
            "vsock",
        ),
        ("PUT", "/logger", {"level": "Loud"}, "invalid log level"),
        ("PUT", "/metrics", {}, "metrics_path"),
        ("PUT", "/metrics", {"metrics_path": "/no/such/dir/m"}, "cannot open metrics"),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs"}, "`is_root_device`"),
        (
            "PUT",
            "/drives/rootfs",
            {"drive_id": "other", "is_root_device": False},
            "the drive_id in the path ('rootfs') differs from the one in the body",
        ),
        ("PUT", "/drives/a-b", {"drive_id": "a-b", "is_root_device": False}, "regex"),
        ("GET", "/drives/rootfs", None, "invalid request method and/or path"),
        ("PUT", "/drives/", {}, "invalid request method and/or path"),
        ("PUT", "/drives/a/b", {}, "invalid request method and/or path"),
        ("PUT", "/network-interfaces/eth0", {}, "network interfaces are not"),
        ("PUT", "/vsock", {}, "vsock device is not supported yet"),
        ("GET", "/balloon", None, "balloon device is not supported yet"),
        ("PUT", "/mmds/config", {}, "MMDS is not supported yet"),
        ("POST", "/actions", {}, "invalid request method and/or path: POST /actions"),
        ("GET", "/nowhere", None, "invalid request method and/or path"),
        ("PUT", "/machine-config", b"{not json", "malformed"),
        ("PUT", "/machine-config", None, "truncated"),
    ],
)
def test_refusals_name_their_reason(
    api: Api, method: str, path: str, body: Any, reason: str
) -> None:
    if isinstance(body, bytes):
        parsed = parse_request(method, path, body)
        assert isinstance(parsed, Response)
        status, answer = parsed.status, json.loads(parsed.body)
    else:
        status, answer = api.call(method, path, body)
    assert status == 400
    assert reason in answer["fault_message"]


def test_unsupported_machine_features_are_refused_by_name(api: Api) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"smt": True}, "smt"),
        ({"cpu_template": "T2"}, "CPU templates"),
    ]
    for extra, reason in cases:
        status, answer = api.call(
            "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64, **extra}
        )
        assert status == 400 and reason in answer["fault_message"]


def test_huge_pages_are_taken_with_an_even_memory_size(api: Api) -> None:
    for huge_pages in ("2M", "Transparent", "None"):
        body = {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": huge_pages}
        assert api.call("PUT", "/machine-config", body)[0] == 204
        status, answer = api.call("GET", "/machine-config")
        assert status == 200 and answer["huge_pages"] == huge_pages
    odd = {"vcpu_count": 1, "mem_size_mib": 65, "huge_pages": "2M"}
    status, answer = api.call("PUT", "/machine-config", odd)
    assert status == 400 and "multiple of 2" in answer["fault_message"]


# --- lifecycle rules ------------------------------------------------------------------


def test_boot_configuration_is_refused_after_start(api: Api, kernel: str) -> None:
    start(api, kernel)
    for method, path, body in [
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
        ("PATCH", "/machine-config", {"mem_size_mib": 64}),
        ("PUT", "/boot-source", {"kernel_image_path": kernel}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PUT", "/snapshot/load", LOAD),
    ]:
        status, _ = api.call(method, path, body)
        assert status == 400, (method, path)
    assert len(api.backend.booted) == 1


def test_start_needs_a_boot_source(api: Api) -> None:
    status, answer = api.call("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "boot source" in answer["fault_message"]


def test_running_vm_actions_need_a_vm(api: Api) -> None:
    for method, path, body in [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}),
    ]:
        status, answer = api.call(method, path, body)
        assert status == 400
        assert "before the microVM has started" in answer["fault_message"]


def test_snapshot_create_only_while_paused(api: Api, kernel: str) -> None:
    start(api, kernel)
    body = {"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Diff"}
    status, answer = api.call("PUT", "/snapshot/create", body)
    assert status == 400 and "pause it first" in answer["fault_message"]
    api.call("PATCH", "/vm", {"state": "Paused"})
    api.call("PATCH", "/vm", {"state": "Paused"})  # idempotent
    assert api.call("PUT", "/snapshot/create", body)[0] == 204
    vm = api.controller.vm
    assert isinstance(vm, FakeVm) and vm.snapshots == [("s", "m", True)]
    line: dict[str, Any] = api.metrics.take_line()
    assert line["latencies_us"]["diff_create_snapshot"] >= 0


def test_load_needs_a_fresh_process(api: Api, kernel: str) -> None:
    assert api.call("PUT", "/logger", {"level": "Info"})[0] == 204  # does not count
    api.call("PUT", "/boot-source", {"kernel_image_path": kernel})
    status, answer = api.call("PUT", "/snapshot/load", LOAD)
    assert status == 400
    assert "after boot resources" in answer["fault_message"]


def test_a_failed_load_leaves_the_process_ready_for_another(api: Api) -> None:
    api.backend.fail_next_restore = True
    status, answer = api.call("PUT", "/snapshot/load", LOAD)
    assert status == 400
    assert answer["fault_message"] == "Load snapshot error: bad magic in state file"
    assert api.call("GET", "/")[1]["state"] == "Not started"
    body = {**LOAD, "enable_diff_snapshots": True, "resume_vm": True}
    assert api.call("PUT", "/snapshot/load", body)[0] == 204
    [request] = api.backend.restored
    assert request.track_dirty_pages and request.resume_vm
    assert request.mem_file_path == "vm.mem"
    assert api.last.headers == {"Deprecation": "true"}
    assert api.call("GET", "/machine-config")[1]["vcpu_count"] == 2  # the snapshot's


def test_load_huge_pages_none_overrides_the_snapshot(api: Api) -> None:
    # "None" restores on 4 KiB pages whatever the snapshot used; the default,
    # "Snapshot", keeps what it used.
    assert api.call("PUT", "/snapshot/load", {**LOAD, "huge_pages": "None"})[0] == 204
    assert api.backend.restored[0].huge_pages_override == "None"


def test_load_keeps_the_snapshots_pages_by_default(api: Api) -> None:
    assert api.call("PUT", "/snapshot/load", LOAD)[0] == 204
    assert api.backend.restored[0].huge_pages_override is None


def test_deprecated_mem_file_path_still_loads(api: Api) -> None:
    body = {"snapshot_path": "s", "mem_file_path": "m"}
    assert api.call("PUT", "/snapshot/load", body)[0] == 204
    assert api.backend.restored[0].mem_file_path == "m"
    line: dict[str, Any] = api.metrics.take_line()
    assert line["deprecated_api"] == {
        "deprecated_http_api_calls": 1,
        "deprecated_cmd_line_api_calls": 0,
    }


def test_ctrl_alt_del_reaches_the_backend(api: Api, kernel: str) -> None:
    start(api, kernel)
    assert api.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
    assert api.backend.ctrl_alt_del == 1


# --- faults ---------------------------------------------------------------------------


def test_unexpected_errors_are_500_not_400() -> None:
    status, message = fault_for("Load snapshot", ZeroDivisionError("oops"))
    assert status == 500 and "internal error" in message


def test_vmm_errors_are_400_with_the_operation() -> None:
    from ember.snapshot.state_file import CrcMismatchError

    status, message = fault_for("Load snapshot", CrcMismatchError("CRC mismatch"))
    assert (status, message) == (400, "Load snapshot error: CRC mismatch")


def test_every_route_names_a_handler_and_metric() -> None:
    api = Api()
    for route in ROUTES.values():
        assert route.operation in api.controller.handlers
        api.metrics.increment(route.metric_group, f"{route.metric}_count")


# --- metrics and logs -----------------------------------------------------------------


def test_metrics_lines_count_since_the_last_flush(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.touch()
    body = {"metrics_path": str(path), "emit_id": True, "properties": {"az": "a"}}
    assert api.call("PUT", "/metrics", body)[0] == 204
    assert api.call("PUT", "/metrics", body)[0] == 400  # once per process
    api.call("PUT", "/machine-config", {"vcpu_count": 1})
    assert api.call("PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
    assert api.call("PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["id"] == "test-vm" and first["properties"] == {"az": "a"}
    assert first["put_api_requests"]["metrics_count"] == 2
    assert first["put_api_requests"]["metrics_fails"] == 1
    assert first["put_api_requests"]["machine_cfg_fails"] == 1
    assert second["put_api_requests"]["metrics_count"] == 0
    assert second["put_api_requests"]["actions_count"] == 1  # the first flush
    assert set(first["latencies_us"]) == {
        "full_create_snapshot",
        "diff_create_snapshot",
        "load_snapshot",
        "pause_vm",
        "resume_vm",
    }


def test_log_lines_carry_instance_id_thread_level_and_origin() -> None:
    record = logging.LogRecord(
        "ember.x", logging.WARNING, "/a/b.py", 7, "hi %s", ("you",), None
    )
    record.threadName = "ember_vmm"
    plain = InstanceFormatter("vm-1", False, False).format(record)
    full = InstanceFormatter("vm-1", True, True).format(record)
    assert plain.endswith(" [vm-1:ember_vmm] hi you")
    assert full.endswith(" [vm-1:ember_vmm:WARNING:b.py:7] hi you")


def test_logger_level_is_case_insensitive() -> None:
    assert (
        msgspec.json.decode(b'{"level": "debug"}', type=models.Logger).level == "Debug"
    )


# --- config file ----------------------------------------------------------------------


def test_config_file_becomes_the_same_calls(tmp_path: Path, kernel: str) -> None:
    path = tmp_path / "vm.json"
    path.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": kernel, "boot_args": "quiet"},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
                "drives": [],
                "network-interfaces": [],
            }
        )
    )
    calls = config_calls(read_config_file(str(path)))
    assert [call.operation for call in calls] == [
        "put_machine_config",
        "put_boot_source",
        "put_actions",
    ]
    api = Api()
    for call in calls:
        assert api.controller.handle(call).status == 204
    assert api.backend.booted[0].vcpu_count == 2


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"machine-config": {"vcpu_count": 1, "mem_size_mib": 8}}, "boot-source"),
        (
            {"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "r"}]},
            "`is_root_device`",
        ),
        (
            {"boot-source": {"kernel_image_path": "k"}, "vsock": {"uds_path": "v"}},
            "vsock device is not supported yet",
        ),
        ({"boot-source": {"kernel_image_path": "k"}, "bogus": 1}, "unknown field"),
    ],
)
def test_config_file_refusals(
    tmp_path: Path, config: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigFileError, match=re.escape(reason)):
        read_config_file(str(path))


def test_api_call_defaults() -> None:
    assert ApiCall("get_instance_info").title == "Request"


def test_config_file_drives_become_put_drive_calls(tmp_path: Path, kernel: str) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    path = tmp_path / "vm.json"
    drive = {"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True}
    path.write_text(
        json.dumps({"boot-source": {"kernel_image_path": kernel}, "drives": [drive]})
    )
    calls = config_calls(read_config_file(str(path)))
    assert [call.operation for call in calls] == [
        "put_boot_source",
        "put_drive",
        "put_actions",
    ]
    api = Api()
    for call in calls:
        assert api.controller.handle(call).status == 204
    [booted] = api.backend.booted
    assert booted.drives == (DriveConfig("rootfs", str(disk), is_root_device=True),)


# --- drives ---------------------------------------------------------------------------


@pytest.fixture
def disks(tmp_path: Path) -> list[str]:
    paths = []
    for index, size in enumerate((4096, 8192, 16384)):
        path = tmp_path / f"disk{index}.img"
        path.write_bytes(bytes(size))
        paths.append(str(path))
    return paths


def drive(drive_id: str, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "drive_id": drive_id,
        "path_on_host": path,
        "is_root_device": False,
        **extra,
    }


def test_routes_with_a_path_parameter() -> None:
    found = find_route("PUT", "/drives/data_1")
    assert found is not None and found[0].operation == "put_drive"
    assert found[1] == {"drive_id": "data_1"}
    patch = find_route("PATCH", "/drives/x")
    assert patch is not None and patch[0].operation == "patch_drive"
    for method, path in [
        ("GET", "/drives/x"),
        ("PUT", "/drives/"),
        ("PUT", "/drives"),
        ("PUT", "/drives/x/y"),
        ("PUT", "/drives/{drive_id}/"),
    ]:
        assert find_route(method, path) is None, (method, path)


def test_put_drives_then_start(api: Api, kernel: str, disks: list[str]) -> None:
    assert api.call("PUT", "/drives/data", drive("data", disks[0]))[0] == 204
    root = drive("rootfs", disks[1], is_root_device=True, partuuid="0eaa91a0-01")
    assert api.call("PUT", "/drives/rootfs", root)[0] == 204
    read_only = drive("data", disks[2], is_read_only=True, cache_type="Writeback")
    assert api.call("PUT", "/drives/data", read_only)[0] == 204  # an update
    assert api.call("GET", "/vm/config")[1]["drives"] == [
        {
            "drive_id": "rootfs",
            "path_on_host": disks[1],
            "is_root_device": True,
            "is_read_only": False,
            "cache_type": "Unsafe",
            "io_engine": "Sync",
            "partuuid": "0eaa91a0-01",
        },
        {
            "drive_id": "data",
            "path_on_host": disks[2],
            "is_root_device": False,
            "is_read_only": True,
            "cache_type": "Writeback",
            "io_engine": "Sync",
        },
    ]
    start(api, kernel)
    [request] = api.backend.booted
    assert request.drives == (
        DriveConfig("data", disks[2], is_read_only=True, cache_type="Writeback"),
        DriveConfig("rootfs", disks[1], True, False, "0eaa91a0-01"),
    )
    status, answer = api.call("PUT", "/drives/late", drive("late", disks[0]))
    assert status == 400
    assert (
        "drives cannot be changed once the microVM has started"
        in (answer["fault_message"])
    )


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"io_engine": "Async"}, 'io_engine "Async" is not supported'),
        (
            {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}},
            "rate_limiter is not supported yet",
        ),
        ({"socket": "/run/vhost.sock"}, "vhost-user block devices (socket)"),
        ({"path_on_host": None}, "path_on_host is required"),
        ({"path_on_host": ""}, "path_on_host must not be empty"),
        ({"path_on_host": "/no/such/disk"}, "cannot open the backing file"),
        ({"cache_type": "WriteThrough"}, "Invalid enum value"),
        ({"is_read_only": 0}, "Expected `bool`"),
        ({"size": 4}, "unknown field `size`"),
    ],
)
def test_bad_drives_are_refused_by_name(
    api: Api, disks: list[str], extra: dict[str, Any], reason: str
) -> None:
    status, answer = api.call("PUT", "/drives/d", drive("d", disks[0], **extra))
    assert status == 400
    assert answer["fault_message"].startswith("Drive configuration error: ")
    assert reason in answer["fault_message"]
    assert api.call("GET", "/vm/config")[1]["drives"] == []


def test_an_inert_rate_limiter_is_accepted(api: Api, disks: list[str]) -> None:
    for limiter in [{}, {"ops": {"size": 0, "refill_time": 100}}]:
        body = drive("d", disks[0], rate_limiter=limiter)
        assert api.call("PUT", "/drives/d", body)[0] == 204


def test_only_one_root_device(api: Api, disks: list[str]) -> None:
    first = drive("a", disks[0], is_root_device=True)
    assert api.call("PUT", "/drives/a", first)[0] == 204
    second = drive("b", disks[1], is_root_device=True)
    status, answer = api.call("PUT", "/drives/b", second)
    assert status == 400 and "only one drive can be the root" in answer["fault_message"]
    # Replacing the root device by itself is no second root.
    assert api.call("PUT", "/drives/a", {**first, "path_on_host": disks[2]})[0] == 204
    assert [d["drive_id"] for d in api.call("GET", "/vm/config")[1]["drives"]] == ["a"]


def test_a_drive_blocks_a_later_load(api: Api, disks: list[str]) -> None:
    assert api.call("PUT", "/drives/d", drive("d", disks[0]))[0] == 204
    status, answer = api.call("PUT", "/snapshot/load", LOAD)
    assert status == 400 and "after boot resources" in answer["fault_message"]
    assert api.backend.restored == []


def test_patch_drive_after_start(api: Api, kernel: str, disks: list[str]) -> None:
    patch = {"drive_id": "d", "path_on_host": disks[1]}
    status, answer = api.call("PATCH", "/drives/d", patch)
    assert status == 400 and "before the microVM has started" in answer["fault_message"]
    api.call("PUT", "/drives/d", drive("d", disks[0]))
    start(api, kernel)
    assert api.call("PATCH", "/drives/d", patch)[0] == 204
    [listed] = api.call("GET", "/vm/config")[1]["drives"]
    assert listed["path_on_host"] == disks[1]
    for path, body, reason in [
        ("/drives/e", {"drive_id": "e", "path_on_host": disks[2]}, "unknown drive 'e'"),
        ("/drives/d", {"drive_id": "d"}, "empty PATCH request"),
        ("/drives/d", {**patch, "is_read_only": True}, "unknown field"),
        (
            "/drives/d",
            {**patch, "rate_limiter": {"ops": {"size": 10, "refill_time": 10}}},
            "rate_limiter is not supported yet",
        ),
        ("/drives/x", patch, "differs from the one in the body ('d')"),
    ]:
        status, answer = api.call("PATCH", path, body)
        assert status == 400, body
        assert answer["fault_message"].startswith("Drive update error: ")
        assert reason in answer["fault_message"]


def test_block_metrics_are_deltas_per_drive_and_summed(
    api: Api, kernel: str, disks: list[str]
) -> None:
    first: dict[str, Any] = api.metrics.take_line()
    assert set(first["block"]) >= {
        "read_bytes",
        "write_bytes",
        "read_count",
        "write_count",
        "flush_count",
        "execute_fails",
    }
    api.call("PUT", "/drives/a", drive("a", disks[0]))
    api.call("PUT", "/drives/b", drive("b", disks[1]))
    api.call("PUT", "/drives/b", drive("b", "/no/such"))
    start(api, kernel)
    api.call("PATCH", "/drives/a", {"drive_id": "a", "path_on_host": disks[2]})
    vm = api.controller.vm
    assert isinstance(vm, FakeVm)
    a, b = vm.drives["a"], vm.drives["b"]
    a.device.metrics.read_count, a.device.metrics.read_bytes = 2, 1024
    b.device.metrics.write_count, b.device.metrics.write_bytes = 1, 4096
    b.transport.error_count = 1
    line: dict[str, Any] = api.metrics.take_line()
    assert line["put_api_requests"]["drive_count"] == 3
    assert line["put_api_requests"]["drive_fails"] == 1
    assert line["patch_api_requests"]["drive_count"] == 1
    assert line["block_a"]["update_count"] == 1
    assert line["block_a"]["read_bytes"] == 1024 and line["block_a"]["read_count"] == 2
    assert line["block_b"]["write_bytes"] == 4096
    assert line["block_b"]["event_fails"] == 1
    assert line["block"]["read_bytes"] == 1024
    assert line["block"]["write_bytes"] == 4096
    a.device.metrics.read_count = 5
    line = dict(api.metrics.take_line())
    assert line["block_a"]["read_count"] == 3 and line["block"]["read_count"] == 3
    assert line["block_b"]["write_bytes"] == 0


def test_uffd_load_reaches_the_backend(api: Api) -> None:
    body = {
        "snapshot_path": "vm.state",
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/uffd.sock"},
        "resume_vm": True,
    }
    assert api.call("PUT", "/snapshot/load", body)[0] == 204
    [request] = api.backend.restored
    assert request.mem_backend == "Uffd"
    assert request.mem_file_path == "/run/uffd.sock"
    assert api.backend.restored[0].resume_vm

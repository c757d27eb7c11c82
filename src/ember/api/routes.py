"""From an HTTP request to an `ApiCall`: the route table and body decoding.

Pure code: it runs on the API thread, answers what is malformed without
bothering the VMM, and hands the rest to the controller. Paths, methods and
bodies are Firecracker's; the device endpoints Ember does not have yet answer
400 saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ember.api import models
from ember.api.controller import ApiCall, check_load_params, fault_response
from ember.api.faults import ApiError, DeviceNotSupportedError, fault_for
from ember.api.http import Request, Response
from ember.metrics import Metrics


@dataclass(frozen=True)
class Route:
    operation: str
    title: str  # names the operation in fault messages: "<title> error: ..."
    body: type[models.Body] | None
    metric_group: str
    metric: str  # counted as <metric>_count, failures as <metric>_fails


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): Route(
        "get_instance_info", "Describe instance", None, "get_api_requests",
        "instance_info",
    ),
    ("GET", "/version"): Route(
        "get_version", "Get version", None, "get_api_requests", "vmm_version"
    ),
    ("GET", "/vm/config"): Route(
        "get_vm_config", "Get VM config", None, "get_api_requests", "vm_config"
    ),
    ("GET", "/machine-config"): Route(
        "get_machine_config", "Get machine config", None, "get_api_requests",
        "machine_cfg",
    ),
    ("PUT", "/machine-config"): Route(
        "put_machine_config", "Machine config", models.MachineConfiguration,
        "put_api_requests", "machine_cfg",
    ),
    ("PATCH", "/machine-config"): Route(
        "patch_machine_config", "Machine config update",
        models.MachineConfigurationUpdate, "patch_api_requests", "machine_cfg",
    ),
    ("PUT", "/boot-source"): Route(
        "put_boot_source", "Boot source", models.BootSource, "put_api_requests",
        "boot_source",
    ),
    ("PUT", "/actions"): Route(
        "put_actions", "Action", models.InstanceActionInfo, "put_api_requests",
        "actions",
    ),
    ("PATCH", "/vm"): Route(
        "patch_vm", "VM state", models.Vm, "patch_api_requests", "vm"
    ),
    ("PUT", "/snapshot/create"): Route(
        "put_snapshot_create", "Create snapshot", models.SnapshotCreateParams,
        "put_api_requests", "snapshot_create",
    ),
    ("PUT", "/snapshot/load"): Route(
        "put_snapshot_load", "Load snapshot", models.SnapshotLoadParams,
        "put_api_requests", "snapshot_load",
    ),
    ("PUT", "/logger"): Route(
        "put_logger", "Logger", models.Logger, "put_api_requests", "logger"
    ),
    ("PUT", "/metrics"): Route(
        "put_metrics", "Metrics", models.Metrics, "put_api_requests", "metrics"
    ),
}  # fmt: skip

# Firecracker endpoints whose devices Ember does not have yet: path (or path
# prefix, ending in "/") -> the answer.
UNSUPPORTED_DEVICES: dict[str, str] = {
    "/drives/": "block devices (drives) are not supported yet",
    "/network-interfaces/": "network interfaces are not supported yet",
    "/pmem/": "pmem devices are not supported yet",
    "/vsock": "the vsock device is not supported yet",
    "/balloon": "the balloon device is not supported yet",
    "/balloon/": "the balloon device is not supported yet",
    "/entropy": "the entropy device is not supported yet",
    "/mmds": "MMDS is not supported yet",
    "/mmds/": "MMDS is not supported yet",
    "/cpu-config": "custom CPU configuration is not supported yet",
    "/serial": "serial console configuration is not supported yet",
    "/hotplug/memory": "memory hotplug is not supported yet",
}
_DEVICE_METHODS = ("GET", "PUT", "PATCH")
_METRIC_GROUPS = {
    "GET": "get_api_requests",
    "PUT": "put_api_requests",
    "PATCH": "patch_api_requests",
}


def unsupported_device(path: str) -> str | None:
    if path in UNSUPPORTED_DEVICES:
        return UNSUPPORTED_DEVICES[path]
    for prefix, device in UNSUPPORTED_DEVICES.items():
        if prefix.endswith("/") and path.startswith(prefix) and len(path) > len(prefix):
            return device
    return None


def parse_request(method: str, path: str, body: bytes) -> ApiCall | Response:
    """The call to execute, or the error response that refuses the request."""
    route = ROUTES.get((method, path))
    if route is None:
        return _refuse_unrouted(method, path)
    if route.body is None:
        return ApiCall(route.operation, route.title)
    try:
        decoded = msgspec.json.decode(body, type=route.body)
        if isinstance(decoded, models.SnapshotLoadParams):
            check_load_params(decoded)
    except (msgspec.ValidationError, msgspec.DecodeError, ApiError) as error:
        return fault_response(*fault_for(route.title, error))
    return ApiCall(route.operation, route.title, decoded, _is_deprecated(decoded))


def _refuse_unrouted(method: str, path: str) -> Response:
    refusal = unsupported_device(path)
    if refusal is not None and method in _DEVICE_METHODS:
        error = DeviceNotSupportedError(refusal)
        return fault_response(*fault_for("Device configuration", error))
    shown = path if len(path) <= 200 else path[:200] + "..."
    return fault_response(
        400, f"invalid request method and/or path: {method[:20]} {shown}"
    )


def _is_deprecated(body: msgspec.Struct) -> bool:
    if isinstance(body, models.SnapshotLoadParams):
        return body.mem_file_path is not None or body.enable_diff_snapshots
    return False


def count_request(metrics: Metrics, request: Request, response: Response) -> None:
    """Firecracker's per-endpoint counters: `<metric>_count`, `<metric>_fails`."""
    route = ROUTES.get((request.method, request.path))
    if route is not None:
        group, metric = route.metric_group, route.metric
        metrics.increment(group, f"{metric}_count")
        if response.status >= 400 and group != "get_api_requests":
            metrics.increment(group, f"{metric}_fails")
    elif request.method in _METRIC_GROUPS and unsupported_device(request.path):
        metrics.increment(_METRIC_GROUPS[request.method], "unsupported_device_count")
    else:
        metrics.increment("api_server", "request_parse_fails")
    if "Deprecation" in response.headers:
        metrics.increment("deprecated_api", "deprecated_http_api_calls")

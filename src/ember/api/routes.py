"""From an HTTP request to an `ApiCall`: the route table and body decoding.

Pure code: it runs on the API thread, answers what is malformed without
bothering the VMM, and hands the rest to the controller. Paths, methods and
bodies are Firecracker's; the device endpoints Ember does not have yet answer
400 saying so.

A route's path is either exact ("/machine-config") or a template with one
parameter per segment ("/drives/{drive_id}"). A parameter names the body field
that must hold the same value, so a body cannot configure another resource than
the one its path names.
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
    ("PUT", "/drives/{drive_id}"): Route(
        "put_drive", "Drive configuration", models.Drive, "put_api_requests",
        "drive",
    ),
    ("PATCH", "/drives/{drive_id}"): Route(
        "patch_drive", "Drive update", models.PartialDrive, "patch_api_requests",
        "drive",
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


_EXACT_ROUTES = {key: route for key, route in ROUTES.items() if "{" not in key[1]}
_TEMPLATE_ROUTES = [
    (method, template.split("/"), route)
    for (method, template), route in ROUTES.items()
    if "{" in template
]


def find_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route serving `method path`, with the values of its path parameters."""
    route = _EXACT_ROUTES.get((method, path))
    if route is not None:
        return route, {}
    segments = path.split("/")
    for route_method, template, route in _TEMPLATE_ROUTES:
        if route_method == method:
            params = _match(template, segments)
            if params is not None:
                return route, params
    return None


def _match(template: list[str], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params: dict[str, str] = {}
    for expected, segment in zip(template, segments, strict=True):
        if expected.startswith("{") and expected.endswith("}"):
            if not segment:
                return None
            params[expected[1:-1]] = segment
        elif expected != segment:
            return None
    return params


def parse_request(method: str, path: str, body: bytes) -> ApiCall | Response:
    """The call to execute, or the error response that refuses the request."""
    found = find_route(method, path)
    if found is None:
        return _refuse_unrouted(method, path)
    route, params = found
    if route.body is None:
        return ApiCall(route.operation, route.title)
    try:
        decoded = msgspec.json.decode(body, type=route.body)
        _check_path_params(params, decoded)
        if isinstance(decoded, models.SnapshotLoadParams):
            check_load_params(decoded)
    except (msgspec.ValidationError, msgspec.DecodeError, ApiError) as error:
        return fault_response(*fault_for(route.title, error))
    return ApiCall(route.operation, route.title, decoded, _is_deprecated(decoded))


def _check_path_params(params: dict[str, str], body: msgspec.Struct) -> None:
    for name, value in params.items():
        in_body = getattr(body, name)
        if in_body != value:
            shown = value if len(value) <= 64 else value[:64] + "..."
            raise ApiError(
                f"the {name} in the path ({shown!r}) differs from the one in the "
                f"body ({in_body!r})"
            )


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
    found = find_route(request.method, request.path)
    if found is not None:
        group, metric = found[0].metric_group, found[0].metric
        metrics.increment(group, f"{metric}_count")
        if response.status >= 400 and group != "get_api_requests":
            metrics.increment(group, f"{metric}_fails")
    elif request.method in _METRIC_GROUPS and unsupported_device(request.path):
        metrics.increment(_METRIC_GROUPS[request.method], "unsupported_device_count")
    else:
        metrics.increment("api_server", "request_parse_fails")
    if "Deprecation" in response.headers:
        metrics.increment("deprecated_api", "deprecated_http_api_calls")

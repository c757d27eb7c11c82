"""Request and response bodies of the HTTP API, in Firecracker's shapes.

Every request body is a `msgspec.Struct` that refuses unknown fields, so a typo in
a field name is an error rather than a silently ignored setting; msgspec's type
checks are strict (no "1" for 1, no 0 for false). Fields that are absent and fields
that are set to their default mean the same thing, except in PATCH bodies, where
`UNSET` marks what the request leaves alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

MAX_VCPUS = 32  # the API's range, as Firecracker's; the VMM checks its own too

VcpuCount = Annotated[int, Meta(ge=1, le=MAX_VCPUS)]
MemSizeMib = Annotated[int, Meta(ge=1)]
HugePagesConfig = Literal["None", "Transparent", "2M"]
CpuTemplateName = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every request body."""


# --- configuration before boot ---------------------------------------------------


class MachineConfiguration(Body):
    vcpu_count: VcpuCount
    mem_size_mib: MemSizeMib
    smt: bool = False
    track_dirty_pages: bool = False
    huge_pages: HugePagesConfig = "None"
    cpu_template: CpuTemplateName = "None"


class MachineConfigurationUpdate(Body):
    """PATCH /machine-config: only the fields present change."""

    vcpu_count: VcpuCount | UnsetType = UNSET
    mem_size_mib: MemSizeMib | UnsetType = UNSET
    smt: bool | UnsetType = UNSET
    track_dirty_pages: bool | UnsetType = UNSET
    huge_pages: HugePagesConfig | UnsetType = UNSET
    cpu_template: CpuTemplateName | UnsetType = UNSET


class BootSource(Body):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


DriveId = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_]+$")]
CacheType = Literal["Unsafe", "Writeback"]


class TokenBucket(Body):
    size: Annotated[int, Meta(ge=0)]
    refill_time: Annotated[int, Meta(ge=0)]
    one_time_burst: Annotated[int, Meta(ge=0)] | None = None


class RateLimiter(Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None

    @property
    def limits(self) -> bool:
        """Whether any bucket limits anything (an empty bucket, or one with a
        zero size or refill time, does not)."""
        return any(
            bucket is not None and bucket.size > 0 and bucket.refill_time > 0
            for bucket in (self.bandwidth, self.ops)
        )


class Drive(Body):
    """PUT /drives/{drive_id}: a virtio-block device backed by a host file.

    `socket` (vhost-user) and `io_engine` "Async" are Firecracker's and parse
    here, so that refusing them can name them."""

    drive_id: DriveId
    is_root_device: bool
    path_on_host: str | None = None
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: CacheType = "Unsafe"
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] = "Sync"
    socket: str | None = None


class PartialDrive(Body):
    """PATCH /drives/{drive_id}: after start, back the drive with another file."""

    drive_id: DriveId
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class InstanceActionInfo(Body):
    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class Logger(Body):
    level: str | None = None
    log_path: str | None = None
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None

    def __post_init__(self) -> None:
        # Firecracker takes the level in any case ("info", "INFO").
        if self.level is not None:
            level = self.level.capitalize()
            if level not in LOG_LEVELS:
                raise ValueError(
                    f"invalid log level {self.level!r}: expected one of "
                    + ", ".join(LOG_LEVELS)
                )
            self.level = level


class Metrics(Body):
    metrics_path: str
    emit_id: bool = False
    properties: dict[str, str] = msgspec.field(default_factory=dict)


# --- running ---------------------------------------------------------------------


class Vm(Body):
    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(Body):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] = "Full"


class MemoryBackend(Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(Body):
    iface_id: str
    host_dev_name: str


class VsockOverride(Body):
    uds_path: str


class SnapshotLoadParams(Body):
    snapshot_path: str
    mem_backend: MemoryBackend | None = None
    mem_file_path: str | None = None  # deprecated: use mem_backend
    track_dirty_pages: bool = False
    enable_diff_snapshots: bool = False  # deprecated alias of track_dirty_pages
    resume_vm: bool = False
    network_overrides: list[NetworkOverride] = msgspec.field(default_factory=list)
    vsock_override: VsockOverride | None = None
    clock_realtime: bool = False
    huge_pages: Literal["Snapshot", "None", "Transparent", "2M"] = "Snapshot"


# --- the config file -------------------------------------------------------------


class ConfigFile(Body):
    """`--config-file`: the same resources the API configures, in one JSON object.

    Drives are applied as PUT /drives would be. The other device sections are
    accepted in the file's grammar so that a Firecracker config with empty device
    lists loads; a non-empty one is refused later, by name."""

    boot_source: BootSource | None = msgspec.field(name="boot-source", default=None)
    machine_config: MachineConfiguration | None = msgspec.field(
        name="machine-config", default=None
    )
    logger: Logger | None = None
    metrics: Metrics | None = None
    drives: list[Drive] = msgspec.field(default_factory=list)
    network_interfaces: list[Any] = msgspec.field(
        name="network-interfaces", default_factory=list
    )
    pmem: list[Any] = msgspec.field(default_factory=list)
    vsock: Any = None
    balloon: Any = None
    entropy: Any = None
    mmds_config: Any = msgspec.field(name="mmds-config", default=None)
    cpu_config: Any = msgspec.field(name="cpu-config", default=None)
    serial: Any = None
    memory_hotplug: Any = msgspec.field(name="memory-hotplug", default=None)


# --- responses -------------------------------------------------------------------


class InstanceInfo(msgspec.Struct):
    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


class MachineConfigurationView(msgspec.Struct, omit_defaults=False):
    vcpu_count: int
    mem_size_mib: int
    smt: bool
    track_dirty_pages: bool
    huge_pages: str


class BootSourceView(msgspec.Struct, omit_defaults=True):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class DriveView(msgspec.Struct, omit_defaults=True):
    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool
    cache_type: str
    io_engine: str
    partuuid: str | None = None


class FullVmConfiguration(msgspec.Struct, omit_defaults=True):
    machine_config: MachineConfigurationView = msgspec.field(name="machine-config")
    # Both lists are always present, as in Firecracker (network interfaces stay
    # empty while Ember has none).
    drives: list[DriveView] = msgspec.field()
    network_interfaces: list[Any] = msgspec.field(name="network-interfaces")
    boot_source: BootSourceView | None = msgspec.field(name="boot-source", default=None)
    logger: Logger | None = None
    metrics: Metrics | None = None


class FirecrackerVersion(msgspec.Struct):
    firecracker_version: str


class Fault(msgspec.Struct):
    fault_message: str

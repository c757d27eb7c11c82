"""Drives through the API: Firecracker's drive bodies, checked against what
Ember's virtio-block device does, turned into the VMM's `DriveConfig`, shown in
GET /vm/config, and counted in the metrics' `block` groups.

Pure code apart from opening the backing file: a drive whose file cannot be
opened is refused when it is configured, not when InstanceStart finds out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from ember.api import models
from ember.api.faults import ApiError
from ember.vmm.config import ConfigError, DriveConfig, validate_drives

if TYPE_CHECKING:
    from ember.devices.virtio.block import BlockMetrics


class BlockDevice(Protocol):
    @property
    def drive(self) -> DriveConfig: ...

    @property
    def metrics(self) -> BlockMetrics: ...


class Transport(Protocol):
    @property
    def error_count(self) -> int: ...


class AttachedDrive(Protocol):
    """The part of a microVM's drive (`MmioAttachment[Block]`) the API reads."""

    @property
    def device(self) -> BlockDevice: ...

    @property
    def transport(self) -> Transport: ...


def drive_config(body: models.Drive) -> DriveConfig:
    """The VMM's configuration for `body`; what Ember cannot do yet is refused
    by name."""
    if body.socket is not None:
        raise ApiError("vhost-user block devices (socket) are not supported")
    if body.path_on_host is None:
        raise ApiError("path_on_host is required for a virtio-block drive")
    if body.io_engine == "Async":
        raise ApiError('io_engine "Async" is not supported; use "Sync"')
    if body.rate_limiter is not None and body.rate_limiter.limits:
        raise ApiError("rate_limiter is not supported yet")
    return DriveConfig(
        drive_id=body.drive_id,
        path_on_host=body.path_on_host,
        is_root_device=body.is_root_device,
        is_read_only=body.is_read_only,
        partuuid=body.partuuid,
        cache_type=body.cache_type,
    )


def check_update(body: models.PartialDrive) -> str:
    """The new path of a PATCH, once what it cannot do is refused."""
    if body.rate_limiter is not None and body.rate_limiter.limits:
        raise ApiError("rate_limiter is not supported yet")
    if body.path_on_host is None:
        raise ApiError("empty PATCH request: give path_on_host")
    return body.path_on_host


def check_backing_file(drive: DriveConfig) -> None:
    """Open the file the way the device will: read-write unless read-only."""
    flags = (os.O_RDONLY if drive.is_read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(drive.path_on_host, flags)
    except OSError as error:
        raise ApiError(
            f"cannot open the backing file {drive.path_on_host!r} of drive "
            f"{drive.drive_id!r}: {error.strerror}"
        ) from None
    os.close(fd)


def with_drive(
    drives: Mapping[str, DriveConfig], drive: DriveConfig
) -> dict[str, DriveConfig]:
    """`drives` with `drive` added, or replacing the one with its ID (PUT on an
    existing drive updates it, as in Firecracker); at most one root device."""
    updated = dict(drives)
    updated[drive.drive_id] = drive
    try:
        validate_drives(list(updated.values()))
    except ConfigError as error:
        raise ApiError(str(error)) from None
    return updated


def drive_views(drives: Iterable[DriveConfig]) -> list[models.DriveView]:
    """GET /vm/config's drives: the root device first, as Firecracker lists them."""
    ordered = sorted(drives, key=lambda drive: not drive.is_root_device)
    return [
        models.DriveView(
            drive_id=drive.drive_id,
            path_on_host=drive.path_on_host,
            is_root_device=drive.is_root_device,
            is_read_only=drive.is_read_only,
            cache_type=drive.cache_type,
            io_engine="Sync",
            partuuid=drive.partuuid,
        )
        for drive in ordered
    ]


# --- metrics ----------------------------------------------------------------------

# Firecracker's block metrics that Ember's device counts. `event_fails` counts
# what made the transport give up on the device (a bad queue at activation or
# later: the device then needs a reset).
BLOCK_FIELDS = (
    "read_bytes",
    "write_bytes",
    "read_count",
    "write_count",
    "flush_count",
    "invalid_reqs_count",
    "execute_fails",
    "event_fails",
    "update_count",
    "update_fails",
)


def _totals(attached: AttachedDrive) -> dict[str, int]:
    metrics = attached.device.metrics
    totals = {
        name: getattr(metrics, name) for name in BLOCK_FIELDS if name != "event_fails"
    }
    totals["event_fails"] = attached.transport.error_count
    return totals


class BlockCounters:
    """Firecracker's `block` group (every drive summed) and one `block_<id>`
    group per drive, each holding what happened since the previous line.

    The devices keep running totals; this remembers the totals it last
    reported and answers the difference."""

    def __init__(self) -> None:
        self._reported: dict[str, dict[str, int]] = {}

    def take(self, drives: Mapping[str, AttachedDrive]) -> dict[str, dict[str, int]]:
        groups: dict[str, dict[str, int]] = {"block": dict.fromkeys(BLOCK_FIELDS, 0)}
        reported: dict[str, dict[str, int]] = {}
        for drive_id, attached in drives.items():
            totals = _totals(attached)
            before = self._reported.get(drive_id, {})
            delta = {name: totals[name] - before.get(name, 0) for name in BLOCK_FIELDS}
            groups[f"block_{drive_id}"] = delta
            for name, value in delta.items():
                groups["block"][name] += value
            reported[drive_id] = totals
        self._reported = reported
        return groups

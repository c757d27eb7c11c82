"""Firecracker-shaped metrics: one JSON object per line, flushed to a file or FIFO.

Each flush writes every group with every field, so a reader sees the same shape
each time. As in Firecracker, counters hold what happened *since the previous
flush* (a reader sums lines to get totals), while `latencies_us` hold the most
recent duration of each operation, in microseconds. Groups and field names
follow Firecracker's where it has them (`put_api_requests.actions_count`,
`latencies_us.load_snapshot`); Ember's additions (`snapshot_create_count`, ...)
follow the same pattern.

A flush happens on the FlushMetrics action, every `FLUSH_INTERVAL_S` while the
monitor runs, and when it exits.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable

FLUSH_INTERVAL_S = 60.0

# Groups whose counters devices keep (`block`, `block_<drive_id>`), each as
# what happened since the previous call.
DeviceCounters = Callable[[], dict[str, dict[str, int]]]

_COUNTER_GROUPS: dict[str, tuple[str, ...]] = {
    "api_server": (
        "sync_response_fails",
        "sync_vmm_send_timeout_count",
        "request_parse_fails",
        "connections_refused",
    ),
    "get_api_requests": (
        "instance_info_count",
        "machine_cfg_count",
        "vm_config_count",
        "vmm_version_count",
        "unsupported_device_count",
    ),
    "put_api_requests": (
        "actions_count",
        "actions_fails",
        "boot_source_count",
        "boot_source_fails",
        "drive_count",
        "drive_fails",
        "machine_cfg_count",
        "machine_cfg_fails",
        "logger_count",
        "logger_fails",
        "metrics_count",
        "metrics_fails",
        "snapshot_create_count",
        "snapshot_create_fails",
        "snapshot_load_count",
        "snapshot_load_fails",
        "unsupported_device_count",
    ),
    "patch_api_requests": (
        "drive_count",
        "drive_fails",
        "machine_cfg_count",
        "machine_cfg_fails",
        "vm_count",
        "vm_fails",
        "unsupported_device_count",
    ),
    "deprecated_api": ("deprecated_http_api_calls", "deprecated_cmd_line_api_calls"),
    "logger": ("missed_log_count", "missed_metrics_count"),
    "vmm": ("pause_count", "resume_count", "guest_stop_count"),
}

LATENCIES = (
    "full_create_snapshot",
    "diff_create_snapshot",
    "load_snapshot",
    "pause_vm",
    "resume_vm",
)


class MetricsError(Exception):
    """The metrics destination cannot be set up or written."""


class Metrics:
    """Counters and latencies, safe to update from any thread."""

    def __init__(self, instance_id: str = "anonymous-instance") -> None:
        self.instance_id = instance_id
        self._lock = threading.Lock()
        self._counters = _zeroed_counters()
        self._latencies_us = dict.fromkeys(LATENCIES, 0)
        self._startup: dict[str, int] = {}
        self._device_counters: DeviceCounters | None = None
        self._fd: int | None = None
        self.path: str | None = None
        self.emit_id = False
        self.properties: dict[str, str] = {}

    # --- recording ------------------------------------------------------------

    def increment(self, group: str, name: str, by: int = 1) -> None:
        with self._lock:
            fields = self._counters[group]
            if name not in fields:
                raise KeyError(f"no metric {group}.{name}")
            fields[name] += by

    def record_latency(self, name: str, microseconds: int) -> None:
        if name not in self._latencies_us:
            raise KeyError(f"no latency metric {name}")
        with self._lock:
            self._latencies_us[name] = microseconds

    def record_startup(self, wall_us: int, cpu_us: int) -> None:
        """How long the process took to get its API socket ready."""
        with self._lock:
            self._startup = {
                "process_startup_time_us": wall_us,
                "process_startup_time_cpu_us": cpu_us,
            }

    def count_devices_with(self, source: DeviceCounters | None) -> None:
        """Add the groups `source` returns to every line (called once a line)."""
        self._device_counters = source

    # --- output ---------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self._fd is not None

    def configure(
        self,
        path: str,
        *,
        emit_id: bool = False,
        properties: dict[str, str] | None = None,
        create: bool = False,
    ) -> None:
        """Send metrics to `path`, once per process (as Firecracker).

        The file or FIFO must exist unless `create`; it is opened read-write so
        that opening a FIFO never waits for a reader."""
        if self._fd is not None:
            raise MetricsError("metrics are already configured for this process")
        flags = os.O_RDWR | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        try:
            self._fd = os.open(path, flags, 0o600)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise MetricsError(f"cannot open metrics file {path!r}: {reason}") from None
        self.path = path
        self.emit_id = emit_id
        self.properties = dict(properties or {})

    def take_line(self) -> dict[str, object]:
        """Everything since the last call, as one metrics line; counters restart."""
        source = self._device_counters
        devices = source() if source is not None else {}
        with self._lock:
            counters = self._counters
            self._counters = _zeroed_counters()
            line: dict[str, object] = {"utc_timestamp_ms": int(time.time() * 1000)}
            if self.emit_id:
                line["id"] = self.instance_id
            if self.properties:
                line["properties"] = dict(self.properties)
            line.update(counters)
            line["api_server"] = {**counters["api_server"], **self._startup}
            line.update(devices)
            line["latencies_us"] = dict(self._latencies_us)
        return line

    def flush(self) -> bool:
        """Write one line if metrics are configured; False if they are not."""
        if self._fd is None:
            return False
        data = (json.dumps(self.take_line(), separators=(",", ":")) + "\n").encode()
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            # A FIFO whose reader has fallen behind: drop this line, count it.
            self.increment("logger", "missed_metrics_count")
            return True
        except OSError as error:
            raise MetricsError(
                f"cannot write metrics to {self.path}: {error}"
            ) from None
        if written != len(data):
            self.increment("logger", "missed_metrics_count")
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _zeroed_counters() -> dict[str, dict[str, int]]:
    return {group: dict.fromkeys(names, 0) for group, names in _COUNTER_GROUPS.items()}


def counter_names() -> Iterable[tuple[str, str]]:
    for group, names in _COUNTER_GROUPS.items():
        for name in names:
            yield group, name

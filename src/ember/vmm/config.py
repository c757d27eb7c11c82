"""What a microVM is built from, as plain typed values."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

HugePages = Literal["None", "Transparent", "2M"]
CacheType = Literal["Unsafe", "Writeback"]

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1"


@dataclass(frozen=True)
class MachineConfig:
    vcpu_count: int = 1
    mem_size_mib: int = 128
    track_dirty_pages: bool = False
    huge_pages: HugePages = "None"


@dataclass(frozen=True)
class BootSource:
    kernel_image_path: str
    boot_args: str = DEFAULT_CMDLINE
    initrd_path: str | None = None

    def __post_init__(self) -> None:
        # Paths given as pathlib objects become strings: the snapshot records them.
        object.__setattr__(self, "kernel_image_path", os.fspath(self.kernel_image_path))
        if self.initrd_path is not None:
            object.__setattr__(self, "initrd_path", os.fspath(self.initrd_path))


@dataclass(frozen=True)
class DriveConfig:
    """A virtio-block device backed by a host file (Firecracker's drive fields).

    `cache_type` "Writeback" offers the guest a flush command that reaches the
    host disk (fdatasync); "Unsafe" offers none and leaves data in the host's
    page cache. A root device is named on the kernel command line, by
    `partuuid` when given, else as /dev/vda."""

    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: CacheType = "Unsafe"


class ConfigError(ValueError):
    """A machine configuration is out of range."""


def validate_machine(config: MachineConfig) -> None:
    from ember.arch.x86_64.layout import MAX_VCPUS

    if not 1 <= config.vcpu_count <= MAX_VCPUS:
        raise ConfigError(f"vcpu_count must be 1..{MAX_VCPUS}, not {config.vcpu_count}")
    if config.huge_pages != "None" and config.mem_size_mib % 2:
        raise ConfigError(
            f"huge_pages {config.huge_pages!r} needs mem_size_mib to be a multiple of 2"
        )
    if config.mem_size_mib < 1:
        raise ConfigError(f"mem_size_mib must be positive, not {config.mem_size_mib}")


MAX_DRIVE_ID_LENGTH = 64


def validate_drives(drives: list[DriveConfig]) -> None:
    """Unique, well-formed IDs and at most one root device."""
    seen: set[str] = set()
    for drive in drives:
        name = drive.drive_id
        if not name or len(name) > MAX_DRIVE_ID_LENGTH:
            raise ConfigError(f"drive_id must be 1..{MAX_DRIVE_ID_LENGTH} characters")
        if not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
            raise ConfigError(f"drive_id {name!r}: only letters, digits and '_'")
        if name in seen:
            raise ConfigError(f"drive_id {name!r} is used twice")
        seen.add(name)
        if drive.cache_type not in ("Unsafe", "Writeback"):
            raise ConfigError(
                f"cache_type must be Unsafe or Writeback, not {drive.cache_type!r}"
            )
    if sum(drive.is_root_device for drive in drives) > 1:
        raise ConfigError("only one drive can be the root device")

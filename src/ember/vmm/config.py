"""What a microVM is built from, as plain typed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HugePages = Literal["None", "Transparent", "2M"]

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


class ConfigError(ValueError):
    """A machine configuration is out of range."""


def validate_machine(config: MachineConfig) -> None:
    from ember.arch.x86_64.layout import MAX_VCPUS

    if not 1 <= config.vcpu_count <= MAX_VCPUS:
        raise ConfigError(f"vcpu_count must be 1..{MAX_VCPUS}, not {config.vcpu_count}")
    if config.huge_pages == "2M":
        raise ConfigError("2M hugetlbfs pages are not supported yet; use Transparent")
    if config.huge_pages == "Transparent" and config.mem_size_mib % 2:
        raise ConfigError(
            "Transparent huge pages need mem_size_mib to be a multiple of 2"
        )
    if config.mem_size_mib < 1:
        raise ConfigError(f"mem_size_mib must be positive, not {config.mem_size_mib}")

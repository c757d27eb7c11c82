"""What a state file holds, for people (`ember snapshot info`) and for scripts."""

from __future__ import annotations

import os
from typing import Any

import msgspec

from ember.arch.x86_64.vcpu_state import saved_cpu_vendor
from ember.snapshot.state import MicrovmState
from ember.snapshot.state_file import load_versioned_state_file, version_text


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    version, state = load_versioned_state_file(path)
    return {
        "path": os.fspath(path),
        "format_version": version_text(version),
        "vcpu_count": len(state.vcpu_states),
        "cpu_vendor": _vendor(state),
        "tsc_khz": state.vcpu_states[0].tsc_khz if state.vcpu_states else None,
        "mem_size_mib": state.vm_info.mem_size_mib,
        "huge_pages": state.vm_info.huge_pages,
        "memory_regions": [
            {
                "guest_address": region.base_address,
                "size": region.size,
                "type": region.region_type,
                "file_offset": sum(r.size for r in state.vm_state.memory[:index]),
            }
            for index, region in enumerate(state.vm_state.memory)
        ],
        "boot_source": msgspec.to_builtins(state.vm_info.boot_source),
        "devices": _devices(state),
    }


def _vendor(state: MicrovmState) -> str:
    if not state.vcpu_states:
        return "unknown"
    saved = saved_cpu_vendor(state.vcpu_states[0].cpuid)
    return saved.decode(errors="replace") or "unknown"


def _devices(state: MicrovmState) -> list[str]:
    fields = msgspec.structs.asdict(state.device_states)
    return [name for name, value in fields.items() if value not in (None, [], {})]


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"state file      {info['path']}",
        f"format version  {info['format_version']}",
        f"vCPUs           {info['vcpu_count']} ({info['cpu_vendor']}, "
        f"TSC {info['tsc_khz']} kHz)",
        f"memory          {info['mem_size_mib']} MiB, huge pages {info['huge_pages']}",
    ]
    for region in info["memory_regions"]:
        start = region["guest_address"]
        end = start + region["size"]
        lines.append(
            f"  {region['type']:<8} guest {start:#014x}-{end:#014x} "
            f"({region['size'] >> 20} MiB) at file offset {region['file_offset']:#x}"
        )
    boot = info["boot_source"]
    if boot:
        lines.append(f"kernel          {boot['kernel_image_path']}")
        lines.append(f"command line    {boot['boot_args']}")
    lines.append(f"devices         {', '.join(info['devices'])}")
    return "\n".join(lines)

"""The ctypes mirrors of KVM's structures must match the kernel's layout exactly.

Sizes and offsets are frozen here; where gcc and the kernel headers exist, a C probe
compiled against <linux/kvm.h> prints the real values and they must agree, and so
must every ioctl number Ember computes.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.kvm import ioctls
from ember.kvm import structs as s

# ctypes class, C struct name, frozen size, {our field: (C member path, frozen offset)}
LAYOUTS: list[tuple[type, str, int, dict[str, tuple[str, int]]]] = [
    (
        s.KvmRegs,
        "kvm_regs",
        144,
        {"rax": ("rax", 0), "rip": ("rip", 128), "rflags": ("rflags", 136)},
    ),
    (
        s.KvmSegment,
        "kvm_segment",
        24,
        {
            "selector": ("selector", 12),
            "type": ("type", 14),
            "unusable": ("unusable", 22),
        },
    ),
    (s.KvmDtable, "kvm_dtable", 16, {"limit": ("limit", 8)}),
    (
        s.KvmSregs,
        "kvm_sregs",
        312,
        {
            "tr": ("tr", 144),
            "gdt": ("gdt", 192),
            "cr0": ("cr0", 224),
            "efer": ("efer", 264),
            "apic_base": ("apic_base", 272),
            "interrupt_bitmap": ("interrupt_bitmap", 280),
        },
    ),
    (
        s.KvmFpu,
        "kvm_fpu",
        416,
        {
            "fcw": ("fcw", 128),
            "last_ip": ("last_ip", 136),
            "xmm": ("xmm", 152),
            "mxcsr": ("mxcsr", 408),
        },
    ),
    (s.KvmXsave, "kvm_xsave", 4096, {"region": ("region", 0)}),
    (s.KvmXcrs, "kvm_xcrs", 392, {"xcrs": ("xcrs", 8), "padding": ("padding", 264)}),
    (
        s.KvmDebugregs,
        "kvm_debugregs",
        128,
        {"dr6": ("dr6", 32), "dr7": ("dr7", 40), "flags": ("flags", 48)},
    ),
    (s.KvmLapicState, "kvm_lapic_state", 1024, {"regs": ("regs", 0)}),
    (s.KvmMpState, "kvm_mp_state", 4, {"mp_state": ("mp_state", 0)}),
    (
        s.KvmVcpuEvents,
        "kvm_vcpu_events",
        64,
        {
            "interrupt": ("interrupt", 8),
            "nmi": ("nmi", 12),
            "sipi_vector": ("sipi_vector", 16),
            "flags": ("flags", 20),
            "smi": ("smi", 24),
            "triple_fault_pending": ("triple_fault.pending", 28),
            "exception_has_payload": ("exception_has_payload", 55),
            "exception_payload": ("exception_payload", 56),
        },
    ),
    (s.KvmMsrEntry, "kvm_msr_entry", 16, {"data": ("data", 8)}),
    (s.KvmMsrsHeader, "kvm_msrs", 8, {"nmsrs": ("nmsrs", 0)}),
    (s.KvmMsrListHeader, "kvm_msr_list", 4, {"nmsrs": ("nmsrs", 0)}),
    (
        s.KvmCpuidEntry2,
        "kvm_cpuid_entry2",
        40,
        {"flags": ("flags", 8), "eax": ("eax", 12), "edx": ("edx", 24)},
    ),
    (s.KvmCpuid2Header, "kvm_cpuid2", 8, {"nent": ("nent", 0)}),
    (
        s.KvmPicState,
        "kvm_pic_state",
        16,
        {"elcr": ("elcr", 14), "elcr_mask": ("elcr_mask", 15)},
    ),
    (
        s.KvmIoapicState,
        "kvm_ioapic_state",
        216,
        {"id": ("id", 12), "irr": ("irr", 16), "redirtbl": ("redirtbl", 24)},
    ),
    (s.KvmIrqchip, "kvm_irqchip", 520, {"chip": ("chip", 8)}),
    (
        s.KvmPitChannelState,
        "kvm_pit_channel_state",
        24,
        {"gate": ("gate", 15), "count_load_time": ("count_load_time", 16)},
    ),
    (
        s.KvmPitState2,
        "kvm_pit_state2",
        112,
        {"flags": ("flags", 72), "reserved": ("reserved", 76)},
    ),
    (s.KvmPitConfig, "kvm_pit_config", 64, {"flags": ("flags", 0)}),
    (
        s.KvmClockData,
        "kvm_clock_data",
        48,
        {
            "flags": ("flags", 8),
            "realtime": ("realtime", 16),
            "host_tsc": ("host_tsc", 24),
        },
    ),
    (
        s.KvmUserspaceMemoryRegion,
        "kvm_userspace_memory_region",
        32,
        {
            "guest_phys_addr": ("guest_phys_addr", 8),
            "userspace_addr": ("userspace_addr", 24),
        },
    ),
    (s.KvmDirtyLog, "kvm_dirty_log", 16, {"dirty_bitmap": ("dirty_bitmap", 8)}),
    (
        s.KvmIrqfd,
        "kvm_irqfd",
        32,
        {"gsi": ("gsi", 4), "resamplefd": ("resamplefd", 12)},
    ),
    (
        s.KvmIoeventfd,
        "kvm_ioeventfd",
        64,
        {
            "addr": ("addr", 8),
            "len": ("len", 16),
            "fd": ("fd", 20),
            "flags": ("flags", 24),
        },
    ),
    (s.KvmIrqLevel, "kvm_irq_level", 8, {"level": ("level", 4)}),
    (s.KvmEnableCap, "kvm_enable_cap", 104, {"args": ("args", 8)}),
    (s.KvmRunIo, "kvm_run_io_probe", 16, {}),
    (
        s.KvmRun,
        "kvm_run",
        304,
        {
            "immediate_exit": ("immediate_exit", 1),
            "exit_reason": ("exit_reason", 8),
            "if_flag": ("if_flag", 13),
            "apic_base": ("apic_base", 24),
            "exit": ("io", 32),
            "kvm_valid_regs": ("kvm_valid_regs", 288),
        },
    ),
]

# Nested unions of kvm_run, checked by offset inside the run structure.
RUN_MEMBERS = {
    "io.data_offset": 32 + 8,
    "mmio.phys_addr": 32,
    "mmio.len": 32 + 16,
    "mmio.is_write": 32 + 20,
    "internal.ndata": 32 + 4,
    "internal.data": 32 + 8,
    "system_event.type": 32,
    "fail_entry.cpu": 32 + 8,
}

IOCTLS = [
    name
    for name in dir(ioctls)
    if name.startswith("KVM_")
    and not name.startswith("KVM_CAP_")
    and name != "KVM_API_VERSION"
]


@pytest.mark.parametrize(
    ("cls", "cname", "size", "fields"), LAYOUTS, ids=[c[1] for c in LAYOUTS]
)
def test_frozen_layout(
    cls: type, cname: str, size: int, fields: dict[str, tuple[str, int]]
) -> None:
    if cname == "kvm_run":
        # kvm_run's tail (sync regs) is mapped, not passed; the prefix is what we use.
        assert ctypes.sizeof(cls) == size
    else:
        assert ctypes.sizeof(cls) == size
    for field, (_, offset) in fields.items():
        assert getattr(cls, field).offset == offset, field


def test_run_union_members() -> None:
    run = s.KvmRun()
    base = ctypes.addressof(run)
    for path, offset in RUN_MEMBERS.items():
        union_member, field = path.split(".")
        member = getattr(run.exit, union_member)
        assert (
            ctypes.addressof(member) - base + getattr(type(member), field).offset
            == offset
        )


def _probe_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for _, cname, _, fields in LAYOUTS:
        if cname == "kvm_run_io_probe":
            continue
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for field, (member, _) in fields.items():
            lines.append(
                f'printf("offset {cname} {field} %zu\\n", offsetof(struct {cname}, {member}));'
            )
    for path in RUN_MEMBERS:
        lines.append(f'printf("run {path} %zu\\n", offsetof(struct kvm_run, {path}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="needs gcc and the kernel's uapi headers",
)
def test_layout_matches_c_headers(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(_probe_source())
    binary = tmp_path / "probe"
    subprocess.run(
        ["gcc", "-o", str(binary), str(source)], check=True, capture_output=True
    )
    output = subprocess.run(
        [str(binary)], check=True, capture_output=True, text=True
    ).stdout
    by_name = {cls.__name__: cls for cls, *_ in LAYOUTS}
    classes = {cname: cls for cls, cname, *_ in LAYOUTS}
    checked = 0
    for line in output.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            cname, value = rest
            cls = classes[cname]
            expected = int(value)
            if cname == "kvm_run":
                expected = 304  # the C struct includes the 2 KiB sync-regs tail
                assert int(value) > expected
            assert ctypes.sizeof(cls) == expected, cname
        elif kind == "offset":
            cname, field, value = rest
            assert getattr(classes[cname], field).offset == int(value), (cname, field)
        elif kind == "run":
            path, value = rest
            assert RUN_MEMBERS[path] == int(value), path
        elif kind == "ioctl":
            name, value = rest
            assert getattr(ioctls, name) == int(value), name
        checked += 1
    assert checked > 100
    assert by_name

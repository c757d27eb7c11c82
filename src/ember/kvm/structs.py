"""ctypes mirrors of the KVM structures Ember passes through ioctls.

Each layout follows <linux/kvm.h> and <asm/kvm.h> for x86-64. `tests/test_kvm_layout.py`
freezes every size and field offset and, where gcc exists, compares them with a C
probe compiled against the host's headers, so a mistake here fails a test instead
of corrupting guest state.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    Structure,
    Union,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)

# --- vCPU registers -------------------------------------------------------------


class KvmRegs(Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
        ).split()
    ]


class KvmSegment(Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class KvmXsave(Structure):
    """The legacy 4 KiB XSAVE area; KVM_GET_XSAVE2 may need a larger buffer."""

    _fields_ = [("region", c_uint32 * 1024)]


class KvmXcr(Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


KVM_MAX_XCRS = 16


class KvmXcrs(Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class KvmDebugregs(Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class KvmLapicState(Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class KvmMpState(Structure):
    _fields_ = [("mp_state", c_uint32)]


class _EventsException(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _EventsInterrupt(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("soft", c_uint8),
        ("shadow", c_uint8),
    ]


class _EventsNmi(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("pending", c_uint8),
        ("masked", c_uint8),
        ("pad", c_uint8),
    ]


class _EventsSmi(Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class KvmVcpuEvents(Structure):
    _fields_ = [
        ("exception", _EventsException),
        ("interrupt", _EventsInterrupt),
        ("nmi", _EventsNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _EventsSmi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


# --- variable-length arrays: header structs plus helpers that size them ---------


class KvmMsrEntry(Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class KvmMsrsHeader(Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class KvmMsrListHeader(Structure):
    _fields_ = [("nmsrs", c_uint32)]


class KvmCpuidEntry2(Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class KvmCpuid2Header(Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def msrs_struct(count: int) -> type[Structure]:
    """`struct kvm_msrs` with room for `count` entries."""

    class KvmMsrs(Structure):
        _fields_ = [
            ("nmsrs", c_uint32),
            ("pad", c_uint32),
            ("entries", KvmMsrEntry * count),
        ]

    return KvmMsrs


def msr_list_struct(count: int) -> type[Structure]:
    """`struct kvm_msr_list` with room for `count` indices."""

    class KvmMsrList(Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * count)]

    return KvmMsrList


def cpuid2_struct(count: int) -> type[Structure]:
    """`struct kvm_cpuid2` with room for `count` entries."""

    class KvmCpuid2(Structure):
        _fields_ = [
            ("nent", c_uint32),
            ("padding", c_uint32),
            ("entries", KvmCpuidEntry2 * count),
        ]

    return KvmCpuid2


# --- VM-wide state ---------------------------------------------------------------


class KvmPicState(Structure):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll "
            "special_mask init_state auto_eoi rotate_on_auto_eoi "
            "special_fully_nested_mode init4 elcr elcr_mask"
        ).split()
    ]


KVM_IOAPIC_NUM_PINS = 24


class KvmIoapicState(Structure):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class _IrqchipUnion(Union):
    _fields_ = [
        ("dummy", ctypes.c_char * 512),
        ("pic", KvmPicState),
        ("ioapic", KvmIoapicState),
    ]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class KvmIrqchip(Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _IrqchipUnion)]


class KvmPitChannelState(Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class KvmPitState2(Structure):
    _fields_ = [
        ("channels", KvmPitChannelState * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmPitConfig(Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class KvmClockData(Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class KvmUserspaceMemoryRegion(Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmDirtyLog(Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class KvmIrqfd(Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class KvmIoeventfd(Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmIrqLevel(Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmEnableCap(Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


# --- the shared kvm_run page -------------------------------------------------------


class KvmRunHw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class KvmRunFailEntry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunIo(Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class KvmRunMmio(Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class KvmRunInternal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunSystemEvent(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunExitUnion(Union):
    _fields_ = [
        ("hw", KvmRunHw),
        ("fail_entry", KvmRunFailEntry),
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", KvmRunExitUnion),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
    ]

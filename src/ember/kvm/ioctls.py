"""KVM ioctl numbers, computed from the sizes of the structures they carry.

Linux encodes an ioctl as direction (2 bits) · argument size (14 bits) · type (8 bits)
· number (8 bits). Computing the number from `ctypes.sizeof` means a struct layout
mistake shows up as EINVAL/ENOTTY at once instead of a silent misread.
"""

from __future__ import annotations

import ctypes

from ember.kvm import structs as s

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | number


def io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def ior(number: int, struct: type) -> int:
    return _ioc(_IOC_READ, number, ctypes.sizeof(struct))


def iow(number: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, number, ctypes.sizeof(struct))


def iowr(number: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, ctypes.sizeof(struct))


# /dev/kvm
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_GET_MSR_INDEX_LIST = iowr(0x02, s.KvmMsrListHeader)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, s.KvmCpuid2Header)
KVM_GET_MSR_FEATURE_INDEX_LIST = iowr(0x0A, s.KvmMsrListHeader)

# VM
KVM_CREATE_VCPU = io(0x41)
KVM_GET_DIRTY_LOG = iow(0x42, s.KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = iow(0x46, s.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = io(0x60)
KVM_IRQ_LINE = iow(0x61, s.KvmIrqLevel)
KVM_GET_IRQCHIP = iowr(0x62, s.KvmIrqchip)
KVM_SET_IRQCHIP = ior(0x63, s.KvmIrqchip)
KVM_IRQFD = iow(0x76, s.KvmIrqfd)
KVM_CREATE_PIT2 = iow(0x77, s.KvmPitConfig)
KVM_IOEVENTFD = iow(0x79, s.KvmIoeventfd)
KVM_SET_CLOCK = iow(0x7B, s.KvmClockData)
KVM_GET_CLOCK = ior(0x7C, s.KvmClockData)
KVM_GET_PIT2 = ior(0x9F, s.KvmPitState2)
KVM_SET_PIT2 = iow(0xA0, s.KvmPitState2)
KVM_ENABLE_CAP = iow(0xA3, s.KvmEnableCap)

# vCPU
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, s.KvmRegs)
KVM_SET_REGS = iow(0x82, s.KvmRegs)
KVM_GET_SREGS = ior(0x83, s.KvmSregs)
KVM_SET_SREGS = iow(0x84, s.KvmSregs)
KVM_GET_MSRS = iowr(0x88, s.KvmMsrsHeader)
KVM_SET_MSRS = iow(0x89, s.KvmMsrsHeader)
KVM_GET_FPU = ior(0x8C, s.KvmFpu)
KVM_SET_FPU = iow(0x8D, s.KvmFpu)
KVM_GET_LAPIC = ior(0x8E, s.KvmLapicState)
KVM_SET_LAPIC = iow(0x8F, s.KvmLapicState)
KVM_SET_CPUID2 = iow(0x90, s.KvmCpuid2Header)
KVM_GET_CPUID2 = iowr(0x91, s.KvmCpuid2Header)
KVM_GET_MP_STATE = ior(0x98, s.KvmMpState)
KVM_SET_MP_STATE = iow(0x99, s.KvmMpState)
KVM_GET_VCPU_EVENTS = ior(0x9F, s.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = iow(0xA0, s.KvmVcpuEvents)
KVM_GET_DEBUGREGS = ior(0xA1, s.KvmDebugregs)
KVM_SET_DEBUGREGS = iow(0xA2, s.KvmDebugregs)
KVM_SET_TSC_KHZ = io(0xA2)
KVM_GET_TSC_KHZ = io(0xA3)
KVM_GET_XSAVE = ior(0xA4, s.KvmXsave)
KVM_SET_XSAVE = iow(0xA5, s.KvmXsave)
KVM_GET_XCRS = ior(0xA6, s.KvmXcrs)
KVM_SET_XCRS = iow(0xA7, s.KvmXcrs)
KVM_KVMCLOCK_CTRL = io(0xAD)
KVM_GET_XSAVE2 = ior(0xCF, s.KvmXsave)

# Capabilities (KVM_CHECK_EXTENSION arguments).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

KVM_API_VERSION = 12

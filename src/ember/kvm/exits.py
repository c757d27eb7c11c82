"""Typed vCPU exits decoded from the kvm_run page.

The run loop matches on these small frozen classes instead of poking at the raw
union, so every field it uses has a name and a type.
"""

from __future__ import annotations

import ctypes

from ember.kvm.structs import KvmRun

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


class _Exit:
    """Base of the exit types: plain slotted classes, because building a dozen
    dataclasses costs more import time than the rest of the KVM layer."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__
        )

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, n) for n in self.__slots__)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


_INTERNAL_ERROR_NAMES = {
    KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit",
}


class IoOut(_Exit):
    """A port write; a `rep outs` brings `count` items of `size` bytes."""

    __slots__ = ("port", "size", "data")

    port: int
    size: int
    data: bytes


class IoIn(_Exit):
    """A port read; the handler fills `buffer` with `count` items of `size` bytes."""

    __slots__ = ("port", "size", "count", "buffer")

    port: int
    size: int
    count: int
    buffer: memoryview


class MmioRead(_Exit):
    __slots__ = ("address", "size", "buffer")
    address: int
    size: int
    buffer: memoryview


class MmioWrite(_Exit):
    __slots__ = ("address", "data")
    address: int
    data: bytes


class Halt(_Exit):
    __slots__ = ()


class Shutdown(_Exit):
    """A triple fault (or an explicit shutdown) of the guest."""

    __slots__ = ()


class FailEntry(_Exit):
    __slots__ = ("reason", "cpu")
    reason: int
    cpu: int


class InternalError(_Exit):
    __slots__ = ("suberror", "data")
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        name = _INTERNAL_ERROR_NAMES.get(self.suberror, f"suberror {self.suberror}")
        words = " ".join(f"{word:#x}" for word in self.data)
        return f"KVM internal error: {name}" + (f" ({words})" if words else "")


class SystemEvent(_Exit):
    __slots__ = ("type",)
    type: int


class Interrupted(_Exit):
    """KVM_RUN returned early (a kick, or KVM_EXIT_INTR)."""

    __slots__ = ()


class UnknownExit(_Exit):
    __slots__ = ("reason",)
    reason: int


VcpuExit = (
    IoOut
    | IoIn
    | MmioRead
    | MmioWrite
    | Halt
    | Shutdown
    | FailEntry
    | InternalError
    | SystemEvent
    | Interrupted
    | UnknownExit
)


def decode_exit(run: KvmRun, page: memoryview) -> VcpuExit:
    """Decode the exit KVM_RUN just reported. `page` is the whole vCPU mapping,
    which holds the port-I/O data at `io.data_offset`."""
    reason = run.exit_reason
    if reason == KVM_EXIT_IO:
        return _decode_io(run, page)
    if reason == KVM_EXIT_MMIO:
        mmio = run.exit.mmio
        if mmio.is_write:
            return MmioWrite(mmio.phys_addr, bytes(mmio.data)[: mmio.len])
        offset = ctypes.addressof(mmio.data) - ctypes.addressof(run)
        return MmioRead(mmio.phys_addr, mmio.len, page[offset : offset + mmio.len])
    if reason == KVM_EXIT_HLT:
        return Halt()
    if reason == KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == KVM_EXIT_FAIL_ENTRY:
        fail = run.exit.fail_entry
        return FailEntry(fail.hardware_entry_failure_reason, fail.cpu)
    if reason == KVM_EXIT_INTERNAL_ERROR:
        internal = run.exit.internal
        count = min(internal.ndata, 16)
        return InternalError(internal.suberror, tuple(internal.data[:count]))
    if reason == KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(run.exit.system_event.type)
    if reason == KVM_EXIT_INTR:
        return Interrupted()
    return UnknownExit(reason)


def _decode_io(run: KvmRun, page: memoryview) -> IoOut | IoIn:
    io = run.exit.io
    # A `rep outsb` arrives as one exit with count > 1: the bytes sit back to back.
    length = io.size * io.count
    start = io.data_offset
    if io.direction == KVM_EXIT_IO_OUT:
        return IoOut(io.port, io.size, bytes(page[start : start + length]))
    return IoIn(io.port, io.size, io.count, page[start : start + length])

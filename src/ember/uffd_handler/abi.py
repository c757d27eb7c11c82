"""userfaultfd's kernel interface: the structures, the ioctl numbers computed from
their sizes, and the two ways to get a descriptor.

Shared by the monitor (which creates the descriptor and registers guest memory) and
the page-fault handler (which answers faults with UFFDIO_COPY and UFFDIO_ZEROPAGE).
Sizes and offsets are frozen in `tests/test_uffd_abi.py` and checked there against
<linux/userfaultfd.h> with a C probe.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from ember.kvm.fd import raw_ioctl

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
UFFDIO = 0xAA  # the ioctl type of both /dev/userfaultfd and a userfaultfd

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # a flag we never pass: KVM's own faults must reach us

UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0

# The register answer's `ioctls` is a bit per ioctl number usable on the range.
_UFFDIO_WAKE_NR = 0x02
_UFFDIO_COPY_NR = 0x03
_UFFDIO_ZEROPAGE_NR = 0x04

PAGE_SIZE = 4096
SYS_USERFAULTFD_X86_64 = 323
DEV_USERFAULTFD = "/dev/userfaultfd"


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("range", UffdioRange),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [
        ("range", UffdioRange),
        ("mode", ctypes.c_uint64),
        ("zeropage", ctypes.c_int64),
    ]


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFDIO << 8) | number


USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, 0x00, 0)
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ioc(_IOC_READ, _UFFDIO_WAKE_NR, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO_COPY_NR, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = _ioc(
    _IOC_READ | _IOC_WRITE, _UFFDIO_ZEROPAGE_NR, ctypes.sizeof(UffdioZeropage)
)

# struct uffd_msg is packed: event u8, three reserved fields (7 bytes), then a
# 24-byte union. For a page fault the union holds flags u64, address u64, ptid u32;
# for a remove event start u64, end u64.
UFFD_MSG_SIZE = 32
_MSG = struct.Struct("<B7xQQQ")
assert _MSG.size == UFFD_MSG_SIZE


class UffdError(OSError):
    """A userfaultfd call failed; carries errno and what was being done."""


@dataclass(frozen=True)
class UffdMessage:
    """One decoded `struct uffd_msg`. For a page fault `a` is the flags and `b` the
    faulting address; for a remove event `a` is the start and `b` the end."""

    event: int
    a: int
    b: int


def decode_messages(data: bytes) -> list[UffdMessage]:
    return [UffdMessage(event, a, b) for event, a, b, _ in _MSG.iter_unpack(data)]


def _check(result: int, what: str) -> int:
    if result < 0:
        raise UffdError(-result, f"{what}: {os.strerror(-result)}")
    return result


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def open_userfaultfd(flags: int) -> int:
    """A new userfaultfd for this process: the system call, or /dev/userfaultfd
    where the call is refused (hosts that restrict it to that device's ACL)."""
    result = _libc.syscall(ctypes.c_long(SYS_USERFAULTFD_X86_64), ctypes.c_int(flags))
    if result >= 0:
        return int(result)
    call_errno = ctypes.get_errno()
    if call_errno not in (errno.EPERM, errno.ENOSYS):
        raise UffdError(call_errno, f"userfaultfd(2): {os.strerror(call_errno)}")
    try:
        device = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise UffdError(
            call_errno,
            f"userfaultfd(2) refused ({os.strerror(call_errno)}) and "
            f"{DEV_USERFAULTFD} cannot be opened ({error.strerror})",
        ) from None
    try:
        return _check(
            raw_ioctl(device, USERFAULTFD_IOC_NEW, flags), "USERFAULTFD_IOC_NEW"
        )
    finally:
        os.close(device)


def api_handshake(fd: int, features: int) -> int:
    """UFFDIO_API, requiring `features`; returns every feature the kernel offers."""
    api = UffdioApi(api=UFFD_API, features=features)
    _check(raw_ioctl(fd, UFFDIO_API, ctypes.addressof(api)), "UFFDIO_API")
    return int(api.features)


def register_missing(fd: int, start: int, length: int) -> int:
    """UFFDIO_REGISTER in MISSING mode; returns the ioctls allowed on the range."""
    request = UffdioRegister(range=UffdioRange(start, length))
    request.mode = UFFDIO_REGISTER_MODE_MISSING
    _check(
        raw_ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(request)),
        f"UFFDIO_REGISTER {start:#x}+{length:#x}",
    )
    return int(request.ioctls)


def unregister(fd: int, start: int, length: int) -> None:
    request = UffdioRange(start, length)
    _check(
        raw_ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(request)),
        f"UFFDIO_UNREGISTER {start:#x}+{length:#x}",
    )


def wake(fd: int, start: int, length: int) -> None:
    request = UffdioRange(start, length)
    _check(
        raw_ioctl(fd, UFFDIO_WAKE, ctypes.addressof(request)),
        f"UFFDIO_WAKE {start:#x}+{length:#x}",
    )


def can_zeropage(register_ioctls: int) -> bool:
    """hugetlbfs ranges have no UFFDIO_ZEROPAGE; zeros are copied there."""
    return bool(register_ioctls & (1 << _UFFDIO_ZEROPAGE_NR))


class RangeFiller:
    """UFFDIO_COPY and UFFDIO_ZEROPAGE with reusable argument structs.

    Both return (bytes done, errno): the kernel may do part of a range and then
    stop with EAGAIN (a remove event is queued and must be read first) or EEXIST
    (a page in the range is already there)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = UffdioCopy()
        self._copy_address = ctypes.addressof(self._copy)
        self._zero = UffdioZeropage()
        self._zero_address = ctypes.addressof(self._zero)

    def copy(self, dst: int, src: int, length: int) -> tuple[int, int]:
        request = self._copy
        request.dst, request.src, request.len = dst, src, length
        request.mode = 0
        request.copy = 0
        result = raw_ioctl(self.fd, UFFDIO_COPY, self._copy_address)
        done = max(int(request.copy), 0)
        return (length, 0) if result >= 0 else (done, -result)

    def zero(self, dst: int, length: int) -> tuple[int, int]:
        request = self._zero
        request.range.start, request.range.len = dst, length
        request.mode = 0
        request.zeropage = 0
        result = raw_ioctl(self.fd, UFFDIO_ZEROPAGE, self._zero_address)
        done = max(int(request.zeropage), 0)
        return (length, 0) if result >= 0 else (done, -result)

"""File-descriptor holders and the one place that calls ioctl(2).

A holder forgets its descriptor when closed, so a later use raises `ClosedFdError`
instead of acting on whatever file the number now names.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """An ioctl on a KVM descriptor failed; carries errno and the ioctl's name."""


class ClosedFdError(ValueError):
    """A descriptor holder was used after close()."""


def raw_ioctl(fd: int, request: int, arg: int | None) -> int:
    """ioctl(2) through ctypes: the GIL is released for the call and EINTR is
    returned to the caller (as -errno) rather than retried, which the vCPU loop
    needs to see kicks."""
    result: int = _libc.ioctl(fd, request, arg)
    if result == -1:
        return -ctypes.get_errno()
    return result


class FdHolder:
    """Owns one descriptor; `close()` is idempotent."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedFdError(f"{self.name} descriptor used after close")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()

    def ioctl(self, name: str, request: int, arg: Any = None) -> int:
        """Run an ioctl whose argument is a ctypes object, an int or nothing."""
        if arg is None or isinstance(arg, int):
            pointer: int | None = arg
        else:
            pointer = ctypes.addressof(arg)
        result = raw_ioctl(self.fileno(), request, pointer)
        if result < 0:
            errno = -result
            raise KvmError(errno, f"{name} on {self.name}: {os.strerror(errno)}")
        return result

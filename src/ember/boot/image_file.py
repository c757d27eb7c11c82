"""Bounded reads from a kernel or initrd file.

A kernel path comes from the user and may name anything: a directory, a FIFO that
never answers, a 10 GiB disk image. Files are therefore checked with stat first,
and every read asks for an exact range, so no step ever pulls a whole file into
this process; bulk data goes straight from the file into guest memory.
"""

from __future__ import annotations

import os
import stat

from ember.boot.errors import KernelLoadError
from ember.memory import GuestAddress, GuestMemory

# One preadv call moves at most this much, which keeps each syscall short.
_COPY_CHUNK = 16 * 1024 * 1024


class ImageFile:
    """A regular file opened for bounded reads; `what` is "kernel" or "initrd"."""

    def __init__(self, path: str, what: str, error: type[KernelLoadError]) -> None:
        self.path = path
        self.what = what
        self._error = error
        self._fd = -1
        try:
            status = os.stat(path)
            if not stat.S_ISREG(status.st_mode):
                raise error(f"{what} {path} is not a regular file")
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise error(f"{what} {path} cannot be read: {exc.strerror}") from exc
        except ValueError as exc:  # a path with a NUL byte in it
            raise error(f"{what} {path!r} cannot be read: {exc}") from exc

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; fewer only at the end of the file."""
        chunks = []
        while length > 0:
            chunk = self._pread(min(length, _COPY_CHUNK), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def copy_to_memory(
        self, memory: GuestMemory, address: GuestAddress, offset: int, length: int
    ) -> None:
        """Copy `length` file bytes at `offset` into guest memory at `address`."""
        with memory.view(address, length) as target:
            done = 0
            while done < length:
                count = min(length - done, _COPY_CHUNK)
                with target[done : done + count] as window:
                    read = self._preadv(window, offset + done)
                if read == 0:
                    # The size was checked up front, so the file shrank meanwhile.
                    raise self._error(
                        f"{self.what} {self.path} shrank while being read"
                    )
                done += read

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise self._error(
                f"{self.what} {self.path} cannot be read: {exc.strerror}"
            ) from exc

    def _preadv(self, window: memoryview, offset: int) -> int:
        try:
            return os.preadv(self._fd, [window], offset)
        except OSError as exc:
            raise self._error(
                f"{self.what} {self.path} cannot be read: {exc.strerror}"
            ) from exc

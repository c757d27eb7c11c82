"""Files that appear whole or not at all.

A snapshot file is written under a temporary name in its target directory, fsync'ed,
and only then renamed over the target (and the directory fsync'ed). A crash, a full
disk or an exception at any point leaves the target as it was. Creating a snapshot
writes two files; `AtomicFile.prepare()` and `publish()` let the caller finish both
before either replaces its target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from types import TracebackType


class SnapshotWriteError(Exception):
    """A snapshot file could not be written; nothing at its path was changed."""


class AtomicFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.target = Path(path)
        self.directory = self.target.parent
        self.fd = -1
        self.temporary: str | None = None
        self._prepared = False

    def __enter__(self) -> AtomicFile:
        try:
            self.fd, self.temporary = tempfile.mkstemp(
                prefix=f".{self.target.name}.", suffix=".partial", dir=self.directory
            )
        except OSError as error:
            raise SnapshotWriteError(
                f"cannot create a file in {self.directory}: {error.strerror}"
            ) from None
        return self

    def write_all(self, data: bytes | memoryview, offset: int | None = None) -> None:
        view = memoryview(data).cast("B")
        position = offset
        try:
            while view:
                if position is None:
                    written = os.write(self.fd, view)
                else:
                    written = os.pwrite(self.fd, view, position)
                    position += written
                view = view[written:]
        except OSError as error:
            raise self.error(error) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as error:
            raise self.error(error) from None

    def error(self, error: OSError) -> SnapshotWriteError:
        return SnapshotWriteError(f"cannot write {self.target}: {error.strerror}")

    def prepare(self) -> None:
        """Make the temporary file durable; the target is still untouched."""
        try:
            os.fsync(self.fd)
            os.fchmod(self.fd, 0o600)
        except OSError as error:
            raise self.error(error) from None
        os.close(self.fd)
        self.fd = -1
        self._prepared = True

    def publish(self) -> None:
        """Rename the prepared file over the target."""
        assert self._prepared and self.temporary is not None
        try:
            os.rename(self.temporary, self.target)
        except OSError as error:
            raise self.error(error) from None
        self.temporary = None
        _fsync_directory(self.directory)

    def commit(self) -> None:
        self.prepare()
        self.publish()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temporary)
            self.temporary = None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None or not self._prepared:
            self.discard()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

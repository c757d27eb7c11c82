"""The monitor's log lines: who (instance id), which thread, and what.

    2026-01-02T03:04:05.123456 [my-vm:ember_vmm] microVM restored in 3.1 ms
    2026-01-02T03:04:05.123456 [my-vm:ember_api:WARNING:server.py:88] ...

The level and the origin (file:line) appear when asked for (`show_level`,
`show_log_origin`), as with Firecracker's logger. Lines go to stderr until a
log path is given: stdout is the guest's serial console. A log path names an
existing file or FIFO (opened without waiting for a reader); a FIFO whose reader
falls behind loses lines rather than stopping the monitor, and each lost line is
counted in the `logger.missed_log_count` metric.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.api.models import Logger
    from ember.metrics import Metrics

# Firecracker's level names; Trace is finer than Python's DEBUG.
TRACE = 5
LEVELS = {
    "Error": logging.ERROR,
    "Warning": logging.WARNING,
    "Info": logging.INFO,
    "Debug": logging.DEBUG,
    "Trace": TRACE,
    "Off": logging.CRITICAL + 10,
}


class LogConfigError(Exception):
    """The log destination cannot be opened."""


class InstanceFormatter(logging.Formatter):
    def __init__(self, instance_id: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        micros = int(record.created % 1 * 1_000_000)
        tags = [self.instance_id, record.threadName or "?"]
        if self.show_level:
            tags.append(record.levelname)
        if self.show_origin:
            tags.append(f"{record.filename}:{record.lineno}")
        line = f"{stamp}.{micros:06d} [{':'.join(tags)}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _FdHandler(logging.Handler):
    """Writes whole lines to a descriptor without blocking; counts what it drops."""

    def __init__(self, fd: int, metrics: Metrics | None) -> None:
        super().__init__()
        self.fd = fd
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            os.write(self.fd, data)
        except OSError:
            if self.metrics is not None:
                self.metrics.increment("logger", "missed_log_count")

    def close(self) -> None:
        super().close()
        if self.fd > 2:
            os.close(self.fd)
            self.fd = -1


class _ModuleFilter(logging.Filter):
    """Firecracker filters by module path; Ember by logger name prefix."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == self.module or record.name.startswith(self.module + ".")


class LogSettings:
    """The root logger's one handler, reconfigured by flags and `PUT /logger`."""

    def __init__(
        self,
        instance_id: str,
        level: str = "Warning",
        metrics: Metrics | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.metrics = metrics
        self.level = level
        self.show_level = False
        self.show_origin = False
        self.module: str | None = None
        self._handler: logging.Handler | None = None
        self._install(logging.StreamHandler(sys.stderr))

    def open_path(self, path: str, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise LogConfigError(f"cannot open log file {path!r}: {reason}") from None
        self._install(_FdHandler(fd, self.metrics))

    def apply(self, body: Logger) -> None:
        """PUT /logger: only the fields the body carries change."""
        from ember.api.faults import ApiError

        if body.log_path is not None:
            try:
                self.open_path(body.log_path)
            except LogConfigError as error:
                raise ApiError(str(error)) from None
        if body.level is not None:
            self.level = body.level
        self.show_level = body.show_level
        self.show_origin = body.show_log_origin
        self.module = body.module
        self._refresh()

    def _install(self, handler: logging.Handler) -> None:
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler.close()
        for existing in list(root.handlers):  # e.g. from logging.basicConfig
            root.removeHandler(existing)
        self._handler = handler
        root.addHandler(handler)
        self._refresh()

    def _refresh(self) -> None:
        assert self._handler is not None
        handler = self._handler
        handler.setFormatter(
            InstanceFormatter(self.instance_id, self.show_level, self.show_origin)
        )
        for old in list(handler.filters):
            handler.removeFilter(old)
        if self.module:
            handler.addFilter(_ModuleFilter(self.module))
        logging.getLogger().setLevel(LEVELS[self.level])

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None

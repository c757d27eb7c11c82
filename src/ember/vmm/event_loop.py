"""The device event loop: one thread, one epoll, callbacks per descriptor.

Devices never block a vCPU on host I/O they can defer: console input, and later
virtio notifications (ioeventfds), taps and sockets, are all serviced here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._lock = threading.Lock()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="devices", daemon=True)

    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call `callback(events)` on this thread whenever `fd` is readable."""
        with self._lock:
            self._callbacks[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        with self._lock:
            self._callbacks.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wakeup, 1)
        if (
            self._thread.ident is not None
            and self._thread is not threading.current_thread()
        ):
            self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wakeup)

    def _run(self) -> None:
        while not self._stopping:
            try:
                ready = self._epoll.poll()
            except OSError:
                return
            for fd, events in ready:
                if fd == self._wakeup:
                    continue
                with self._lock:
                    callback = self._callbacks.get(fd)
                if callback is None:
                    continue
                try:
                    callback(events)
                except Exception:  # one bad device must not stop the others
                    log.exception("event handler for fd %d failed", fd)
                    self.remove(fd)

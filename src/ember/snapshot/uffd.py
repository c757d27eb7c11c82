"""The Uffd memory backend, monitor side: guest memory filled by a page-fault handler.

Theory of operation. Instead of mapping the memory file, the restore maps fresh
anonymous memory, creates a userfaultfd, and registers every region with it in
MISSING mode: from then on the first touch of any page — by a vCPU inside KVM_RUN, by
KVM itself reading guest memory, or by this process — is not satisfied by the kernel
but queued as an event on the userfaultfd, and the touching thread sleeps until
someone fills the page. That someone is the page-fault handler, a separate process
listening on a Unix socket. We connect to it and send the handshake
(`ember.uffd_handler.protocol`): the region table and, as the one SCM_RIGHTS
descriptor, the userfaultfd. The handler reads fault events from it and fills pages
with UFFDIO_COPY from wherever it keeps the memory (a file, the network).

The userfaultfd is created close-on-exec and non-blocking, without
UFFD_USER_MODE_ONLY (KVM's own accesses are kernel-mode faults and must reach the
handler too), and requires remove events: when guest memory is discarded
(MADV_DONTNEED, as a balloon does) the handler is told, so a later fault there gets
a zero page instead of stale file contents.

Like Firecracker we keep our own copy of the userfaultfd and our end of the
connection open for the microVM's whole life. Unlike Firecracker we watch that
connection: a handler that dies closes it, and any thread waiting for a page would
otherwise sleep forever. On EOF the microVM is stopped with an error. Stopping kicks
every vCPU; a vCPU asleep in a userfault inside KVM_RUN usually returns EINTR at once
(KVM's fault path is interruptible). After a grace period we close our userfaultfd:
with no descriptor left the kernel releases every waiter — a vCPU then sees its
pending kick before it enters the guest again, and a monitor thread (the device
loop, a restore writing the generation ID, a snapshot reading memory) gets zero
pages and finds the handler gone when it checks. Two things make that possible in
Python: the watcher blocks on the connection in a thread of its own, and monitor
threads copy handler-served memory with the GIL released (`GuestRegion.read`), so a
thread asleep in a userfault never stops the watcher from running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from ember.memory import GuestMemory
from ember.memory.guest_memory import HUGE_PAGE_SIZE, PAGE_SIZE
from ember.memory.guest_memory import HugePagesUnavailableError as PoolTooSmallError
from ember.snapshot.restore import SnapshotLoadError
from ember.uffd_handler import abi
from ember.uffd_handler.protocol import RegionMapping, encode_handshake
from ember.vmm.vcpu import VcpuRunState

if TYPE_CHECKING:
    from ember.vmm.microvm import Microvm

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# How long stopped vCPUs may take to leave a userfault on their own before we
# release them by closing the userfaultfd.
UNSTICK_GRACE_S = 1.0
HANDLER_GONE_STATUS = 1


class UffdBackendError(SnapshotLoadError):
    """The Uffd memory backend could not be set up; nothing is left behind."""


class UserfaultfdError(UffdBackendError):
    """No userfaultfd with the features the backend needs."""


class HugePagesUnavailableError(UffdBackendError):
    """The snapshot uses 2 MiB hugetlbfs pages and the host pool is too small."""


class UffdRegisterError(UffdBackendError):
    """A guest memory region could not be registered with the userfaultfd."""


class HandlerConnectError(UffdBackendError):
    """The page-fault handler's socket is missing or refuses connections."""


class HandshakeSendError(UffdBackendError):
    """The handshake could not be sent to the page-fault handler."""


class HandlerGoneError(UffdBackendError):
    """The page-fault handler died while the monitor needed guest memory."""


def uffd_memory(layout: list[tuple[int, int]], hugetlb: bool) -> GuestMemory:
    """Anonymous guest memory for the Uffd backend (nothing registered yet)."""
    try:
        return GuestMemory.for_userfaultfd(layout, hugetlb=hugetlb)
    except PoolTooSmallError as error:
        raise HugePagesUnavailableError(f"the snapshot uses {error}") from None
    except OSError as error:
        raise UffdBackendError(
            f"cannot map guest memory for the Uffd backend: {error.strerror}"
        ) from None


def create_userfaultfd() -> int:
    """A close-on-exec, non-blocking userfaultfd that reports kernel-mode faults
    and remove events."""
    try:
        fd = abi.open_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    except abi.UffdError as error:
        raise UserfaultfdError(f"cannot create a userfaultfd: {error}") from None
    try:
        abi.api_handshake(fd, abi.UFFD_FEATURE_EVENT_REMOVE)
    except abi.UffdError as error:
        os.close(fd)
        raise UserfaultfdError(
            f"this kernel's userfaultfd lacks remove events: {error}"
        ) from None
    return fd


def region_table(memory: GuestMemory, page_size: int) -> list[RegionMapping]:
    return [
        RegionMapping(
            base_host_virt_addr=region.host_address,
            size=region.size,
            offset=region.file_offset,
            page_size=page_size,
        )
        for region in memory
    ]


def register_regions(fd: int, regions: list[RegionMapping]) -> None:
    for region in regions:
        try:
            abi.register_missing(fd, region.base_host_virt_addr, region.size)
        except abi.UffdError as error:
            raise UffdRegisterError(
                f"cannot register guest memory with the userfaultfd: {error}"
            ) from None


def connect_handler(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise HandlerConnectError(
            f"cannot connect to the page-fault handler at {path}: {reason} "
            f"(os error {error.errno})"
        ) from None
    return sock


def send_handshake(
    sock: socket.socket, path: str, uffd: int, regions: list[RegionMapping]
) -> None:
    body = encode_handshake(regions)
    try:
        sent = socket.send_fds(sock, [body], [uffd])
    except OSError as error:
        raise HandshakeSendError(
            f"cannot send the handshake to the page-fault handler at {path}: "
            f"{error.strerror or error}"
        ) from None
    if sent != len(body):
        raise HandshakeSendError(
            f"the page-fault handler at {path} took {sent} of the handshake's "
            f"{len(body)} bytes"
        )


class UffdBackend:
    """Our copy of the userfaultfd and our end of the handler connection."""

    def __init__(
        self, uffd: int, sock: socket.socket, path: str, regions: list[RegionMapping]
    ) -> None:
        self.path = path
        self.regions = regions
        self._uffd = uffd
        self._sock = sock
        self._lock = threading.Lock()
        self._closing = False
        self.handler_gone = False

    @classmethod
    def attach(cls, memory: GuestMemory, path: str, page_size: int) -> UffdBackend:
        """Register all of `memory` with a new userfaultfd and hand it to the
        handler listening at `path`. On failure nothing stays open (the caller
        still owns `memory`)."""
        if page_size not in (PAGE_SIZE, HUGE_PAGE_SIZE):
            raise ValueError(f"unsupported page size {page_size}")
        regions = region_table(memory, page_size)
        uffd = create_userfaultfd()
        try:
            register_regions(uffd, regions)
            sock = connect_handler(path)
        except BaseException:
            os.close(uffd)
            raise
        try:
            send_handshake(sock, path, uffd, regions)
        except BaseException:
            sock.close()
            os.close(uffd)
            raise
        log.info(
            "guest memory (%d regions, %d bytes) handed to the page-fault handler "
            "at %s",
            len(regions),
            sum(region.size for region in regions),
            path,
        )
        return cls(uffd, sock, path, regions)

    @property
    def handler_pid(self) -> int | None:
        """The handler's process id as the kernel saw it at connect time."""
        with self._lock:
            if self._sock.fileno() < 0:
                return None
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        return pid or None

    def watch(self, microvm: Microvm) -> None:
        """Stop `microvm` with an error as soon as the handler hangs up.

        A thread of its own blocks on the connection: the device event loop may
        itself be the thread waiting for a page, and a waiting thread holds no GIL
        (guest memory served by a handler is copied with the GIL released)."""
        self._sock.settimeout(None)

        def wait_for_hangup() -> None:
            while True:
                try:
                    data = self._sock.recv(4096)
                except OSError as error:
                    if not self._closing:
                        log.warning("page-fault handler connection failed: %s", error)
                    data = b""
                if self._closing:
                    return  # we hung up ourselves
                if not data:
                    break
                log.debug("ignoring %d bytes from the page-fault handler", len(data))
            self._handler_gone(microvm)

        threading.Thread(target=wait_for_hangup, name="uffd-watch", daemon=True).start()

    def _handler_gone(self, microvm: Microvm) -> None:
        self.handler_gone = True
        if microvm.is_stopped:
            return
        message = (
            f"the page-fault handler at {self.path} closed its connection (did it "
            "die?): guest memory can no longer be served, stopping the microVM"
        )
        log.error("%s", message)
        microvm.stop(HANDLER_GONE_STATUS, message)
        threading.Thread(
            target=self._unstick, args=(microvm,), name="uffd-unstick", daemon=True
        ).start()

    def _unstick(self, microvm: Microvm) -> None:
        """Release every thread still waiting for a page once the vCPUs had their
        grace period: closing our userfaultfd, the last one open now that the
        handler is gone, makes the kernel wake every waiter and fill the rest of
        guest memory with zero pages. Nothing runs the guest on them: it has been
        stopped, and a restore or snapshot in progress sees `handler_gone`."""
        deadline = time.monotonic() + UNSTICK_GRACE_S
        for vcpu in microvm.vcpus:
            vcpu.join(max(0.0, deadline - time.monotonic()))
        stuck = [
            vcpu.index
            for vcpu in microvm.vcpus
            if vcpu.state is not VcpuRunState.EXITED
        ]
        if stuck:
            log.warning("vCPUs %s still wait for pages; releasing them", stuck)
        self.close_userfaultfd()
        for vcpu in microvm.vcpus:
            vcpu.request_stop()

    def check_handler(self, doing: str) -> None:
        """Raise if the handler died: guest memory touched since may hold zero
        pages instead of the snapshot's."""
        if self.handler_gone:
            raise HandlerGoneError(
                f"the page-fault handler at {self.path} died while {doing}"
            )

    def close_userfaultfd(self) -> None:
        with self._lock:
            fd, self._uffd = self._uffd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Hang up on the handler (it learns the microVM is gone) and drop our
        userfaultfd. Call after the vCPUs have stopped; idempotent."""
        self._closing = True
        self.close_userfaultfd()
        with self._lock, contextlib.suppress(OSError):
            # shutdown() wakes the watcher blocked in recv(); close() alone would not.
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._lock, contextlib.suppress(OSError):
            self._sock.close()


def uffd_guest_memory(
    layout: list[tuple[int, int]], backend_path: str, hugetlb: bool = False
) -> tuple[GuestMemory, UffdBackend]:
    """Guest memory for `layout` served by the handler at `backend_path`."""
    memory = uffd_memory(layout, hugetlb)
    try:
        backend = UffdBackend.attach(
            memory, backend_path, HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
        )
    except BaseException:
        memory.close()
        raise
    return memory, backend

"""One thread per vCPU, each running KVM_RUN in a loop.

Theory of operation. A vCPU thread spends its life inside KVM_RUN; `fcntl`-style
ioctls through ctypes release the GIL, so vCPUs run in parallel with each other and
with the rest of the monitor. To get a thread out of the guest — to pause, or to
stop — another thread records what it wants under the vCPU's lock, sets
`kvm_run.immediate_exit` and sends the thread a signal. The signal interrupts a
KVM_RUN already in progress; `immediate_exit` covers the window where the thread has
checked its orders but not yet entered KVM_RUN, so no kick is ever lost. KVM_RUN then
returns EINTR, which the loop treats as "look at your orders", never as an error.

States: RUNNING ⇄ PAUSED → EXITED. A paused thread sleeps on a condition variable
outside KVM_RUN, which is what makes its registers safe to read for a snapshot.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ember.kvm.exits import (
    KVM_SYSTEM_EVENT_CRASH,
    FailEntry,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    UnknownExit,
    VcpuExit,
    decode_exit,
)
from ember.kvm.fd import KvmError
from ember.kvm.system import VcpuFd

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN + 1


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick only needs to interrupt KVM_RUN; there is nothing to do here."""


def install_kick_handler() -> None:
    """Install the kick signal's handler; must run once on the main thread.

    A handler (rather than SIG_IGN) is what makes the kernel interrupt KVM_RUN."""
    current = signal.getsignal(KICK_SIGNAL)
    if current is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        if current in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise RuntimeError(
                "the first microVM must be created on the main thread (it installs "
                f"the vCPU kick handler for signal {int(KICK_SIGNAL)})"
            )
        return
    signal.signal(KICK_SIGNAL, _ignore_kick)


class VcpuRunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


@dataclass(frozen=True)
class VcpuStop:
    """Why a vCPU asked the whole VM to stop. `status` is the process exit code."""

    vcpu: int
    status: int
    message: str


class ExitHandlers:
    """What a vCPU thread does with the exits the kernel hands back to us."""

    def __init__(
        self,
        port_read: Callable[[int, int], bytes],
        port_write: Callable[[int, bytes], None],
        mmio_read: Callable[[int, int], bytes],
        mmio_write: Callable[[int, bytes], None],
    ) -> None:
        self.port_read = port_read
        self.port_write = port_write
        self.mmio_read = mmio_read
        self.mmio_write = mmio_write


class VcpuThread:
    def __init__(
        self,
        fd: VcpuFd,
        handlers: ExitHandlers,
        on_stop: Callable[[VcpuStop], None],
    ) -> None:
        self.fd = fd
        self.index = fd.index
        self._handlers = handlers
        self._on_stop = on_stop
        self._cond = threading.Condition()
        self._wanted = VcpuRunState.RUNNING
        self._state = VcpuRunState.PAUSED
        self._thread = threading.Thread(
            target=self._run, name=f"vcpu{self.index}", daemon=True
        )

    @property
    def state(self) -> VcpuRunState:
        with self._cond:
            return self._state

    def start(self, paused: bool = False) -> None:
        with self._cond:
            self._wanted = VcpuRunState.PAUSED if paused else VcpuRunState.RUNNING
        self._thread.start()
        if paused:
            self.wait_for(VcpuRunState.PAUSED)

    # --- orders from other threads ----------------------------------------------

    def _order(self, wanted: VcpuRunState) -> None:
        with self._cond:
            if self._state is VcpuRunState.EXITED:
                return
            self._wanted = wanted
            run = self.fd.kvm_run
            if run is not None:
                run.immediate_exit = 1
            self._cond.notify_all()
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            # It may exit between the check and the kick; that is fine.
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def request_pause(self) -> None:
        self._order(VcpuRunState.PAUSED)

    def request_resume(self) -> None:
        self._order(VcpuRunState.RUNNING)

    def request_stop(self) -> None:
        self._order(VcpuRunState.EXITED)

    def wait_for(self, state: VcpuRunState, timeout: float = 5.0) -> bool:
        """Wait until the thread reaches `state` (or has exited)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._state in (state, VcpuRunState.EXITED), timeout
            )

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    # --- the thread itself --------------------------------------------------------

    def _run(self) -> None:
        stop: VcpuStop | None = None
        try:
            stop = self._loop()
        except Exception as error:  # a bug in a device must not hang the VM
            log.exception("vCPU %d crashed", self.index)
            stop = VcpuStop(self.index, 1, f"vCPU {self.index}: monitor error: {error}")
        finally:
            with self._cond:
                self._state = VcpuRunState.EXITED
                self._cond.notify_all()
        if stop is not None:
            self._on_stop(stop)

    def _await_orders(self) -> bool:
        """Sleep while paused; returns False when told to exit."""
        with self._cond:
            while self._wanted is VcpuRunState.PAUSED:
                if self._state is not VcpuRunState.PAUSED:
                    self._state = VcpuRunState.PAUSED
                    self._cond.notify_all()
                    self._tell_kvmclock_we_paused()
                self._cond.wait()
            if self._wanted is VcpuRunState.EXITED:
                return False
            self._state = VcpuRunState.RUNNING
            run = self.fd.kvm_run
            if run is not None:
                run.immediate_exit = 0
            return True

    def _tell_kvmclock_we_paused(self) -> None:
        # Sets PVCLOCK_GUEST_STOPPED so the guest's watchdog forgives the gap.
        # EINVAL just means the guest has not enabled kvmclock.
        try:
            self.fd.kvmclock_ctrl()
        except KvmError as error:
            if error.errno != errno.EINVAL:
                log.warning("vCPU %d: KVM_KVMCLOCK_CTRL failed: %s", self.index, error)

    def _loop(self) -> VcpuStop | None:
        page = memoryview(self.fd.run_mmap)
        run = self.fd.kvm_run
        assert run is not None  # only None after close(), which follows join()
        while self._await_orders():
            result = self.fd.run()
            if result == -errno.EINTR or result == -errno.EAGAIN:
                continue
            if result < 0:
                message = f"KVM_RUN failed: {errno.errorcode.get(-result, -result)}"
                return VcpuStop(self.index, 1, f"vCPU {self.index}: {message}")
            stop = self._handle(decode_exit(run, page))
            if stop is not None:
                return stop
        return None

    def _handle(self, event: VcpuExit) -> VcpuStop | None:
        match event:
            case IoOut(port=port, size=size, data=data):
                for start in range(0, len(data), size):
                    self._handlers.port_write(port, data[start : start + size])
            case IoIn(port=port, size=size, count=count, buffer=buffer):
                for item in range(count):
                    buffer[item * size : (item + 1) * size] = self._handlers.port_read(
                        port, size
                    )
            case MmioWrite(address=address, data=data):
                self._handlers.mmio_write(address, data)
            case MmioRead(address=address, size=size, buffer=buffer):
                buffer[:size] = self._handlers.mmio_read(address, size)
            case Interrupted() | Halt():
                pass
            case Shutdown():
                return self._fatal("the guest triple-faulted (shutdown exit)")
            case InternalError():
                return self._fatal(event.describe())
            case FailEntry(reason=reason, cpu=cpu):
                return self._fatal(f"VM entry failed: reason {reason:#x} on cpu {cpu}")
            case SystemEvent(type=event_type):
                if event_type == KVM_SYSTEM_EVENT_CRASH:
                    return self._fatal("the guest reported a crash")
                return VcpuStop(self.index, 0, f"vCPU {self.index}: guest shut down")
            case UnknownExit(reason=reason):
                return self._fatal(f"unexpected exit reason {reason}")
        return None

    def _fatal(self, reason: str) -> VcpuStop:
        detail = ""
        try:
            regs = self.fd.get_regs()
            detail = f" at rip={regs.rip:#x}"
        except KvmError:
            pass
        return VcpuStop(self.index, 1, f"vCPU {self.index}: {reason}{detail}")

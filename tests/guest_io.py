"""Talking to the test guest's console, in-process or through `ember` itself.

Both harnesses collect console output into a `ConsoleLog`; `ask()` sends one
command and returns the first protocol answer after it, skipping `TICK` lines.
"""

from __future__ import annotations

from ember.console import ANSWER, ConsoleLog, ConsoleProcess
from ember.vmm.config import BootSource, MachineConfig
from ember.vmm.microvm import Console, Microvm


class GuestConsole:
    """Common `send`/`ask` on top of a transport."""

    log: ConsoleLog

    def send(self, command: str) -> None:
        raise NotImplementedError

    def ask(self, command: str, timeout: float = 60.0) -> str:
        self.send(command)
        return self.log.expect(ANSWER, timeout).group(0)


class InProcessGuest(GuestConsole):
    """A microVM in this process, built with the Python API."""

    def __init__(self, microvm: Microvm, log: ConsoleLog) -> None:
        self.microvm = microvm
        self.log = log

    @classmethod
    def boot(
        cls, guest_elf: str, vcpus: int = 1, mem_mib: int = 128, **machine: object
    ) -> InProcessGuest:
        log = ConsoleLog()
        config = MachineConfig(vcpu_count=vcpus, mem_size_mib=mem_mib, **machine)  # type: ignore[arg-type]
        microvm = Microvm.boot(config, BootSource(guest_elf), Console(write=log.feed))
        guest = cls(microvm, log)
        log.expect(r"^READY ")
        return guest

    @classmethod
    def restore(cls, state: str, mem: str, **options: object) -> InProcessGuest:
        log = ConsoleLog()
        microvm = Microvm.restore(
            state, mem, console=Console(write=log.feed), **options
        )  # type: ignore[arg-type]
        return cls(microvm, log)

    def send(self, command: str) -> None:
        self.microvm.serial.enqueue_input(command.encode() + b"\n")

    def close(self) -> None:
        self.microvm.close()


class EmberProcess(ConsoleProcess, GuestConsole):
    """`ember ...` as a child process with its console on pipes."""

"""`ember demo`: boot, snapshot, restore in a new process, and clone — timed.

Everything runs on real KVM with the built-in test guest. The original microVM runs
in this process through the Python API; the restored microVM and the clones are
separate `ember run --snapshot` processes, as a user would start them.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.console import ANSWER, ConsoleLog, ConsoleProcess

RESTORED_IN = re.compile(r"restored from .* in ([0-9.]+) ms")


@dataclass
class Timings:
    rows: list[tuple[str, float]] = field(default_factory=list)

    def add(self, step: str, seconds: float) -> None:
        self.rows.append((step, seconds))

    def table(self) -> str:
        width = max(len(step) for step, _ in self.rows)
        lines = [f"  {'step'.ljust(width)}  time"]
        for step, seconds in self.rows:
            lines.append(f"  {step.ljust(width)}  {_format(seconds)}")
        return "\n".join(lines)


def _format(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms" if seconds < 10 else f"{seconds:8.2f} s"


class _Say:
    """Timestamped lines; whole lines only, as console readers call it too."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.2f}s] {message}\n"
        with self._lock:
            sys.stdout.write(line)
            sys.stdout.flush()


class DemoError(Exception):
    """A step of the demo did not give the answer it should have."""


class _Clone(ConsoleProcess):
    """An `ember run --snapshot` child process, its console echoed with a name."""

    def __init__(self, name: str, state: Path, mem: Path, say: Callable[[str], None]):
        self.name = name
        self._say = say
        args = ["--level", "Info", "run", "--snapshot", str(state)]
        super().__init__(
            [*args, "--mem-file", str(mem)],
            echo=lambda line: say(f"  {name} | {line}"),
        )

    def send(self, command: str) -> None:
        self._say(f"  {self.name} < {command}")
        super().send(command)

    def restore_ms(self) -> float:
        return float(self.stderr_log.expect(RESTORED_IN, 30).group(1))

    def finish(self) -> int:
        self.send("reset")
        return self.wait(timeout=30)

    def kill(self) -> None:
        self.close()


def _expect_answer(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise DemoError(f"{what}: the guest answered {actual!r}, not {expected!r}")


def run_demo(vcpus: int = 2, mem_mib: int = 256, clones: int = 3) -> int:
    from ember.testguest import guest_path
    from ember.vmm.config import BootSource, MachineConfig
    from ember.vmm.microvm import Console, Microvm

    say = _Say()
    timings = Timings()
    workdir = Path(tempfile.mkdtemp(prefix="ember-demo-"))
    children: list[_Clone] = []
    try:
        began = time.monotonic()
        elf = guest_path()
        timings.add("build or find the test guest", time.monotonic() - began)

        say(f"booting the test guest: {vcpus} vCPUs, {mem_mib} MiB")
        log = ConsoleLog(echo=lambda line: say(f"  origin | {line}"))
        began = time.monotonic()
        machine = MachineConfig(
            vcpu_count=vcpus, mem_size_mib=mem_mib, huge_pages="Transparent"
        )
        vm = Microvm.boot(machine, BootSource(str(elf)), Console(write=log.feed))
        try:
            log.expect(r"^READY ")
            timings.add("boot to READY (in process)", time.monotonic() - began)

            def ask(command: str) -> str:
                say(f"  origin < {command}")
                vm.serial.enqueue_input(command.encode() + b"\n")
                return log.expect(ANSWER, 60).group(0)

            _expect_answer(ask("fill 7 64"), "OK", "fill")
            _expect_answer(ask("fpu set 3"), "OK", "fpu set")
            _expect_answer(ask("tick on"), "OK", "tick on")
            for _ in range(3):
                log.expect(r"^TICK \d+$", 10)

            began = time.monotonic()
            vm.pause()
            timings.add("pause", time.monotonic() - began)
            last_tick = log.ticks()[-1]
            state, mem = workdir / "vm.state", workdir / "vm.mem"
            stats = vm.snapshot(str(state), str(mem))
            timings.add("full snapshot", stats.seconds)
            stored_mib = stats.memory_bytes_written >> 20
            total_mib = stats.memory_total_bytes >> 20
            say(
                f"snapshot written: state {stats.state_bytes} bytes, memory "
                f"{stored_mib} of {total_mib} MiB stored (the rest is holes); "
                f"last tick {last_tick}"
            )
        finally:
            vm.close()
        say("original microVM gone; restoring it in a new process")

        restored = _Clone("restored", state, mem, say)
        children.append(restored)
        first_tick = int(restored.log.expect(r"^TICK (\d+)$", 60).group(1))
        timings.add(
            "new process start to first tick", time.monotonic() - restored.started
        )
        timings.add("restore inside the new process", restored.restore_ms() / 1000)
        say(f"ticks continue: {last_tick} before the snapshot, {first_tick} after")
        if not last_tick < first_tick <= last_tick + 5:
            raise DemoError(f"ticks restarted: {last_tick} then {first_tick}")
        _expect_answer(restored.ask("tick off"), "OK", "tick off")
        _expect_answer(restored.ask("check 7 64"), "OK", "memory check")
        _expect_answer(restored.ask("fpu check 3"), "OK", "FPU/AVX check")
        _expect_answer(restored.ask("cpus"), f"CPUS {vcpus} alive {vcpus}", "cpus")
        restored.finish()

        if clones:
            _run_clones(clones, state, mem, say, timings, children)

        print()
        print("timings")
        print(timings.table())
        return 0
    finally:
        for child in children:
            child.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _run_clones(
    clones: int,
    state: Path,
    mem: Path,
    say: Callable[[str], None],
    timings: Timings,
    children: list[_Clone],
) -> None:
    """Start `clones` restores of one snapshot at once; each fills memory with its
    own seed and must find its own pattern, and not its neighbour's."""
    plural = "s" if clones > 1 else ""
    together = " side by side" if clones > 1 else ""
    say(f"starting {clones} clone{plural}{together} from the same snapshot")
    began = time.monotonic()
    group = [_Clone(f"clone{i}", state, mem, say) for i in range(clones)]
    children.extend(group)
    for clone in group:
        clone.log.expect(r"^TICK \d+$", 60)
    timings.add(f"{clones} clone{plural} to first tick", time.monotonic() - began)
    for index, clone in enumerate(group):
        _expect_answer(clone.ask("tick off"), "OK", "tick off")
        _expect_answer(clone.ask(f"fill {100 + index} 8"), "OK", "clone fill")
    for index, clone in enumerate(group):
        _expect_answer(clone.ask(f"check {100 + index} 8"), "OK", "clone check")
        if clones > 1:
            # The neighbour's pattern must be absent here: BAD is the right answer.
            other = 100 + (index + 1) % clones
            if not clone.ask(f"check {other} 8").startswith("BAD"):
                raise DemoError("clones share memory changes")
        timings.add(
            f"clone{index} restore inside its process", clone.restore_ms() / 1000
        )
    if clones > 1:
        say("each clone holds its own pattern and not its neighbour's (BAD above)")
    else:
        say("the clone holds its own pattern")
    for clone in group:
        clone.finish()

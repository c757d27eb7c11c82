"""Benchmark: process start -> test guest `READY`, Ember beside QEMU microvm.

    python bench/boot.py [--runs N] [--vcpus 1,2] [--mem-mib M]

For each vCPU count, N runs of each (after one unrecorded warm-up run of each):

- `ember run --vcpus V --mem-mib M` (the built-in test guest), from just before
  the fork to the moment the `READY` line reaches the benchmark's pipe;
- the same guest under `qemu-system-x86_64 -M microvm -enable-kvm`, measured
  the same way;
- `Microvm.boot()` inside this process, to `READY`: Ember without the cost of
  starting an interpreter and importing the monitor.

Every run ends with `reset` and waits for the VM to exit. Runs alternate
between the monitors so that a slow spell of the host hits both. The table shows
median / p90 / min in milliseconds; nothing is judged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _harness import (
    QEMU_MISSING_NOTE,
    BenchError,
    Child,
    Summary,
    TimedLog,
    cell,
    ember_argv,
    exit_cleanly_on_sigterm,
    note,
    print_table,
    qemu_argv,
    qemu_binary,
    test_guest,
)

READY = r"^READY "
BOOT_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
FOOTNOTE = """
The in-process column starts from a warm interpreter with Ember imported; the
difference to `ember run` is interpreter start-up and imports. `python -c pass`
(fork to exit) is what starting this interpreter costs on its own here.
Firecracker publishes no figure for this guest; for a Linux guest it states boot
to /sbin/init <= 125 ms (1 vCPU, 128 MiB; its SPECIFICATION.md): not comparable."""


def time_child(argv: list[str], workdir: Path) -> float:
    """ms from fork to `READY`; then `reset` and wait for the exit."""
    with Child(argv, workdir / "stderr.txt") as child:
        ready_at, _ = child.expect(READY, BOOT_TIMEOUT_S)
        child.send("reset")
        status = child.wait_exit(EXIT_TIMEOUT_S)
        if status != 0:
            note(f"note: {argv[0]} exited with status {status} after reset")
        return (ready_at - child.started) * 1000


def time_bare_interpreter() -> float:
    """ms for `python -c pass`, fork to exit: what any Python monitor pays."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=EXIT_TIMEOUT_S)
    return (time.perf_counter() - started) * 1000


def time_in_process(guest: str, vcpus: int, mem_mib: int) -> float:
    from ember.vmm.config import BootSource, MachineConfig
    from ember.vmm.microvm import Console, Microvm

    log = TimedLog()
    machine = MachineConfig(vcpus, mem_mib, huge_pages="Transparent")
    started = time.perf_counter()
    microvm = Microvm.boot(machine, BootSource(guest), Console(write=log.feed))
    try:
        ready_at, _ = log.expect(READY, BOOT_TIMEOUT_S)
        microvm.serial.enqueue_input(b"reset\n")
        if microvm.wait(EXIT_TIMEOUT_S) is None:
            note("note: the in-process microVM did not stop after reset")
    finally:
        microvm.close()
    return (ready_at - started) * 1000


def measure(
    runs: int, vcpus: int, mem_mib: int, guest: str, qemu: str | None, workdir: Path
) -> dict[str, list[float]]:
    ways: dict[str, Callable[[], float]] = {
        "ember": lambda: time_child(
            ember_argv("run", "--vcpus", str(vcpus), "--mem-mib", str(mem_mib)),
            workdir,
        ),
        "in-process": lambda: time_in_process(guest, vcpus, mem_mib),
        "python": time_bare_interpreter,
    }
    if qemu is not None:
        ways["qemu"] = lambda: time_child(
            qemu_argv(qemu, guest, vcpus, mem_mib), workdir
        )
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(runs + 1):
        for name, way in ways.items():
            value = way()
            if run > 0:  # run 0 warms the page cache and the guest build
                samples[name].append(value)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, metavar="N")
    parser.add_argument("--vcpus", default="1,2", metavar="LIST")
    parser.add_argument("--mem-mib", type=int, default=128, metavar="M")
    parser.add_argument("--no-qemu", action="store_true", help="skip QEMU")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()

    qemu = None if args.no_qemu else qemu_binary()
    if qemu is None and not args.no_qemu:
        note(QEMU_MISSING_NOTE)
    guest = test_guest()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-boot-") as temp:
        for vcpus in (int(text) for text in args.vcpus.split(",")):
            try:
                samples = measure(
                    args.runs, vcpus, args.mem_mib, guest, qemu, Path(temp)
                )
            except BenchError as error:
                note(f"error: {vcpus} vCPUs: {error}")
                return 1
            rows.append(
                [
                    str(vcpus),
                    str(args.mem_mib),
                    cell(Summary.of(samples["ember"])),
                    cell(Summary.of(samples.get("qemu", []))),
                    cell(Summary.of(samples["in-process"])),
                    cell(Summary.of(samples["python"])),
                ]
            )
    print_table(
        f"Boot: process start -> READY on the console (ms, median / p90 / min "
        f"of {args.runs} runs; test guest {Path(guest).name})",
        [
            "vCPUs",
            "MiB",
            "Ember `ember run`",
            "QEMU microvm",
            "Ember in-process Microvm.boot()",
            "`python -c pass`",
        ],
        rows,
    )
    print(FOOTNOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

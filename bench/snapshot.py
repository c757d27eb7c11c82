"""Benchmark: snapshot create and restore, Ember beside QEMU microvm and beside
Firecracker's published figures.

    python bench/snapshot.py [--sizes 128,1024,4096] [--runs N] [--vcpus V]
                             [--quick] [--no-qemu]

For each guest size (MiB), the test guest boots with dirty-page tracking on,
fills half its memory (`fill 1 <size/2>`) and turns its 100 ms ticks on. Then:

- full snapshot: pause, `Microvm.snapshot()` (state + memory file, fsynced and
  renamed into place), resume — the wall time of the `snapshot()` call;
- diff snapshot: `fill` 8 MiB with a new seed, pause, diff snapshot, resume;
- restore -> vCPUs running: `Microvm.restore(..., resume=True)` in this process,
  from the full snapshot (the memory file is mapped lazily, page cache warm);
- restore -> first guest output: the same restore, then `tick on` is sent at
  once and the clock stops when the guest's `OK` arrives; and `ember run
  --snapshot` in a new process, from the fork to that `OK`.

QEMU 7.2's equivalents on the same guest, driven over QMP: `stop` then
`migrate "exec:cat > FILE"` (bandwidth limit lifted) until `completed`, plus an
fsync of the file so it is as durable as Ember's; restore is a new QEMU with
`-incoming defer`, `migrate-incoming "exec:cat < FILE"`, `cont`, and the same
`tick on` probe. QEMU has no RAM diff snapshot.

Each restore's warm-up run also checks the guest's memory (`check`), so the
numbers are for restores that really brought the guest back. Snapshot files live
in a temporary directory that is deleted at the end, whatever happens. Tables
show median / p90 / min in milliseconds; nothing is judged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _harness import (
    ANSWER,
    QEMU_MISSING_NOTE,
    BenchError,
    Child,
    Qmp,
    Summary,
    TimedLog,
    cell,
    ember_argv,
    exit_cleanly_on_sigterm,
    note,
    poll_until,
    print_table,
    qemu_argv,
    qemu_binary,
    remove_quietly,
    test_guest,
)

DIFF_MIB = 8
BOOT_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 20.0
QMP_TIMEOUT_S = 20.0

# Firecracker's published figures (snapshot-support.md, v1.4 performance tests).
# Restore: load_snapshot P50 on m6i.metal, host and guest 5.10, 1 vCPU; create:
# the maximum its v1.4 tests allowed, 2 vCPUs, x86.
FC_RESTORE_P50_MS = {128: "1.887", 1024: "2.172", 4096: "3.329"}
FC_CREATE_MAX_MS = {256: (180, 70), 512: (280, 90)}


def work_timeout(mib: int) -> float:
    """Generous bound for guest work proportional to memory (fill, check)."""
    return 30.0 + mib * 0.05


@dataclass(frozen=True)
class Setup:
    """What every step of one guest size needs."""

    guest: str
    vcpus: int
    mib: int
    runs: int
    workdir: Path


@dataclass
class Results:
    """samples[metric][size][column] -> milliseconds."""

    samples: dict[str, dict[int, dict[str, list[float]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    written_mib: dict[tuple[str, int, str], float] = field(default_factory=dict)

    def add(self, metric: str, size: int, column: str, value: float) -> None:
        self.samples[metric][size].setdefault(column, []).append(value)

    def get(self, metric: str, size: int, column: str) -> Summary | None:
        return Summary.of(self.samples[metric][size].get(column, []))


# --- Ember ----------------------------------------------------------------------


class InProcessVm:
    """A microVM in this process with a timed console."""

    def __init__(self, log: TimedLog) -> None:
        from ember.vmm.microvm import Microvm

        self.log = log
        self.vm: Microvm | None = None

    def ask(self, command: str, timeout: float) -> tuple[float, str]:
        if self.vm is None:
            raise BenchError("no microVM")
        self.log.skip_to_end()
        self.vm.serial.enqueue_input(command.encode() + b"\n")
        return self.log.expect(ANSWER, timeout)

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None


@contextlib.contextmanager
def booted_ember(guest: str, vcpus: int, mib: int) -> Iterator[InProcessVm]:
    from ember.vmm.config import BootSource, MachineConfig
    from ember.vmm.microvm import Console, Microvm

    log = TimedLog()
    holder = InProcessVm(log)
    machine = MachineConfig(
        vcpus, mib, track_dirty_pages=True, huge_pages="Transparent"
    )
    try:
        holder.vm = Microvm.boot(machine, BootSource(guest), Console(write=log.feed))
        log.expect(r"^READY ", BOOT_TIMEOUT_S)
        yield holder
    finally:
        holder.close()


def expect_ok(answer: str, what: str) -> None:
    if answer != "OK":
        raise BenchError(f"{what}: the guest answered {answer!r}")


def ember_create(setup: Setup, results: Results) -> tuple[str, str]:
    """Full and diff snapshots; returns the full snapshot's (state, mem)."""
    mib, runs, workdir = setup.mib, setup.runs, setup.workdir
    full = (str(workdir / "full.state"), str(workdir / "full.mem"))
    diff = (str(workdir / "diff.state"), str(workdir / "diff.mem"))
    with booted_ember(setup.guest, setup.vcpus, mib) as holder:
        vm = holder.vm
        assert vm is not None
        expect_ok(holder.ask(f"fill 1 {mib // 2}", work_timeout(mib))[1], "fill")
        expect_ok(holder.ask("tick on", ANSWER_TIMEOUT_S)[1], "tick on")
        for run in range(runs + 1):  # run 0: warm-up (see docs/benchmarks.md)
            vm.pause()
            started = time.perf_counter()
            stats = vm.snapshot(*full)
            if run:
                elapsed = (time.perf_counter() - started) * 1000
                results.add("full", mib, "ember", elapsed)
            vm.resume()
        results.written_mib["full", mib, "ember"] = stats.memory_bytes_written / 2**20
        for run in range(runs):
            answer = holder.ask(f"fill {2 + run} {DIFF_MIB}", work_timeout(DIFF_MIB))
            expect_ok(answer[1], "fill")
            vm.pause()
            started = time.perf_counter()
            stats = vm.snapshot(*diff, diff=True)
            results.add("diff", mib, "ember", (time.perf_counter() - started) * 1000)
            vm.resume()
        results.written_mib["diff", mib, "ember"] = stats.memory_bytes_written / 2**20
    remove_quietly(*(Path(path) for path in diff))
    return full


def ember_restore_in_process(
    state: str, mem: str, mib: int, check: bool, results: Results | None
) -> None:
    from ember.vmm.microvm import Console, Microvm

    log = TimedLog()
    holder = InProcessVm(log)
    try:
        started = time.perf_counter()
        holder.vm = Microvm.restore(state, mem, resume=True, console=Console(log.feed))
        running = time.perf_counter()
        answered, answer = holder.ask("tick on", ANSWER_TIMEOUT_S)
        expect_ok(answer, "tick on after restore")
        if check:
            expect_ok(holder.ask(f"check 1 {mib // 2}", work_timeout(mib))[1], "check")
    finally:
        holder.close()
    if results is not None:
        results.add("running", mib, "ember", (running - started) * 1000)
        results.add("output", mib, "ember", (answered - started) * 1000)


def ember_restore_process(
    state: str, mem: str, mib: int, workdir: Path, results: Results | None
) -> None:
    argv = ember_argv("run", "--snapshot", state, "--mem-file", mem)
    with Child(argv, workdir / "ember-stderr.txt") as child:
        child.send("tick on")  # waits in the pipe until the console is attached
        answered, answer = child.expect(ANSWER, BOOT_TIMEOUT_S)
        expect_ok(answer, "tick on after `ember run --snapshot`")
        child.send("reset")
        child.wait_exit(ANSWER_TIMEOUT_S)
    if results is not None:
        results.add("output", mib, "ember-process", (answered - child.started) * 1000)


def bench_ember(setup: Setup, results: Results) -> None:
    state, mem = ember_create(setup, results)
    mib = setup.mib
    try:
        for run in range(setup.runs + 1):  # run 0: warm-up and memory check
            recorded = results if run else None
            ember_restore_in_process(state, mem, mib, run == 0, recorded)
            ember_restore_process(state, mem, mib, setup.workdir, recorded)
    finally:
        remove_quietly(Path(state), Path(mem))


# --- QEMU -----------------------------------------------------------------------


@contextlib.contextmanager
def qemu_child(qemu: str, setup: Setup, *extra: str) -> Iterator[tuple[Child, Qmp]]:
    sock = setup.workdir / "qmp.sock"
    remove_quietly(sock)
    qmp_flag = f"unix:{sock},server=on,wait=off"
    argv = qemu_argv(qemu, setup.guest, setup.vcpus, setup.mib, "-qmp", qmp_flag)
    with Child([*argv, *extra], setup.workdir / "qemu-stderr.txt") as child:
        qmp = Qmp(str(sock), QMP_TIMEOUT_S, child)
        try:
            yield child, qmp
        finally:
            qmp.close()
            remove_quietly(sock)


def qmp_status(qmp: Qmp) -> str:
    return str(qmp.command("query-status")["status"])


def qemu_save(qemu: str, setup: Setup, path: Path, results: Results) -> None:
    mib = setup.mib
    with qemu_child(qemu, setup) as (child, qmp):
        child.expect(r"^READY ", BOOT_TIMEOUT_S)
        expect_ok(child.ask(f"fill 1 {mib // 2}", work_timeout(mib)), "fill")
        expect_ok(child.ask("tick on", ANSWER_TIMEOUT_S), "tick on")
        qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        for run in range(setup.runs + 1):  # run 0: warm-up, as for Ember
            remove_quietly(path)
            qmp.command("stop")
            started = time.perf_counter()
            qmp.command("migrate", uri=f"exec:cat > {path}")
            info = poll_until(
                lambda: qmp.command("query-migrate"),
                lambda info: info.get("status") in ("completed", "failed"),
                work_timeout(mib),
                "QEMU migrate",
            )
            if info["status"] != "completed":
                raise BenchError(f"QEMU migrate failed: {info}")
            migrated = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced = time.perf_counter()
            if run:
                results.add("full", mib, "qemu", (synced - started) * 1000)
                results.add("full", mib, "qemu-nosync", (migrated - started) * 1000)
            qmp.command("cont")
        results.written_mib["full", mib, "qemu"] = path.stat().st_size / 2**20
        qmp.command("quit")
        child.wait_exit(ANSWER_TIMEOUT_S)


def qemu_restore(
    qemu: str, setup: Setup, path: Path, check: bool, results: Results | None
) -> None:
    mib = setup.mib
    with qemu_child(qemu, setup, "-incoming", "defer") as (child, qmp):
        started = time.perf_counter()
        qmp.command("migrate-incoming", uri=f"exec:cat < {path}")
        status = poll_until(
            lambda: qmp_status(qmp),
            lambda status: status != "inmigrate",
            work_timeout(mib),
            "QEMU incoming migration",
        )
        if status != "running":
            qmp.command("cont")  # the source was stopped, so QEMU stays paused
            status = qmp_status(qmp)
        running = time.perf_counter()
        if status != "running":
            raise BenchError(f"QEMU did not run after the incoming migration: {status}")
        child.send("tick on")
        answered, answer = child.expect(ANSWER, ANSWER_TIMEOUT_S)
        expect_ok(answer, "tick on after QEMU's incoming migration")
        if check:
            expect_ok(child.ask(f"check 1 {mib // 2}", work_timeout(mib)), "check")
    if results is not None:
        results.add("running", mib, "qemu", (running - started) * 1000)
        results.add("output", mib, "qemu", (answered - started) * 1000)
        results.add("output", mib, "qemu-process", (answered - child.started) * 1000)


def bench_qemu(qemu: str, setup: Setup, results: Results) -> None:
    path = setup.workdir / "qemu.mig"
    try:
        qemu_save(qemu, setup, path, results)
        for run in range(setup.runs + 1):  # run 0: warm-up and memory check
            recorded = results if run else None
            qemu_restore(qemu, setup, path, run == 0, recorded)
    finally:
        remove_quietly(path)


# --- tables ---------------------------------------------------------------------


def size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def written(results: Results, metric: str, mib: int, column: str) -> str:
    value = results.written_mib.get((metric, mib, column))
    return "-" if value is None else f"{value:.0f}"


def print_tables(results: Results, sizes: list[int], runs: int, vcpus: int) -> None:
    stats = f"ms, median / p90 / min of {runs}; {vcpus} vCPU"
    print_table(
        f"Full snapshot creation, half the guest memory filled ({stats})",
        [
            "guest",
            "Ember",
            "MiB written",
            "QEMU stop+migrate+fsync",
            "(no fsync)",
            "MiB written",
            "Firecracker (published)",
        ],
        [
            [
                size_label(mib),
                cell(results.get("full", mib, "ember")),
                written(results, "full", mib, "ember"),
                cell(results.get("full", mib, "qemu")),
                cell(results.get("full", mib, "qemu-nosync")),
                written(results, "full", mib, "qemu"),
                "max 180 (256 MiB), 280 (512 MiB) [a]",
            ]
            for mib in sizes
        ],
    )
    print_table(
        f"Diff snapshot creation after `fill` of {DIFF_MIB} MiB ({stats})",
        ["guest", "Ember", "MiB written", "QEMU", "Firecracker (published)"],
        [
            [
                size_label(mib),
                cell(results.get("diff", mib, "ember")),
                written(results, "diff", mib, "ember"),
                "n/a [b]",
                "max 70 (256 MiB), 90 (512 MiB) [a]",
            ]
            for mib in sizes
        ],
    )
    print_table(
        f"Restore: request -> vCPUs running ({stats})",
        [
            "guest",
            "Ember Microvm.restore()",
            "QEMU migrate-incoming+cont",
            "Firecracker P50 (published) [c]",
        ],
        [
            [
                size_label(mib),
                cell(results.get("running", mib, "ember"), 2),
                cell(results.get("running", mib, "qemu"), 2),
                FC_RESTORE_P50_MS.get(mib, "-"),
            ]
            for mib in sizes
        ],
    )
    print_table(
        f"Restore: -> first guest output, the answer to `tick on` ({stats})",
        [
            "guest",
            "Ember request->OK",
            "Ember process start->OK",
            "QEMU request->OK",
            "QEMU process start->OK",
        ],
        [
            [
                size_label(mib),
                cell(results.get("output", mib, "ember"), 2),
                cell(results.get("output", mib, "ember-process")),
                cell(results.get("output", mib, "qemu"), 2),
                cell(results.get("output", mib, "qemu-process")),
            ]
            for mib in sizes
        ],
    )
    print(
        "\n[a] Firecracker v1.4 test bounds (maximum allowed, not measured "
        "values), x86,\n    2 vCPUs, snapshot on a ramdisk "
        "(tests/integration_tests/performance/test_snapshot_perf.py).\n"
        "[b] QEMU has no snapshot of only the RAM pages dirtied since the last "
        "one.\n"
        "[c] Firecracker's published load_snapshot P50, m6i.metal, host/guest "
        "5.10, 1 vCPU;\n    its documented target is < 8 ms (p90 5 ms) on "
        "Intel for 2 vCPU / 512 MiB.\n"
        "Published figures were measured on other hardware with a compiled "
        "monitor and a Linux\nguest; they are shown as a distance, not "
        "measured here. Firecracker publishes no\n'first guest output' figure."
    )


# --- main -----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", metavar="MIB,...", help="default 128,1024,4096")
    parser.add_argument("--runs", type=int, metavar="N", help="default 5")
    parser.add_argument("--vcpus", type=int, default=1, metavar="V")
    parser.add_argument(
        "--quick", action="store_true", help="2 runs, 128 MiB only (unless --sizes)"
    )
    parser.add_argument("--no-qemu", action="store_true", help="skip QEMU")
    args = parser.parse_args()
    default_sizes = "128" if args.quick else "128,1024,4096"
    args.sizes = [int(text) for text in (args.sizes or default_sizes).split(",")]
    args.runs = args.runs or (2 if args.quick else 5)
    return args


def main() -> int:
    args = parse_args()
    exit_cleanly_on_sigterm()
    qemu = None if args.no_qemu else qemu_binary()
    if qemu is None and not args.no_qemu:
        note(QEMU_MISSING_NOTE)
    guest = test_guest()
    results = Results()
    with tempfile.TemporaryDirectory(prefix="ember-bench-snapshot-") as temp:
        workdir = Path(temp)
        for mib in args.sizes:
            setup = Setup(guest, args.vcpus, mib, args.runs, workdir)
            note(f"{size_label(mib)}: Ember ...")
            try:
                bench_ember(setup, results)
                if qemu is not None:
                    note(f"{size_label(mib)}: QEMU ...")
                    bench_qemu(qemu, setup, results)
            except BenchError as error:
                note(f"error: {size_label(mib)}: {error}")
                return 1
    print_tables(results, args.sizes, args.runs, args.vcpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

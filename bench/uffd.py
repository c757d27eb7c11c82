"""Benchmark: restoring through a page-fault handler (Uffd) beside mapping the
memory file (File), and how fast the handler serves pages.

    python bench/uffd.py [--sizes 128,1024] [--runs N] [--vcpus V]

For each guest size (MiB) the test guest boots, fills half its memory (`fill 1
<size/2>`: the memory file is then half data, half holes), turns its ticks on and
is snapshotted. Each backend then restores it in this process, `runs` times after
one warm-up:

- File: the memory file mapped privately (`mem_backend="File"`);
- Uffd on-demand: `ember uffd-handler` (default fault-around of 16 pages);
- Uffd on-demand, page per fault: the same handler with `--fault-around 1`;
- Uffd prefault: `ember uffd-handler --mode prefault`, every page filled as soon
  as the restore connects.

The prefault handler fills in bulk while the restored guest already runs: a page
the guest touches before the fill reaches it waits for the fill (so "touch" shows
the fill's progress, and "faults" stays 0 as every wait is ended by the bulk fill).

Columns: restore = the wall time of `Microvm.restore(..., resume=True)`; first
output = from the start of the restore to the guest's `OK` to `tick on`; touch 64
MiB = the guest's `check 1 64` right after (its first touch of that memory, so
each page comes from the backend). A second table gives the handler's rates from
its own counters: pages filled on demand per second of handler time, and
prefaulted pages per second.

Peers: Firecracker publishes restore latency for its File backend only (P50 on
m6i.metal, its v1.4 performance-test configuration): 1.887 ms at 128 MiB,
2.172 ms at 1 GiB; it publishes no Uffd figures. QEMU's nearest equivalent
(postcopy migration) needs a second live QEMU as the source and is not measured
here.

Tables show median / p90 / min in milliseconds; nothing is judged. Files live in a
temporary directory removed at the end; handlers are always reaped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _harness import (
    ANSWER,
    BenchError,
    Summary,
    TimedLog,
    cell,
    exit_cleanly_on_sigterm,
    note,
    poll_until,
    print_table,
    test_guest,
)

TOUCH_MIB = 64
ANSWER_TIMEOUT_S = 60.0
FC_FILE_RESTORE_P50_MS = {128: "1.887", 1024: "2.172"}
BACKENDS = {
    "File": None,
    "Uffd on-demand": ["--mode", "on-demand"],
    "Uffd on-demand, page per fault": ["--mode", "on-demand", "--fault-around", "1"],
    "Uffd prefault": ["--mode", "prefault"],
}


class Handler:
    """`ember uffd-handler --keep-running` for one size and one configuration."""

    def __init__(self, workdir: Path, mem: str, flags: list[str]) -> None:
        self.socket_path = str(workdir / "handler.sock")
        self.stats_path = workdir / "handler.stats"
        self._stderr = open(workdir / "handler.stderr", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.cli",
                "uffd-handler",
                "--socket",
                self.socket_path,
                "--mem-file",
                mem,
                "--stats",
                str(self.stats_path),
                "--keep-running",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on"):
            self.close()
            raise BenchError(f"handler did not start: {line!r}")

    def stats(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.stats_path.read_text())
        return value

    def settled(self, served: int) -> dict[str, Any]:
        """Counters once every microVM so far has gone (written at most every
        0.25 s)."""
        return poll_until(
            self._read_quietly,
            lambda s: s.get("vms_served") == served and s.get("vms_active") == 0,
            10.0,
            "handler counters",
            interval=0.05,
        )

    def _read_quietly(self) -> dict[str, Any]:
        try:
            return self.stats()
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def ask(vm: Any, log: TimedLog, command: str) -> tuple[float, str]:
    log.skip_to_end()
    vm.serial.enqueue_input(command.encode() + b"\n")
    stamp, answer = log.expect(ANSWER, ANSWER_TIMEOUT_S)
    if answer != "OK":
        raise BenchError(f"{command!r} answered {answer!r}")
    return stamp, answer


def snapshot(guest: str, vcpus: int, mib: int, workdir: Path) -> tuple[str, str]:
    from ember.vmm.config import BootSource, MachineConfig
    from ember.vmm.microvm import Console, Microvm

    log = TimedLog()
    vm = Microvm.boot(MachineConfig(vcpus, mib), BootSource(guest), Console(log.feed))
    try:
        log.expect(r"^READY ", ANSWER_TIMEOUT_S)
        ask(vm, log, f"fill 1 {mib // 2}")
        ask(vm, log, "tick on")
        vm.pause()
        state, mem = str(workdir / "vm.state"), str(workdir / "vm.mem")
        vm.snapshot(state, mem)
    finally:
        vm.close()
    return state, mem


def restore_once(state: str, source: str, backend: str) -> dict[str, float]:
    from ember.vmm.microvm import Console, Microvm

    log = TimedLog()
    started = time.perf_counter()
    vm = Microvm.restore(
        state,
        source,
        resume=True,
        console=Console(log.feed),
        mem_backend="File" if backend == "File" else "Uffd",
    )
    try:
        running = time.perf_counter()
        answered, _ = ask(vm, log, "tick on")
        touch_started = time.perf_counter()
        touched, _ = ask(vm, log, f"check 1 {TOUCH_MIB}")
    finally:
        vm.close()
    return {
        "restore": (running - started) * 1000,
        "output": (answered - started) * 1000,
        "touch": (touched - touch_started) * 1000,
    }


@contextlib.contextmanager
def backend_source(
    backend: str, mem: str, workdir: Path
) -> Iterator[tuple[str, Handler | None]]:
    flags = BACKENDS[backend]
    if flags is None:
        yield mem, None
        return
    handler = Handler(workdir, mem, flags)
    try:
        yield handler.socket_path, handler
    finally:
        handler.close()


def bench_size(
    guest: str, vcpus: int, mib: int, runs: int, workdir: Path
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    state, mem = snapshot(guest, vcpus, mib, workdir)
    samples: dict[str, dict[str, list[float]]] = {}
    counters: dict[str, dict[str, Any]] = {}
    try:
        for backend in BACKENDS:
            note(f"{mib} MiB: {backend} ...")
            measured: dict[str, list[float]] = defaultdict(list)
            with backend_source(backend, mem, workdir) as (source, handler):
                for run in range(runs + 1):
                    result = restore_once(state, source, backend)
                    if run:  # the first is a warm-up
                        for key, value in result.items():
                            measured[key].append(value)
                if handler is not None:
                    counters[backend] = handler.settled(runs + 1)["totals"]
            samples[backend] = measured
    finally:
        for path in (state, mem):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return samples, counters


def rate(pages: float, seconds: float) -> str:
    return "-" if seconds <= 0 or pages <= 0 else f"{pages / seconds:,.0f}"


def print_tables(
    results: dict[int, tuple[dict[str, dict[str, list[float]]], dict[str, Any]]],
    runs: int,
    vcpus: int,
) -> None:
    rows = []
    for mib, (samples, _) in results.items():
        for backend, measured in samples.items():
            fc = FC_FILE_RESTORE_P50_MS.get(mib, "-") if backend == "File" else "-"
            rows.append(
                [
                    f"{mib} MiB",
                    backend,
                    cell(Summary.of(measured["restore"]), 2),
                    fc,
                    cell(Summary.of(measured["output"]), 1),
                    cell(Summary.of(measured["touch"]), 1),
                ]
            )
    print_table(
        f"Restore of the test guest ({vcpus} vCPU, half its memory filled), ms, "
        f"median / p90 / min of {runs} runs",
        [
            "guest",
            "backend",
            "restore",
            "Firecracker P50 (published)",
            "first output",
            f"touch {TOUCH_MIB} MiB",
        ],
        rows,
    )
    rate_rows = []
    for mib, (_, counters) in results.items():
        for backend, totals in counters.items():
            rate_rows.append(
                [
                    f"{mib} MiB",
                    backend,
                    f"{totals['faults']:,}",
                    f"{totals['pages_served']:,}",
                    rate(totals["pages_served"], totals["serve_seconds"]),
                    f"{totals['prefaulted_pages']:,}",
                    rate(totals["prefaulted_pages"], totals["prefault_seconds"]),
                ]
            )
    print_table(
        f"Handler counters over {runs + 1} restores (handler's own time)",
        [
            "guest",
            "handler",
            "faults",
            "pages on demand",
            "on-demand pages/s",
            "prefaulted pages",
            "prefault pages/s",
        ],
        rate_rows,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="128,1024",
        type=lambda text: [int(part) for part in text.split(",")],
        help="guest sizes in MiB (default 128,1024)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vcpus", type=int, default=1)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    exit_cleanly_on_sigterm()
    guest = test_guest()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ember-bench-uffd-") as temp:
        for mib in args.sizes:
            if mib // 2 < TOUCH_MIB:
                note(f"{mib} MiB is too small: the guest must fill {TOUCH_MIB} MiB")
                return 2
            try:
                results[mib] = bench_size(guest, args.vcpus, mib, args.runs, Path(temp))
            except BenchError as error:
                note(f"error: {mib} MiB: {error}")
                return 1
    print_tables(results, args.runs, args.vcpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

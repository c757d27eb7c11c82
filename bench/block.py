"""Benchmark: sequential virtio-block throughput from the test guest, Ember beside
QEMU's microvm machine with `virtio-blk-device`, on the same disk file.

    python bench/block.py [--mib N] [--runs R] [--dir DIR] [--no-qemu]

Both monitors boot the same test guest (1 vCPU, 256 MiB) with one disk: a sparse
file of N MiB (default 256). The guest's `blk write 0 <sectors> <seed>` streams
the whole disk in 128 KiB requests, 16 in flight, from its ring-3 driver (which
polls the used ring); `blk read 0 <sectors>` reads it back and checksums it.
Each figure is N MiB over the time from sending the command to its answer on
the console, so it includes the guest generating or checksumming the data
(the same work under both monitors). One untimed pass first allocates the file
and warms the host page cache for both: this measures the monitors' request
paths, not the disk. On a busy or small host the runs vary a lot; compare the
columns of one run of the script rather than figures across runs.

QEMU runs with `acpi=off` (then it lists its virtio-mmio devices on the kernel
command line, which is where the test guest looks) and modern virtio-mmio
(`virtio-mmio.force-legacy=false`). The checksums of both must agree, since both
read back the same pattern.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ember.console import ConsoleLog

SECTOR = 512
ANSWER = re.compile(r"^(OK|ERR.*|SUM .*|PANIC.*)$")
QEMU = "qemu-system-x86_64"


class Monitor:
    """A monitor process whose stdout is the guest console."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.log = ConsoleLog()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(65536):
            self.log.feed(chunk)

    def expect(self, pattern: re.Pattern[str], timeout: float) -> tuple[float, str]:
        """(arrival time, line) of the next line matching `pattern`; gives up early
        if the monitor exits."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                stamp, match = self.log.expect_stamped(pattern, min(remaining, 0.5))
                return stamp, match.string
            except TimeoutError:
                if remaining <= 0.5 or self.process.poll() is not None:
                    tail = "\n".join(self.log.lines[-5:])
                    raise RuntimeError(
                        f"no answer from {self.process.args}:\n{tail}"
                    ) from None

    def timed(self, command: str, timeout: float = 300.0) -> tuple[float, str]:
        """(seconds from sending `command` to its answer, the answer)."""
        assert self.process.stdin is not None
        started = time.perf_counter()
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        stamp, line = self.expect(ANSWER, timeout)
        return stamp - started, line

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def ember_argv(disk: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ember.cli",
        "run",
        "--vcpus",
        "1",
        "--mem-mib",
        "256",
        "--drive",
        str(disk),
    ]


def qemu_argv(binary: str, guest: str, disk: Path) -> list[str]:
    return [
        binary,
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",  # this host's KVM refuses that MSR
        "-smp",
        "1",
        "-m",
        "256",
        "-kernel",
        guest,
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-blk-device,drive=d0",
        "-drive",
        f"id=d0,file={disk},format=raw,if=none",
    ]


def measure(argv: list[str], mib: int, runs: int) -> dict[str, object]:
    sectors = (mib << 20) // SECTOR
    monitor = Monitor(argv)
    writes: list[float] = []
    reads: list[float] = []
    sums: set[str] = set()
    try:
        monitor.expect(re.compile(r"^READY "), timeout=120)
        # Untimed: allocates the sparse file's blocks and warms the page cache.
        monitor.timed(f"blk write 0 {sectors} 0")
        monitor.timed(f"blk read 0 {sectors}")
        for run in range(runs):
            seconds, answer = monitor.timed(f"blk write 0 {sectors} {run + 1}")
            if answer != "OK":
                raise RuntimeError(f"blk write answered {answer!r}")
            writes.append(mib / seconds)
            seconds, answer = monitor.timed(f"blk read 0 {sectors}")
            if not answer.startswith("SUM "):
                raise RuntimeError(f"blk read answered {answer!r}")
            reads.append(mib / seconds)
            sums.add(f"{run + 1}:{answer}")
    finally:
        monitor.close()
    return {"write": writes, "read": reads, "sums": sums}


def fresh_disk(directory: Path, mib: int) -> Path:
    disk = directory / "bench-disk.img"
    disk.unlink(missing_ok=True)
    with disk.open("wb") as file:
        file.truncate(mib << 20)
    return disk


def cell(values: object) -> str:
    if not isinstance(values, list) or not values:
        return "-"
    return f"{statistics.median(values):8.0f} (best {max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="disk and transfer size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where the disk file goes")
    parser.add_argument("--no-qemu", action="store_true")
    args = parser.parse_args()

    from ember.testguest import guest_path

    guest = str(guest_path())
    qemu = None if args.no_qemu else shutil.which(QEMU)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        directory = Path(workdir)
        results["ember"] = measure(
            ember_argv(fresh_disk(directory, args.mib)), args.mib, args.runs
        )
        if qemu is not None:
            disk = fresh_disk(directory, args.mib)
            results["qemu"] = measure(qemu_argv(qemu, guest, disk), args.mib, args.runs)
        elif not args.no_qemu:
            print(f"note: {QEMU} not found; the QEMU column stays empty")

    print(
        f"sequential virtio-block throughput in MiB/s, {args.mib} MiB per "
        f"transfer, median of {args.runs} (best); host: {os.cpu_count()} CPUs"
    )
    print(f"{'':8} {'Ember':>22} {'QEMU microvm':>22}")
    for kind in ("write", "read"):
        ember = cell(results["ember"][kind])
        peer = cell(results.get("qemu", {}).get(kind))
        print(f"{kind:8} {ember:>22} {peer:>22}")
    if "qemu" in results:
        same = results["ember"]["sums"] == results["qemu"]["sums"]
        print(f"checksums of the data read back agree: {'yes' if same else 'NO'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: how guest memory is backed — 4 KiB pages, transparent huge pages, or
2 MiB hugetlbfs pages — Ember beside QEMU microvm on the same test guest.

    python bench/memory.py [--runs N] [--mem-mib M] [--fill-mib F] [--no-qemu]

For each backing, N runs (after one unrecorded warm-up run) of:

- process start -> `READY` (hugetlbfs pages are reserved when memory is mapped);
- the guest's `fill 7 F` from command to `OK`: the guest writes F MiB of fresh
  memory, so every host page behind it is faulted in for the first time — the
  cost huge pages exist to cut.

Ember runs `ember run --huge-pages none|transparent|2m`. QEMU runs with its default
RAM (anonymous memory, which QEMU advises for transparent huge pages, so it is
shown in the Transparent row) and, for 2M, `memory-backend-memfd` with
`hugetlb=on`; QEMU has no switch that keeps 4 KiB pages. 2M rows need free pages
in the host's pool: as root the benchmark grows the pool for the run and gives it
back; otherwise it says what is missing and leaves those rows empty.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _harness import (
    QEMU_MISSING_NOTE,
    BenchError,
    Child,
    Summary,
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
FILL_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
BACKINGS = ("None", "Transparent", "2M")
FOOTNOTE = """
Firecracker documents huge-page backing (docs/hugepages.md) but publishes no
timing for it, so no Firecracker column. Both monitors run on the same host, one
after the other, alternating run by run."""


def run_once(argv: list[str], fill_mib: int, workdir: Path) -> tuple[float, float]:
    """(ms from fork to READY, ms for `fill`); then `reset` and wait for the exit."""
    with Child(argv, workdir / "stderr.txt") as child:
        ready_at, _ = child.expect(READY, BOOT_TIMEOUT_S)
        started = time.perf_counter()
        answer = child.ask(f"fill 7 {fill_mib}", FILL_TIMEOUT_S)
        filled = (time.perf_counter() - started) * 1000
        if answer != "OK":
            raise BenchError(f"fill answered {answer!r}")
        child.send("reset")
        child.wait_exit(EXIT_TIMEOUT_S)
        return (ready_at - child.started) * 1000, filled


def ember_command(backing: str, mem_mib: int) -> list[str]:
    flag = {"None": "none", "Transparent": "transparent", "2M": "2m"}[backing]
    return ember_argv("run", "--mem-mib", str(mem_mib), "--huge-pages", flag)


def qemu_command(qemu: str, guest: str, backing: str, mem_mib: int) -> list[str] | None:
    if backing == "None":
        return None  # QEMU cannot be told to keep 4 KiB pages
    if backing == "Transparent":
        return qemu_argv(qemu, guest, 1, mem_mib)
    backend = f"memory-backend-memfd,id=ram,size={mem_mib}M,hugetlb=on,hugetlbsize=2M"
    return qemu_argv(
        qemu, guest, 1, mem_mib, "-object", backend, "-machine", "memory-backend=ram"
    )


def free_huge_pages() -> int:
    from ember.memory.guest_memory import free_huge_pages as free

    return free()


@contextlib.contextmanager
def huge_page_pool(pages: int) -> Iterator[bool]:
    """At least `pages` free 2 MiB pages for the block (grown as root, and given
    back afterwards); yields whether they are there."""
    try:
        before = int(NR_HUGEPAGES.read_text())
    except (OSError, ValueError):
        yield free_huge_pages() >= pages
        return
    shortfall = pages - free_huge_pages()
    if shortfall > 0:
        with contextlib.suppress(OSError):
            NR_HUGEPAGES.write_text(str(before + shortfall))
    try:
        yield free_huge_pages() >= pages
    finally:
        with contextlib.suppress(OSError):
            NR_HUGEPAGES.write_text(str(before))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, metavar="N")
    parser.add_argument("--mem-mib", type=int, default=256, metavar="M")
    parser.add_argument("--fill-mib", type=int, default=192, metavar="F")
    parser.add_argument("--no-qemu", action="store_true", help="skip QEMU")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    qemu = None if args.no_qemu else qemu_binary()
    if qemu is None and not args.no_qemu:
        note(QEMU_MISSING_NOTE)
    guest = test_guest()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="ember-bench-memory-") as temp,
        huge_page_pool(args.mem_mib // 2) as have_pool,
    ):
        for backing in BACKINGS:
            if backing == "2M" and not have_pool:
                note(
                    f"note: 2M skipped: {args.mem_mib // 2} free 2 MiB pages needed "
                    "(/proc/sys/vm/nr_hugepages; run as root to let the benchmark "
                    "grow the pool)"
                )
                rows.append([backing, "-", "-", "-", "-"])
                continue
            commands = {"ember": ember_command(backing, args.mem_mib)}
            if qemu is not None:
                qemu_cmd = qemu_command(qemu, guest, backing, args.mem_mib)
                if qemu_cmd is not None:
                    commands["qemu"] = qemu_cmd
            boots: dict[str, list[float]] = {name: [] for name in commands}
            fills: dict[str, list[float]] = {name: [] for name in commands}
            try:
                for run in range(args.runs + 1):
                    for name, argv in commands.items():
                        ready, fill = run_once(argv, args.fill_mib, Path(temp))
                        if run > 0:
                            boots[name].append(ready)
                            fills[name].append(fill)
            except BenchError as error:
                note(f"error: {backing}: {error}")
                return 1
            rows.append(
                [
                    backing,
                    cell(Summary.of(boots["ember"])),
                    cell(Summary.of(fills["ember"])),
                    cell(Summary.of(boots.get("qemu", []))),
                    cell(Summary.of(fills.get("qemu", []))),
                ]
            )
    print_table(
        f"Guest memory backing: {args.mem_mib} MiB, 1 vCPU; start -> READY and the "
        f"guest filling {args.fill_mib} MiB of fresh memory (ms, median / p90 / min "
        f"of {args.runs} runs)",
        [
            "huge_pages",
            "Ember start->READY",
            f"Ember fill {args.fill_mib} MiB",
            "QEMU start->READY",
            f"QEMU fill {args.fill_mib} MiB",
        ],
        rows,
    )
    print(FOOTNOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: KVM availability, the built test guest, a huge-page pool."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

KVM_AVAILABLE = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if KVM_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs /dev/kvm")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@pytest.fixture
def huge_page_pool() -> Iterator[Callable[[int], bool]]:
    """`ensure(pages)`: make `pages` free 2 MiB pages exist in the host's hugetlbfs
    pool, growing it where the host lets us (as root); True if they exist. The
    pool goes back to its old size after the test."""
    from ember.memory.guest_memory import free_huge_pages

    try:
        before = int(NR_HUGEPAGES.read_text())
    except (OSError, ValueError):
        before = None

    def ensure(pages: int) -> bool:
        shortfall = pages - free_huge_pages()
        if shortfall > 0 and before is not None:
            # Not root, or no memory to spare: the pool stays short and the
            # caller checks the answer.
            with contextlib.suppress(OSError):
                NR_HUGEPAGES.write_text(str(int(NR_HUGEPAGES.read_text()) + shortfall))
        return free_huge_pages() >= pages

    yield ensure
    if before is not None:
        NR_HUGEPAGES.write_text(str(before))


@pytest.fixture(scope="session")
def guest_elf() -> str:
    from ember.testguest import guest_path

    return str(guest_path())


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "snapshots"
    directory.mkdir()
    return directory


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say plainly how many tests needed real KVM and whether they ran."""
    ran = skipped = 0
    for outcome in ("passed", "failed", "error", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "kvm" not in getattr(report, "keywords", {}):
                continue
            if report.when != "call" and outcome != "skipped":
                continue
            if outcome == "skipped":
                skipped += 1
            else:
                ran += 1
    state = "present" if KVM_AVAILABLE else "absent"
    terminalreporter.write_line(
        f"KVM tests: {ran} ran, {skipped} skipped (/dev/kvm {state})"
    )

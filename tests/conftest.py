"""Shared fixtures: KVM availability, the built test guest."""

from __future__ import annotations

import os
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

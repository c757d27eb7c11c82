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

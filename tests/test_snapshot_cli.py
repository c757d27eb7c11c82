"""`ember snapshot info` and `ember snapshot rebase` on real snapshot files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guest_io import InProcessGuest

pytestmark = pytest.mark.kvm


def _ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory, guest_elf: str) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    guest = InProcessGuest.boot(
        guest_elf,
        vcpus=2,
        mem_mib=4096,
        track_dirty_pages=True,
        huge_pages="Transparent",
    )
    try:
        assert guest.ask("fill 1 8") == "OK"
        guest.microvm.pause()
        guest.microvm.snapshot(
            str(directory / "full.state"), str(directory / "full.mem")
        )
        guest.microvm.resume()
        assert guest.ask("fill 2 4") == "OK"
        guest.microvm.pause()
        guest.microvm.snapshot(
            str(directory / "diff.state"), str(directory / "diff.mem"), diff=True
        )
    finally:
        guest.close()
    return directory


def test_info_text(snapshots: Path) -> None:
    result = _ember("snapshot", "info", str(snapshots / "full.state"))
    assert result.returncode == 0, result.stderr
    assert "format version  1.0.0" in result.stdout
    assert "vCPUs           2" in result.stdout
    assert "4096 MiB" in result.stdout
    assert "0x000100000000" in result.stdout  # the region above 4 GiB
    assert "serial" in result.stdout


def test_info_json(snapshots: Path) -> None:
    result = _ember("snapshot", "info", "--json", str(snapshots / "full.state"))
    info = json.loads(result.stdout)
    assert info["vcpu_count"] == 2
    assert [r["guest_address"] for r in info["memory_regions"]] == [0, 1 << 32]
    assert [r["file_offset"] for r in info["memory_regions"]] == [0, 3 << 30]


def test_info_on_a_bad_file_is_one_line(snapshots: Path) -> None:
    result = _ember("snapshot", "info", str(snapshots / "diff.mem"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_rebase_then_restore(snapshots: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged.mem"
    # A sparse copy: the 4 GiB memory file is mostly holes.
    subprocess.run(
        ["cp", "--sparse=always", str(snapshots / "full.mem"), str(merged)], check=True
    )
    result = _ember(
        "snapshot",
        "rebase",
        "--base",
        str(merged),
        "--diff",
        str(snapshots / "diff.mem"),
    )
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout
    restored = InProcessGuest.restore(str(snapshots / "diff.state"), str(merged))
    try:
        assert restored.ask("check 2 4") == "OK"
    finally:
        restored.close()


def test_rebase_refuses_files_of_different_sizes(
    snapshots: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.mem"
    other.write_bytes(b"x" * 4096)
    result = _ember(
        "snapshot",
        "rebase",
        "--base",
        str(other),
        "--diff",
        str(snapshots / "diff.mem"),
    )
    assert result.returncode == 1
    assert "not snapshots of the same microVM" in result.stderr
    assert other.read_bytes() == b"x" * 4096


def test_progress_bar_reads_the_monitors_temporary_file(tmp_path: Path) -> None:
    from ember.api.cli import _partial_bytes

    target = tmp_path / "vm.mem"
    assert _partial_bytes(target) == 0
    (tmp_path / ".vm.mem.k2j4.partial").write_bytes(b"\x01" * (1 << 20))
    (tmp_path / ".other.mem.x.partial").write_bytes(b"\x01" * (4 << 20))
    assert 1 << 20 <= _partial_bytes(target) < 4 << 20

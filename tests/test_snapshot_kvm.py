"""Snapshot and restore of the test guest on real KVM."""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.snapshot.atomic import SnapshotWriteError
from ember.snapshot.create import DiffNeedsDirtyTrackingError, NotPausedError
from ember.snapshot.memory_file import data_extents, rebase
from ember.snapshot.restore import MemoryFileError
from ember.snapshot.state_file import (
    BadMagicError,
    CrcMismatchError,
    IncompatibleVersionError,
    StateFileError,
    StateFileTooShortError,
    StateFileTruncatedError,
)
from guest_io import EmberProcess, InProcessGuest

pytestmark = pytest.mark.kvm
MiB = 1 << 20


@pytest.fixture
def booted(guest_elf: str) -> Iterator[InProcessGuest]:
    guest = InProcessGuest.boot(
        guest_elf,
        vcpus=2,
        mem_mib=256,
        track_dirty_pages=True,
        huge_pages="Transparent",
    )
    yield guest
    guest.close()


def _files(directory: Path, name: str) -> tuple[str, str]:
    return str(directory / f"{name}.state"), str(directory / f"{name}.mem")


def _data_bytes(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in paths
        if path.exists()
    }


def test_restore_in_a_new_process_continues(
    booted: InProcessGuest, snapshot_dir: Path
) -> None:
    assert booted.ask("fill 5 64") == "OK"
    assert booted.ask("fpu set 9") == "OK"
    assert booted.ask("tick on") == "OK"
    booted.log.expect(r"^TICK \d+$")
    booted.log.expect(r"^TICK \d+$")
    booted.microvm.pause()
    last_tick = booted.log.ticks()[-1]
    state, mem = _files(snapshot_dir, "vm")
    booted.microvm.snapshot(state, mem)
    booted.close()

    restored = EmberProcess(["run", "--snapshot", state, "--mem-file", mem])
    try:
        first = int(restored.log.expect(r"^TICK (\d+)$").group(1))
        assert last_tick < first <= last_tick + 3, (last_tick, first)
        assert restored.ask("tick off") == "OK"
        assert restored.ask("check 5 64") == "OK"
        assert restored.ask("fpu check 9") == "OK"
        assert restored.ask("cpus") == "CPUS 2 alive 2"
        restored.send("reset")
        assert restored.wait(10) == 0
    finally:
        restored.close()


def test_pause_and_resume_are_idempotent(booted: InProcessGuest) -> None:
    booted.microvm.pause()
    booted.microvm.pause()
    assert booted.microvm.paused
    booted.microvm.resume()
    booted.microvm.resume()
    assert booted.ask("cpus") == "CPUS 2 alive 2"


def test_snapshot_while_running_is_refused(
    booted: InProcessGuest, snapshot_dir: Path
) -> None:
    with pytest.raises(NotPausedError, match="running"):
        booted.microvm.snapshot(*_files(snapshot_dir, "vm"))
    assert list(snapshot_dir.iterdir()) == []


def test_diff_needs_dirty_tracking(guest_elf: str, snapshot_dir: Path) -> None:
    guest = InProcessGuest.boot(guest_elf)
    try:
        guest.microvm.pause()
        with pytest.raises(DiffNeedsDirtyTrackingError):
            guest.microvm.snapshot(*_files(snapshot_dir, "vm"), diff=True)
    finally:
        guest.close()


def test_first_diff_of_a_booted_vm_equals_a_full_snapshot(
    booted: InProcessGuest, snapshot_dir: Path
) -> None:
    booted.microvm.pause()
    diff_state, diff_mem = _files(snapshot_dir, "diff")
    full_state, full_mem = _files(snapshot_dir, "full")
    booted.microvm.snapshot(diff_state, diff_mem, diff=True)
    booted.microvm.snapshot(full_state, full_mem)
    assert os.path.getsize(diff_mem) == os.path.getsize(full_mem) == 256 * MiB
    assert filecmp.cmp(diff_mem, full_mem, shallow=False)


def test_diff_after_full_holds_only_pages_dirtied_since(
    booted: InProcessGuest, snapshot_dir: Path
) -> None:
    booted.microvm.pause()
    booted.microvm.snapshot(*_files(snapshot_dir, "full"))
    booted.microvm.resume()
    assert booted.ask("fill 4 4") == "OK"  # 16 MiB .. 20 MiB
    booted.microvm.pause()
    _, diff_mem = _files(snapshot_dir, "diff")
    booted.microvm.snapshot(str(snapshot_dir / "diff.state"), diff_mem, diff=True)
    extents = _data_bytes(diff_mem)
    total = sum(length for _, length in extents)
    assert 4 * MiB <= total < 5 * MiB, total
    assert any(
        start <= 16 * MiB and 20 * MiB <= start + length for start, length in extents
    )


def test_chain_of_diffs_rebased_onto_the_full_restores_the_last_point(
    booted: InProcessGuest, snapshot_dir: Path
) -> None:
    vm = booted.microvm
    assert booted.ask("fill 1 64") == "OK"
    assert booted.ask("fpu set 77") == "OK"
    vm.pause()
    vm.snapshot(*_files(snapshot_dir, "s0"))
    vm.resume()
    assert booted.ask("fill 2 32") == "OK"
    vm.pause()
    vm.snapshot(*_files(snapshot_dir, "s1"), diff=True)
    vm.resume()
    assert booted.ask("fill 3 8") == "OK"
    vm.pause()
    vm.snapshot(*_files(snapshot_dir, "s2"), diff=True)
    booted.close()

    merged = snapshot_dir / "merged.mem"
    shutil.copyfile(snapshot_dir / "s0.mem", merged)
    assert rebase(str(merged), str(snapshot_dir / "s1.mem")) >= 32 * MiB
    assert rebase(str(merged), str(snapshot_dir / "s2.mem")) >= 8 * MiB
    restored = InProcessGuest.restore(str(snapshot_dir / "s2.state"), str(merged))
    try:
        assert restored.ask("check 3 8") == "OK"
        assert restored.ask("fpu check 77") == "OK"
        assert restored.ask("cpus") == "CPUS 2 alive 2"
    finally:
        restored.close()


@pytest.mark.slow
@pytest.mark.parametrize(("mem_mib", "fill_mib"), [(3072, 2900), (4096, 3500)])
def test_large_guests_restore_with_patterns_in_every_region(
    guest_elf: str, snapshot_dir: Path, mem_mib: int, fill_mib: int
) -> None:
    guest = InProcessGuest.boot(
        guest_elf, vcpus=2, mem_mib=mem_mib, huge_pages="Transparent"
    )
    state, mem = _files(snapshot_dir, "big")
    try:
        assert guest.ask(f"fill 31 {fill_mib}", timeout=600) == "OK"
        guest.microvm.pause()
        guest.microvm.snapshot(state, mem)
    finally:
        guest.close()
    restored = InProcessGuest.restore(state, mem)
    try:
        assert restored.ask(f"check 31 {fill_mib}", timeout=600) == "OK"
        assert restored.ask("cpus") == "CPUS 2 alive 2"
    finally:
        restored.close()


# --- failures that must change nothing --------------------------------------------


@pytest.fixture
def good_snapshot(booted: InProcessGuest, snapshot_dir: Path) -> tuple[str, str]:
    assert booted.ask("fill 8 16") == "OK"
    booted.microvm.pause()
    state, mem = _files(snapshot_dir, "good")
    booted.microvm.snapshot(state, mem)
    return state, mem


def _corrupt(data: bytes, kind: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "bit-flipped":
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0x04]) + data[middle + 1 :]
    if kind == "wrong-magic":
        return b"\x00\x00\x64\x86\x84\x19\x10\x08" + data[8:]
    assert kind == "newer-major"
    return data.replace(b"1.0.0", b"2.0.0", 1)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("empty", StateFileTooShortError),
        ("truncated", StateFileTruncatedError),
        ("bit-flipped", CrcMismatchError),
        ("wrong-magic", BadMagicError),
        ("newer-major", IncompatibleVersionError),
    ],
)
def test_bad_state_files_fail_cleanly_and_a_good_load_follows(
    good_snapshot: tuple[str, str],
    snapshot_dir: Path,
    kind: str,
    error: type[Exception],
) -> None:
    state, mem = good_snapshot
    bad = snapshot_dir / f"{kind}.state"
    bad.write_bytes(_corrupt(Path(state).read_bytes(), kind))
    before = _digest([bad, Path(state), Path(mem)])
    with pytest.raises(error):
        InProcessGuest.restore(str(bad), mem)
    assert _digest([bad, Path(state), Path(mem)]) == before
    restored = InProcessGuest.restore(state, mem)  # the process is still usable
    try:
        assert restored.ask("check 8 16") == "OK"
    finally:
        restored.close()


def test_short_and_missing_memory_files(
    good_snapshot: tuple[str, str], snapshot_dir: Path
) -> None:
    state, mem = good_snapshot
    short = snapshot_dir / "short.mem"
    with open(mem, "rb") as source, open(short, "wb") as target:
        target.write(source.read(MiB))
    with pytest.raises(MemoryFileError, match="holds"):
        InProcessGuest.restore(state, str(short))
    with pytest.raises(MemoryFileError, match="No such file"):
        InProcessGuest.restore(state, str(snapshot_dir / "missing.mem"))
    with pytest.raises(StateFileError, match="No such file"):
        InProcessGuest.restore(str(snapshot_dir / "missing.state"), mem)


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if not _can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
        check=True,
    )
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_full_disk_changes_no_file_and_keeps_dirty_pages(
    booted: InProcessGuest, tiny_tmpfs: Path, snapshot_dir: Path
) -> None:
    vm = booted.microvm
    vm.pause()
    state, mem = _files(tiny_tmpfs, "vm")
    vm.snapshot(state, mem)  # a fresh guest's memory is mostly holes: it fits
    before = _digest(list(tiny_tmpfs.iterdir()))
    vm.resume()
    assert booted.ask("fill 6 40") == "OK"
    vm.pause()
    with pytest.raises(SnapshotWriteError, match="No space left"):
        vm.snapshot(state, mem)
    with pytest.raises(SnapshotWriteError, match="No space left"):
        vm.snapshot(state, mem, diff=True)
    assert _digest(list(tiny_tmpfs.iterdir())) == before  # no partial files either
    # The failed diff consumed KVM's dirty log; the retry must still hold the fill.
    retry_state, retry_mem = _files(snapshot_dir, "retry")
    vm.snapshot(retry_state, retry_mem, diff=True)
    assert sum(length for _, length in _data_bytes(retry_mem)) >= 40 * MiB


def test_unwritable_directory_changes_nothing(
    booted: InProcessGuest, tiny_tmpfs: Path
) -> None:
    vm = booted.microvm
    vm.pause()
    state, mem = _files(tiny_tmpfs, "vm")
    vm.snapshot(state, mem)
    before = _digest(list(tiny_tmpfs.iterdir()))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    try:
        with pytest.raises(SnapshotWriteError, match="Read-only"):
            vm.snapshot(state, mem)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_tmpfs)], check=True)
    assert _digest(list(tiny_tmpfs.iterdir())) == before


WRITER = """
import sys
from guest_io import InProcessGuest
guest = InProcessGuest.boot(
    sys.argv[1], vcpus=1, mem_mib=1024, huge_pages="Transparent"
)
assert guest.ask("fill 9 900", timeout=300) == "OK"
guest.microvm.pause()
print("writing", flush=True)
guest.microvm.snapshot(sys.argv[2], sys.argv[3])
print("done", flush=True)
"""


def test_killed_mid_write_leaves_the_old_snapshot_whole(
    good_snapshot: tuple[str, str], tmp_path: Path, guest_elf: str
) -> None:
    state, mem = good_snapshot
    before = _digest([Path(state), Path(mem)])
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    writer = subprocess.Popen(
        [sys.executable, str(script), guest_elf, state, mem],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        directory = Path(mem).parent
        deadline = time.monotonic() + 60
        while not any(  # killed once the new memory file holds real data
            p.name.endswith(".partial") and p.stat().st_blocks * 512 > 64 * MiB
            for p in directory.iterdir()
        ):
            assert time.monotonic() < deadline, "the writer never started its file"
            time.sleep(0.001)
        writer.kill()
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    assert _digest([Path(state), Path(mem)]) == before
    restored = InProcessGuest.restore(state, mem)
    try:
        assert restored.ask("check 8 16") == "OK"
    finally:
        restored.close()

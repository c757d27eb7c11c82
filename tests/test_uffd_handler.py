"""`ember uffd-handler` against the monitor's side of the Uffd backend, without KVM:
this process maps and registers "guest memory" exactly as a restore does and then
touches it; the handler is a real child process."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.memory import GuestAddress, GuestMemory
from ember.memory.guest_memory import free_huge_pages
from ember.snapshot.uffd import (
    HandlerConnectError,
    HugePagesUnavailableError,
    UffdBackend,
    uffd_guest_memory,
    uffd_memory,
)
from ember.uffd_handler import abi
from uffd_process import HandlerProcess

MiB = 1 << 20
PAGE = 4096
# Two regions, like a guest with RAM on both sides of the 32-bit MMIO gap.
LAYOUT = [(0, 4 * MiB), (1 << 32, 2 * MiB)]


def _userfaultfd_available() -> bool:
    try:
        os.close(abi.open_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _userfaultfd_available(), reason="needs userfaultfd (root or its device)"
)


def _pattern(offset: int, length: int) -> bytes:
    """Recognisable file contents: each 8-byte word holds its own file offset."""
    first = offset // 8
    return b"".join((first + i).to_bytes(8, "little") for i in range(length // 8))


@pytest.fixture
def mem_file(tmp_path: Path) -> Path:
    """6 MiB, sparse: data in the first 1 MiB of each region, holes elsewhere."""
    path = tmp_path / "vm.mem"
    with open(path, "wb") as file:
        file.truncate(6 * MiB)
        for offset in (0, 4 * MiB):
            file.seek(offset)
            file.write(_pattern(offset, MiB))
    return path


@pytest.fixture
def handler(tmp_path: Path, mem_file: Path) -> Iterator[HandlerProcess]:
    process = HandlerProcess(tmp_path / "h.sock", mem_file, "--fault-around", "1")
    yield process
    process.close()


def _attach(handler: HandlerProcess) -> tuple[GuestMemory, UffdBackend]:
    return uffd_guest_memory(LAYOUT, handler.socket_path)


def test_faults_are_served_from_the_file_and_holes_with_zeros(
    handler: HandlerProcess,
) -> None:
    memory, backend = _attach(handler)
    try:
        assert memory.read(GuestAddress(PAGE * 3), 16) == _pattern(PAGE * 3, 16)
        second = 1 << 32
        assert memory.read(GuestAddress(second + 8), 8) == _pattern(4 * MiB + 8, 8)
        assert memory.read(GuestAddress(2 * MiB), PAGE) == bytes(PAGE)  # a hole
        stats = handler.wait_stats(lambda s: s["totals"]["faults"] >= 3)
        totals = stats["totals"]
        assert totals["pages_copied"] == 2
        assert totals["zero_pages"] == 1
        assert totals["errors"] == 0
        assert stats["vms_active"] == 1
        assert stats["vms"][0]["pid"] == os.getpid()
    finally:
        backend.close()
        memory.close()
    assert handler.wait() == 0  # its only microVM is gone


def test_writes_stay_in_this_process_and_the_file_is_untouched(
    handler: HandlerProcess, mem_file: Path
) -> None:
    before = mem_file.read_bytes()
    memory, backend = _attach(handler)
    try:
        memory.write(GuestAddress(0), b"guest wrote this")
        memory.write(GuestAddress(3 * MiB), b"and this, in a hole")
        assert memory.read(GuestAddress(0), 16) == b"guest wrote this"
    finally:
        backend.close()
        memory.close()
    handler.wait()
    assert mem_file.read_bytes() == before


def test_removed_ranges_read_back_as_zeros(handler: HandlerProcess) -> None:
    memory, backend = _attach(handler)
    try:
        region = memory.regions[0]
        assert memory.read(GuestAddress(0), 8) == _pattern(0, 8)
        # What a balloon does: discard the pages. The kernel tells the handler
        # (and waits until it has read the event).
        region.mapping.madvise(mmap.MADV_DONTNEED, 0, 64 * 1024)
        assert memory.read(GuestAddress(0), 8) == bytes(8)
        assert memory.read(GuestAddress(60 * 1024), 8) == bytes(8)
        # Outside the removed range the file's bytes are still served.
        assert memory.read(GuestAddress(64 * 1024), 8) == _pattern(64 * 1024, 8)
        stats = handler.wait_stats(lambda s: s["totals"]["faults"] >= 4)
        assert stats["totals"]["remove_events"] == 1
        assert stats["totals"]["removed_bytes"] == 64 * 1024
        assert stats["totals"]["zero_pages"] == 2
    finally:
        backend.close()
        memory.close()


def test_fault_around_fills_a_block_per_fault(tmp_path: Path, mem_file: Path) -> None:
    handler = HandlerProcess(tmp_path / "h.sock", mem_file)
    try:
        memory, backend = _attach(handler)
        try:
            data = memory.read(GuestAddress(0), 64 * 1024)
            assert data == _pattern(0, 64 * 1024)
            stats = handler.wait_stats(lambda s: s["totals"]["pages_copied"] >= 16)
            assert stats["totals"]["faults"] == 1
            assert stats["totals"]["pages_copied"] == 16
        finally:
            backend.close()
            memory.close()
    finally:
        handler.close()


def test_several_vms_at_once_then_a_clean_exit(handler: HandlerProcess) -> None:
    first = _attach(handler)
    second = _attach(handler)
    try:
        for index, (memory, _) in enumerate((first, second)):
            memory.write(GuestAddress(PAGE), bytes([index]) * 8)
        for index, (memory, _) in enumerate((first, second)):
            assert memory.read(GuestAddress(PAGE), 8) == bytes([index]) * 8
            assert memory.read(GuestAddress(0), 8) == _pattern(0, 8)
        stats = handler.wait_stats(lambda s: s["vms_active"] == 2)
        assert [vm["vm"] for vm in stats["vms"]] == [1, 2]
    finally:
        first[1].close()
        first[0].close()
    stats = handler.wait_stats(lambda s: s["vms_active"] == 1)
    assert handler.process.poll() is None  # still serving the second
    second[1].close()
    second[0].close()
    assert handler.wait() == 0
    final = handler.stats()
    assert final["vms_served"] == 2
    assert final["vms_active"] == 0
    # Pages 0 and 1 of each: a write to a missing page is served first too.
    assert final["totals"]["pages_copied"] == 4


def test_prefault_fills_everything_at_connect(tmp_path: Path, mem_file: Path) -> None:
    handler = HandlerProcess(tmp_path / "h.sock", mem_file, mode="prefault")
    try:
        memory, backend = _attach(handler)
        try:
            stats = handler.wait_stats(lambda s: s["totals"]["prefaulted_pages"] > 0)
            assert stats["totals"]["prefaulted_pages"] == 6 * MiB // PAGE
            # Every page is resident before this process touched any of them.
            for region in memory:
                assert region.resident_pages().count(0) == 0
            assert memory.read(GuestAddress(0), 8) == _pattern(0, 8)
            assert memory.read(GuestAddress(2 * MiB), 8) == bytes(8)
            time.sleep(0.3)
            assert handler.stats()["totals"]["pages_served"] == 0
        finally:
            backend.close()
            memory.close()
    finally:
        handler.close()


def test_counters_on_sigusr1(handler: HandlerProcess) -> None:
    memory, backend = _attach(handler)
    try:
        memory.read(GuestAddress(0), 8)
        handler.signal(signal.SIGUSR1)
        time.sleep(0.3)
    finally:
        backend.close()
        memory.close()
    assert handler.wait() == 0
    assert '"pages_copied": 1' in handler.stderr()


def test_memory_file_is_mapped_read_only(
    handler: HandlerProcess, mem_file: Path
) -> None:
    maps = Path(f"/proc/{handler.pid}/maps").read_text().splitlines()
    mappings = [line for line in maps if line.endswith(str(mem_file))]
    assert mappings
    assert all(line.split()[1].startswith("r-") for line in mappings)
    for fd in os.listdir(f"/proc/{handler.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{handler.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        assert target != str(mem_file)


def test_a_bad_handshake_is_refused_and_others_still_served(
    handler: HandlerProcess,
) -> None:
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(handler.socket_path)
    bad.sendall(b'[{"nonsense": 1}]')
    assert bad.recv(1) == b""  # the handler hangs up on it
    bad.close()
    memory, backend = _attach(handler)
    try:
        assert memory.read(GuestAddress(0), 8) == _pattern(0, 8)
    finally:
        backend.close()
        memory.close()
    assert handler.wait() == 0
    assert "refusing microVM 1" in handler.stderr()


def test_regions_beyond_the_file_are_refused(tmp_path: Path) -> None:
    small = tmp_path / "small.mem"
    small.write_bytes(b"x" * MiB)
    handler = HandlerProcess(tmp_path / "h.sock", small)
    try:
        memory, backend = _attach(handler)
        try:
            deadline = time.monotonic() + 5
            while not backend.handler_gone and time.monotonic() < deadline:
                sock = backend._sock
                sock.settimeout(0.2)
                try:
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
            else:
                pytest.fail("the handler kept a microVM it cannot serve")
        finally:
            backend.close()
            memory.close()
        handler.process.send_signal(signal.SIGTERM)
        assert handler.wait() == 0
        assert "holds 1048576" in handler.stderr()
    finally:
        handler.close()


def test_startup_errors(tmp_path: Path, mem_file: Path) -> None:
    from uffd_process import HandlerProcess as Handler

    with pytest.raises(RuntimeError, match="cannot open memory file"):
        Handler(tmp_path / "a.sock", tmp_path / "missing.mem")
    running = Handler(tmp_path / "b.sock", mem_file)
    try:
        with pytest.raises(RuntimeError, match="already listening"):
            Handler(tmp_path / "b.sock", mem_file)
    finally:
        running.close()
    # A socket left behind by a dead handler is replaced.
    stale = Handler(tmp_path / "b.sock", mem_file, "--timeout", "0.2")
    assert stale.wait() == 1
    assert "no microVM connected" in stale.stderr()
    stale.close()
    assert not (tmp_path / "b.sock").exists()


def test_connection_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(HandlerConnectError, match="No such file or directory"):
        uffd_guest_memory(LAYOUT, str(tmp_path / "nobody.sock"))
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(str(tmp_path / "deaf.sock"))  # bound, never listening
    try:
        with pytest.raises(HandlerConnectError, match="Connection refused"):
            uffd_guest_memory(LAYOUT, str(tmp_path / "deaf.sock"))
    finally:
        deaf.close()


def test_hugetlbfs_needs_a_pool() -> None:
    needed = 6 * MiB // (2 * MiB)
    if free_huge_pages() >= needed:
        memory = uffd_memory(LAYOUT, hugetlb=True)
        memory.close()
        return
    with pytest.raises(HugePagesUnavailableError, match="nr_hugepages"):
        uffd_memory(LAYOUT, hugetlb=True)

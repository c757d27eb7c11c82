"""Restoring the test guest through a page-fault handler, on real KVM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from ember.snapshot.restore import restore_microvm
from ember.snapshot.state_file import encode_state, load_state_file
from ember.snapshot.uffd import HandlerConnectError, HugePagesUnavailableError
from ember.vmm.microvm import Console
from guest_io import EmberProcess, InProcessGuest
from test_api_support import ember_process
from uffd_process import HandlerProcess, wait_for_userfault

pytestmark = pytest.mark.kvm
MiB = 1 << 20
TESTS = Path(__file__).parent


@dataclass(frozen=True)
class Snapshot:
    state: str
    mem: str
    last_tick: int
    mem_mib: int


def _take_snapshot(
    guest_elf: str, directory: Path, vcpus: int, mem_mib: int
) -> Snapshot:
    guest = InProcessGuest.boot(guest_elf, vcpus=vcpus, mem_mib=mem_mib)
    try:
        assert guest.ask("fill 5 64") == "OK"
        assert guest.ask("fpu set 9") == "OK"
        assert guest.ask("tick on") == "OK"
        guest.log.expect(r"^TICK \d+$")
        guest.microvm.pause()
        last_tick = guest.log.ticks()[-1]
        state, mem = str(directory / "vm.state"), str(directory / "vm.mem")
        guest.microvm.snapshot(state, mem)
    finally:
        guest.close()
    return Snapshot(state, mem, last_tick, mem_mib)


@pytest.fixture(scope="module")
def snapshot(guest_elf: str, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """2 vCPUs, 256 MiB: ticking, 64 MiB of pattern, FPU registers set."""
    return _take_snapshot(guest_elf, tmp_path_factory.mktemp("uffd"), 2, 256)


@pytest.fixture(scope="module")
def small_snapshot(
    guest_elf: str, tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    """1 vCPU, 128 MiB, for many clones at once."""
    return _take_snapshot(guest_elf, tmp_path_factory.mktemp("uffd-small"), 1, 128)


@pytest.fixture
def handler(tmp_path: Path, snapshot: Snapshot) -> Iterator[HandlerProcess]:
    process = HandlerProcess(tmp_path / "h.sock", snapshot.mem)
    yield process
    process.close()


def _continues(guest: InProcessGuest, snapshot: Snapshot) -> None:
    first = int(guest.log.expect(r"^TICK (\d+)$").group(1))
    assert snapshot.last_tick < first <= snapshot.last_tick + 3, (snapshot, first)
    assert guest.ask("tick off") == "OK"
    assert guest.ask("check 5 64") == "OK"
    assert guest.ask("fpu check 9") == "OK"
    assert guest.ask("cpus") == "CPUS 2 alive 2"


def test_uffd_restore_continues_as_file_restore_does(
    snapshot: Snapshot, handler: HandlerProcess
) -> None:
    by_file = InProcessGuest.restore(snapshot.state, snapshot.mem)
    try:
        _continues(by_file, snapshot)
    finally:
        by_file.close()

    guest = InProcessGuest.restore(
        snapshot.state, handler.socket_path, mem_backend="Uffd"
    )
    try:
        assert guest.microvm.uffd is not None
        assert guest.microvm.uffd.handler_pid == handler.pid
        _continues(guest, snapshot)
        served = handler.wait_stats(lambda s: s["totals"]["pages_copied"] >= 16384)
        assert served["totals"]["faults"] > 0
        assert served["totals"]["prefaulted_pages"] == 0
        # Fresh memory beyond the pattern is a hole in the file: zero pages.
        assert guest.ask("fill 7 128") == "OK"
        assert guest.ask("check 7 128") == "OK"
        stats = handler.wait_stats(lambda s: s["totals"]["zero_pages"] > 0)
        assert stats["totals"]["errors"] == 0
    finally:
        guest.close()
    assert handler.wait() == 0


def test_prefault_serves_every_page_before_the_guest_needs_it(
    snapshot: Snapshot, tmp_path: Path
) -> None:
    handler = HandlerProcess(tmp_path / "h.sock", snapshot.mem, mode="prefault")
    try:
        guest = InProcessGuest.restore(
            snapshot.state, handler.socket_path, mem_backend="Uffd"
        )
        try:
            _continues(guest, snapshot)
            every_page = snapshot.mem_mib * 256
            stats = handler.wait_stats(
                lambda s: s["totals"]["prefaulted_pages"] >= every_page
            )
            assert stats["totals"]["prefaulted_pages"] == every_page
            assert stats["totals"]["pages_served"] == 0
        finally:
            guest.close()
        assert handler.wait() == 0
    finally:
        handler.close()


def test_handler_killed_mid_run_stops_ember_with_an_error(
    snapshot: Snapshot, handler: HandlerProcess
) -> None:
    ember = EmberProcess(
        ["run", "--snapshot", snapshot.state, "--uffd", handler.socket_path]
    )
    try:
        ember.log.expect(r"^TICK \d+$")
        # Freeze the handler, make the guest walk memory it has not touched yet
        # (its vCPUs now wait for pages), then kill the handler.
        handler.signal(signal.SIGSTOP)
        ember.send("check 5 64")
        time.sleep(0.5)
        handler.signal(signal.SIGKILL)
        handler.wait()
        killed = time.monotonic()
        status = ember.wait(timeout=10)
        assert time.monotonic() - killed < 5
        assert status == 1
        assert "page-fault handler" in ember.stderr
    finally:
        ember.close()


def test_in_process_microvm_stops_when_its_handler_dies(
    snapshot: Snapshot, handler: HandlerProcess
) -> None:
    guest = InProcessGuest.restore(
        snapshot.state, handler.socket_path, mem_backend="Uffd"
    )
    try:
        guest.log.expect(r"^TICK \d+$")
        handler.signal(signal.SIGSTOP)
        guest.send("check 5 64")
        time.sleep(0.5)
        handler.signal(signal.SIGKILL)
        stop = guest.microvm.wait(timeout=5)
        assert stop is not None
        assert stop.status == 1
        assert "page-fault handler" in stop.message
        assert guest.microvm.uffd is not None
        assert guest.microvm.uffd.handler_gone
        for vcpu in guest.microvm.vcpus:
            vcpu.join(5)
            assert vcpu.state.value == "exited"
    finally:
        guest.close()


def test_handler_dying_while_the_restore_itself_waits_for_a_page(
    snapshot: Snapshot, handler: HandlerProcess
) -> None:
    # The frozen handler takes the handshake (the kernel queues the connection)
    # but serves nothing: the monitor's own first write into guest memory during
    # the restore (the new generation ID) waits for a page, on a thread that is
    # not a vCPU.
    handler.signal(signal.SIGSTOP)
    ember = EmberProcess(
        ["run", "--snapshot", snapshot.state, "--uffd", handler.socket_path]
    )
    try:
        wait_for_userfault(ember.process.pid)
        handler.signal(signal.SIGKILL)
        handler.wait()
        killed = time.monotonic()
        status = ember.wait(timeout=10)
        assert time.monotonic() - killed < 5
        assert status != 0
        assert "page-fault handler" in ember.stderr
        assert "TICK" not in ember.log.text()  # the guest never ran on zero pages
    finally:
        ember.close()


def test_handler_dying_while_a_snapshot_is_written(
    snapshot: Snapshot, handler: HandlerProcess, tmp_path: Path
) -> None:
    # An earlier snapshot sits at the target paths; the new one reads guest
    # memory through the handler, which dies part-way.
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    state.write_bytes(Path(snapshot.state).read_bytes())
    os.link(snapshot.mem, memory)  # the same bytes, without copying 256 MiB
    before = (state.stat().st_mtime_ns, memory.stat().st_mtime_ns)
    with ember_process(tmp_path) as ember:
        client = ember.client()
        backend = {"backend_type": "Uffd", "backend_path": handler.socket_path}
        answer = client.put(
            "/snapshot/load", {"snapshot_path": snapshot.state, "mem_backend": backend}
        )
        assert answer.status == 204, answer.fault
        handler.signal(signal.SIGSTOP)
        outcome: list[object] = []

        def create() -> None:
            try:
                outcome.append(
                    client.put(
                        "/snapshot/create",
                        {"snapshot_path": str(state), "mem_file_path": str(memory)},
                    ).status
                )
            except OSError as error:  # the process exited before it answered
                outcome.append(error)

        writer = threading.Thread(target=create, daemon=True)
        writer.start()
        wait_for_userfault(ember.process.pid)
        handler.signal(signal.SIGKILL)
        handler.wait()
        killed = time.monotonic()
        status = ember.process.wait(timeout=10)
        assert time.monotonic() - killed < 5
        assert status != 0
        writer.join(10)
        client.close()
        assert outcome and outcome[0] != 204, outcome
        assert "page-fault handler" in ember.stderr_text()
    assert (state.stat().st_mtime_ns, memory.stat().st_mtime_ns) == before
    assert state.read_bytes() == Path(snapshot.state).read_bytes()


@pytest.mark.slow
def test_eight_clones_through_one_handler(
    small_snapshot: Snapshot, tmp_path: Path
) -> None:
    handler = HandlerProcess(tmp_path / "h.sock", small_snapshot.mem)
    clones: list[InProcessGuest] = []
    try:
        for _ in range(8):
            clones.append(
                InProcessGuest.restore(
                    small_snapshot.state, handler.socket_path, mem_backend="Uffd"
                )
            )
        stats = handler.wait_stats(lambda s: s["vms_active"] == 8)
        assert len({vm["pid"] for vm in stats["vms"]}) == 1
        for clone in clones:
            first = int(clone.log.expect(r"^TICK (\d+)$").group(1))
            assert first <= small_snapshot.last_tick + 3
            assert clone.ask("tick off") == "OK"
        # Each clone writes its own pattern over the shared starting point...
        for index, clone in enumerate(clones):
            assert clone.ask(f"fill {100 + index} 16") == "OK"
        # ...and still holds exactly its own: nothing leaked between clones.
        for index, clone in enumerate(clones):
            assert clone.ask(f"check {100 + index} 16") == "OK"
            other = 100 + (index + 1) % len(clones)
            assert clone.ask(f"check {other} 16").startswith("BAD ")
            assert clone.ask("tick on") == "OK"
        for clone in clones:
            tick = int(clone.log.expect(r"^TICK (\d+)$").group(1))
            assert tick > small_snapshot.last_tick
        stats = handler.wait_stats(
            lambda s: all(vm["pages_copied"] > 0 for vm in s["vms"])
        )
        assert stats["totals"]["errors"] == 0
    finally:
        for clone in clones:
            clone.close()
    assert handler.wait() == 0
    assert handler.stats()["vms_served"] == 8
    handler.close()


def test_a_handler_written_from_the_handshake_alone(
    snapshot: Snapshot, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "minimal.sock")
    process = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "minimal_uffd_handler.py"),
            socket_path,
            snapshot.mem,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        guest = InProcessGuest.restore(snapshot.state, socket_path, mem_backend="Uffd")
        try:
            _continues(guest, snapshot)
        finally:
            guest.close()
        assert process.wait(10) == 0
        served = process.stdout.readline().split()
        assert served[0] == "served" and int(served[1]) >= 16384
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_load_errors_leave_the_process_usable(
    snapshot: Snapshot, tmp_path: Path
) -> None:
    before = _open_fds()
    with pytest.raises(HandlerConnectError, match="No such file or directory"):
        restore_microvm(
            snapshot.state, str(tmp_path / "nobody.sock"), mem_backend="Uffd"
        )
    import socket

    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(str(tmp_path / "deaf.sock"))
    try:
        with pytest.raises(HandlerConnectError, match="Connection refused"):
            restore_microvm(
                snapshot.state, str(tmp_path / "deaf.sock"), mem_backend="Uffd"
            )
    finally:
        deaf.close()
    assert _open_fds() == before
    guest = InProcessGuest.restore(snapshot.state, snapshot.mem)
    try:
        _continues(guest, snapshot)
    finally:
        guest.close()


def test_ember_run_uffd_errors(snapshot: Snapshot, tmp_path: Path) -> None:
    ember = EmberProcess(
        ["run", "--snapshot", snapshot.state, "--uffd", str(tmp_path / "nobody.sock")]
    )
    try:
        assert ember.wait() == 1
        stderr = ember.stderr
        assert "cannot connect to the page-fault handler" in stderr
        assert "No such file or directory" in stderr
    finally:
        ember.close()
    both = EmberProcess(
        ["run", "--snapshot", snapshot.state, "--uffd", "x", "--mem-file", "y"]
    )
    try:
        assert both.wait() == 1
        assert "one of --mem-file and --uffd" in both.stderr
    finally:
        both.close()


def test_hugetlbfs_snapshot_through_uffd(
    snapshot: Snapshot, tmp_path: Path, huge_page_pool: Callable[[int], bool]
) -> None:
    """A snapshot marked 2M is restored on hugetlbfs pages, or refused clearly
    where the host has no pool (and the test could not make one)."""
    state = load_state_file(snapshot.state)
    info = msgspec.structs.replace(state.vm_info, huge_pages="2M")
    marked = tmp_path / "huge.state"
    marked.write_bytes(encode_state(msgspec.structs.replace(state, vm_info=info)))
    handler = HandlerProcess(tmp_path / "h.sock", snapshot.mem)
    try:
        from ember.memory.guest_memory import free_huge_pages

        if not huge_page_pool(snapshot.mem_mib // 2):
            with pytest.raises(HugePagesUnavailableError, match="2 MiB"):
                restore_microvm(
                    str(marked),
                    handler.socket_path,
                    mem_backend="Uffd",
                    console=Console(write=lambda data: None),
                )
            return
        free_before = free_huge_pages()
        guest = InProcessGuest.restore(
            str(marked), handler.socket_path, mem_backend="Uffd"
        )
        try:
            _continues(guest, snapshot)
            assert free_huge_pages() < free_before  # the guest is on the pool
        finally:
            guest.close()
        # vms_served counts at connect and the file is rewritten a few times a
        # second, so wait for the copies rather than read one early snapshot.
        stats = handler.wait_stats(lambda s: s["totals"]["pages_copied"] > 0)
        assert stats["vms_served"] == 1
    finally:
        handler.close()

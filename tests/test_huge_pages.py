"""Guest memory on 2 MiB hugetlbfs pages (`huge_pages: "2M"`), on real KVM.

The tests grow the host's pool themselves where they may (as root) and give it
back; where they cannot, the boot must fail with a clear error instead."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ember.memory.guest_memory import HugePagesUnavailableError, free_huge_pages
from ember.snapshot.restore import HugePagesNeedUffdError
from ember.snapshot.state_file import load_state_file
from ember.vmm.config import BootSource, ConfigError, MachineConfig
from ember.vmm.microvm import Console, Microvm
from guest_io import InProcessGuest
from uffd_process import HandlerProcess

pytestmark = pytest.mark.kvm
MEM_MIB = 256
PAGES = MEM_MIB // 2


@pytest.fixture
def pool(huge_page_pool: Callable[[int], bool]) -> None:
    if not huge_page_pool(PAGES):
        pytest.skip(f"the host's hugetlbfs pool cannot give {PAGES} pages here")


@pytest.mark.usefixtures("pool")
def test_a_2m_guest_runs_snapshots_and_restores_through_uffd(
    guest_elf: str, tmp_path: Path
) -> None:
    free_before = free_huge_pages()
    guest = InProcessGuest.boot(
        guest_elf, vcpus=2, mem_mib=MEM_MIB, huge_pages="2M", track_dirty_pages=True
    )
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    try:
        # Every page of the guest is reserved from the pool when it is mapped
        # (free_huge_pages counts what is neither used nor reserved).
        assert free_before - free_huge_pages() == PAGES
        assert guest.ask("fill 6 200") == "OK"  # spans most of guest memory
        assert guest.ask("check 6 200") == "OK"
        assert guest.ask("tick on") == "OK"
        guest.log.expect(r"^TICK \d+$")
        guest.microvm.pause()
        last_tick = guest.log.ticks()[-1]
        guest.microvm.snapshot(state, mem)
    finally:
        guest.close()
    assert free_huge_pages() == free_before  # given back on close
    assert load_state_file(state).vm_info.huge_pages == "2M"

    # As in Firecracker, hugetlbfs memory is restored through a page-fault
    # handler only; mapping the file is refused with a pointer to Uffd...
    with pytest.raises(HugePagesNeedUffdError, match="Uffd"):
        Microvm.restore(state, mem, console=Console(write=lambda _: None))
    # ...unless the load asks for 4 KiB pages (huge_pages "None").
    small = InProcessGuest.restore(state, mem, huge_pages_override="None")
    try:
        assert small.microvm.machine.huge_pages == "None"
        assert free_huge_pages() == free_before  # nothing taken from the pool
        small.log.expect(r"^TICK \d+$")
        assert small.ask("tick off") == "OK"
        assert small.ask("check 6 200") == "OK"
    finally:
        small.close()

    handler = HandlerProcess(tmp_path / "h.sock", mem)
    try:
        restored = InProcessGuest.restore(
            state, handler.socket_path, mem_backend="Uffd"
        )
        try:
            assert restored.microvm.machine.huge_pages == "2M"
            first = int(restored.log.expect(r"^TICK (\d+)$").group(1))
            assert last_tick < first <= last_tick + 3
            assert restored.ask("tick off") == "OK"
            assert restored.ask("check 6 200") == "OK"
            assert restored.ask("cpus") == "CPUS 2 alive 2"
        finally:
            restored.close()
    finally:
        handler.close()


@pytest.mark.usefixtures("pool")
def test_a_pool_too_small_is_a_clear_error_and_leaks_nothing(guest_elf: str) -> None:
    free_before = free_huge_pages()
    too_big = (free_before + 8) * 2  # MiB: 8 pages more than the pool has free
    with pytest.raises(HugePagesUnavailableError, match="nr_hugepages"):
        Microvm.boot(
            MachineConfig(mem_size_mib=too_big, huge_pages="2M"),
            BootSource(guest_elf),
            Console(write=lambda _: None),
        )
    assert free_huge_pages() == free_before


def test_huge_pages_need_an_even_memory_size(guest_elf: str) -> None:
    for huge_pages in ("2M", "Transparent"):
        with pytest.raises(ConfigError, match="multiple of 2"):
            Microvm.boot(
                MachineConfig(mem_size_mib=129, huge_pages=huge_pages),  # type: ignore[arg-type]
                BootSource(guest_elf),
                Console(write=lambda _: None),
            )

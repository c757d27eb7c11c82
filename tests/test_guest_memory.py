"""Guest memory's two copy paths: plain mmap slicing, and the GIL-free copies used
for memory a page-fault handler serves. Both must read and write the same bytes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.memory import GuestAddress, GuestMemory
from ember.memory.guest_memory import PAGE_SIZE, OutOfBoundsError

MiB = 1 << 20
LAYOUT = [(0, MiB), (4 * MiB, MiB)]


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    """Plain anonymous memory, and the Uffd backend's memory (nothing registered
    with a userfaultfd, so every page faults in as a zero page)."""
    plain, served = GuestMemory.anonymous(LAYOUT), GuestMemory.for_userfaultfd(LAYOUT)
    yield plain, served
    plain.close()
    served.close()


def test_only_uffd_memory_copies_without_the_gil(
    both: tuple[GuestMemory, GuestMemory],
) -> None:
    plain, served = both
    assert not any(region.served_by_handler for region in plain)
    assert all(region.served_by_handler for region in served)


@settings(max_examples=200, deadline=None)
@given(
    region=st.sampled_from(LAYOUT),
    offset=st.integers(0, MiB - 1),
    data=st.binary(min_size=1, max_size=3 * PAGE_SIZE),
)
def test_both_paths_agree(
    both: tuple[GuestMemory, GuestMemory],
    region: tuple[int, int],
    offset: int,
    data: bytes,
) -> None:
    base, size = region
    data = data[: size - offset]
    address = GuestAddress(base + offset)
    for memory in both:
        memory.write(address, bytearray(data))
        assert memory.read(address, len(data)) == data
    plain, served = both
    assert plain.read(GuestAddress(base), size) == served.read(GuestAddress(base), size)
    last = (offset + len(data) - 1) // PAGE_SIZE
    for memory in both:
        dirty = memory.region_for(address).monitor_dirty
        assert all(dirty[offset // PAGE_SIZE : last + 1])


def test_bounds_are_checked_on_both_paths(
    both: tuple[GuestMemory, GuestMemory],
) -> None:
    for memory in both:
        with pytest.raises(OutOfBoundsError):
            memory.read(GuestAddress(MiB - 4), 8)  # runs past the first region
        with pytest.raises(OutOfBoundsError):
            memory.write(GuestAddress(2 * MiB), b"x")  # in the gap

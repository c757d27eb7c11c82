"""Whatever bytes a kernel file holds, load_kernel fails only with KernelLoadError."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.arch.x86_64.layout import MiB, ram_layout
from ember.boot import KernelLoadError, load_kernel
from ember.memory import GuestMemory
from test_boot_images import BzImageSpec, Segment, build_bzimage, build_elf, pvh_note


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(ram_layout(4 * MiB)) as guest_memory:
        yield guest_memory


def mutate(image: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    """Overwrite bytes at (position, value) pairs, then maybe cut the tail."""
    mutable = bytearray(image)
    for position, value in edits:
        mutable[position % len(mutable)] = value
    return bytes(mutable[: max(1, len(mutable) - cut)])


VALID_ELF = build_elf(
    [Segment(0x100000, b"\x90" * 32, memsz=64), Segment(0, pvh_note(0x100000), type=4)]
)
VALID_BZIMAGE = build_bzimage(BzImageSpec(payload=b"\x90" * 64))
EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=12)

kernel_bytes = st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.binary(max_size=600).map(lambda tail: b"\x7fELF\x02\x01\x01" + tail),
    st.builds(mutate, st.just(VALID_ELF), EDITS, st.integers(0, 200)),
    st.builds(mutate, st.just(VALID_BZIMAGE), EDITS, st.integers(0, 1200)),
    st.binary(min_size=0x300, max_size=0x300).map(
        lambda raw: raw[:0x202] + b"HdrS" + struct.pack("<H", 0x20F) + raw[0x208:]
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(image=kernel_bytes)
def test_any_bytes_raise_only_kernel_load_error(
    memory: GuestMemory, image: bytes
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel"
        path.write_bytes(image)
        try:
            load_kernel(
                memory, str(path), initrd_path=None, cmdline="quiet", vcpu_count=1
            )
        except KernelLoadError as error:
            assert "\n" not in str(error)
            assert str(path) in str(error)

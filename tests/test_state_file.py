"""The state-file container: CRC-64/Jones, versions, and one error per failure."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.arch.x86_64.vcpu_state import CpuidEntry, VcpuState
from ember.arch.x86_64.vm_state import KvmVmState
from ember.devices.legacy.i8042 import I8042State
from ember.devices.legacy.serial import SerialState
from ember.snapshot import state_file as sf
from ember.snapshot.atomic import SnapshotWriteError
from ember.snapshot.state import (
    DevicesState,
    KvmState,
    MemoryRegionState,
    MicrovmState,
    VmInfo,
    VmState,
)


def sample_state() -> MicrovmState:
    vcpu = VcpuState(
        index=0,
        cpuid=[CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69)],
        msrs={0x10: 12345, 0x6E0: 0},
        regs=bytes(144),
        sregs=bytes(312),
        xsave=bytes(4096),
        xcrs=bytes(392),
        debugregs=bytes(128),
        lapic=bytes(1024),
        vcpu_events=bytes(64),
        mp_state=0,
        tsc_khz=2_000_000,
    )
    return MicrovmState(
        vm_info=VmInfo(mem_size_mib=128),
        kvm_state=KvmState(),
        vm_state=VmState(
            memory=[MemoryRegionState(base_address=0, size=128 << 20)],
            kvm=KvmVmState(
                pic_master=bytes(520),
                pic_slave=bytes(520),
                ioapic=bytes(520),
                pit=bytes(112),
                clock=bytes(48),
            ),
        ),
        vcpu_states=[vcpu],
        device_states=DevicesState(
            serial=SerialState(0x0C, 0, 0, 0, 3, 8, 0, False, b"abc"),
            i8042=I8042State(4, 1, 0, b""),
        ),
    )


def test_crc64_jones_check_values() -> None:
    assert sf.crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    assert sf.crc64(b"\x7b" * 16) == 0x29D5357216326566


def test_round_trip() -> None:
    state = sample_state()
    data = sf.encode_state(state)
    assert data[:8] == struct.pack("<Q", sf.MAGIC_X86_64)
    assert sf.decode_state(data) == state


def test_older_minor_and_other_patch_are_accepted() -> None:
    major, minor, _ = sf.FORMAT_VERSION
    data = sf.encode_state(sample_state(), (major, minor, 99))
    assert sf.decode_state(data) == sample_state()


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda d: b"", sf.StateFileTooShortError),
        (lambda d: d[:20], sf.StateFileTooShortError),
        (lambda d: d[: len(d) // 2], sf.StateFileTruncatedError),
        (lambda d: d[:-1], sf.StateFileTruncatedError),
        (lambda d: d + b"x", sf.StateFileTruncatedError),
        (lambda d: d[:7] + b"\xff" + d[8:], sf.BadMagicError),
        (
            lambda d: (
                d[: len(d) // 2] + bytes([d[len(d) // 2] ^ 0x10]) + d[len(d) // 2 + 1 :]
            ),
            sf.CrcMismatchError,
        ),
        (lambda d: d[:-8] + bytes(8), sf.CrcMismatchError),
    ],
    ids=["empty", "tiny", "half", "minus-one", "trailing", "magic", "bit-flip", "crc"],
)
def test_each_corruption_has_its_own_error(
    mangle: object, error: type[Exception]
) -> None:
    data = sf.encode_state(sample_state())
    with pytest.raises(error):
        sf.decode_state(mangle(data))  # type: ignore[operator]


@pytest.mark.parametrize("version", [(2, 0, 0), (1, 1, 0), (0, 9, 0)])
def test_incompatible_versions_are_refused(version: tuple[int, int, int]) -> None:
    data = sf.encode_state(sample_state(), version)
    with pytest.raises(sf.IncompatibleVersionError, match="format version"):
        sf.decode_state(data)


def test_undecodable_payload_with_valid_crc() -> None:
    version = sf.version_text().encode()
    payload = msgspec.msgpack.encode({"not": "a microvm"})
    body = (
        struct.pack("<QQ", sf.MAGIC_X86_64, len(version))
        + version
        + struct.pack("<Q", len(payload))
        + payload
    )
    with pytest.raises(sf.UndecodableStateError):
        sf.decode_state(body + struct.pack("<Q", sf.crc64(body)))


def test_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with open(path, "wb") as file:
        file.truncate(sf.MAX_STATE_FILE_BYTES + 10)
    with pytest.raises(sf.StateFileTooLargeError):
        sf.load_state_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(sf.StateFileError, match="No such file"):
        sf.load_state_file(tmp_path / "nope")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_state_file_errors(data: bytes) -> None:
    with pytest.raises(sf.StateFileError):
        sf.decode_state(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_single_bit_flip_is_caught(position: int, bit: int) -> None:
    data = bytearray(sf.encode_state(sample_state()))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(sf.StateFileError):
        sf.decode_state(bytes(data))


def test_write_is_atomic_and_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "vm.state"
    sf.write_state_file(path, sample_state())
    first = path.read_bytes()
    sf.write_state_file(path, sample_state())
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["vm.state"]


def test_write_into_missing_directory_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(SnapshotWriteError, match="cannot create"):
        sf.write_state_file(tmp_path / "no" / "vm.state", sample_state())

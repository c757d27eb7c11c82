"""The test guest: its build, its ELF shape, and (under QEMU) its console protocol."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.testguest import GuestBuildError, build_guest, guest_path, guest_source_dir

PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "guest"
    shutil.copytree(guest_source_dir(), copy)
    return copy


def _program_headers(elf: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """(type, offset, vaddr, paddr, filesz, memsz) of each program header."""
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    headers = []
    for i in range(phnum):
        p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align = (
            struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        )
        headers.append((p_type, offset, vaddr, paddr, filesz, memsz))
    return headers


def _notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    offset = 0
    while offset + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, offset)
        offset += 12
        name = data[offset : offset + namesz].rstrip(b"\0")
        offset += (namesz + 3) & ~3
        desc = data[offset : offset + descsz]
        offset += (descsz + 3) & ~3
        yield name, note_type, desc


def test_source_dir_holds_the_sources() -> None:
    source = guest_source_dir()
    for name in ("entry.S", "kernel.c", "user.c", "lib.c", "guest.h", "linker.ld"):
        assert (source / name).is_file()


def test_elf_is_x86_64_at_1mib_with_a_pvh_note(cache_dir: Path) -> None:
    elf = build_guest().read_bytes()
    assert elf[:4] == b"\x7fELF"
    assert elf[4] == 2 and elf[5] == 1  # ELF64, little-endian
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, EM_X86_64
    (e_entry,) = struct.unpack_from("<Q", elf, 24)

    headers = _program_headers(elf)
    loads = [h for h in headers if h[0] == PT_LOAD]
    assert loads and min(h[3] for h in loads) == 0x100000
    image_end = max(h[3] + h[5] for h in loads)
    assert image_end < 16 << 20  # fill/check start at 16 MiB

    entries = [
        int.from_bytes(desc, "little")
        for h in headers
        if h[0] == PT_NOTE
        for name, note_type, desc in _notes(elf[h[1] : h[1] + h[4]])
        if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) == 4
    ]
    assert len(entries) == 1
    pvh_entry = entries[0]
    assert pvh_entry == e_entry
    assert any(h[3] <= pvh_entry < h[3] + h[4] for h in loads)


def test_build_is_cached_and_keyed_by_the_sources(
    cache_dir: Path, source_copy: Path
) -> None:
    first = build_guest(source_dir=source_copy)
    assert first.parent == cache_dir
    assert build_guest(source_dir=source_copy) == first
    stamp = first.stat().st_mtime_ns
    assert build_guest(force=True, source_dir=source_copy) == first
    assert first.stat().st_mtime_ns >= stamp

    with (source_copy / "lib.c").open("a") as f:
        f.write("/* changed */\n")
    second = build_guest(source_dir=source_copy)
    assert second != first and second.is_file()
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


def test_build_failure_reports_gcc_output(cache_dir: Path, source_copy: Path) -> None:
    (source_copy / "lib.c").write_text("this is not C;\n")
    with pytest.raises(GuestBuildError, match=r"lib\.c"):
        build_guest(source_dir=source_copy)
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_guest_path_is_the_cached_build(cache_dir: Path) -> None:
    assert guest_path() == build_guest()


# ---- under QEMU ----

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu_kvm = pytest.mark.skipif(
    QEMU is None or not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="needs qemu-system-x86_64 and /dev/kvm",
)


class QemuGuest:
    """The test guest under `qemu-system-x86_64 -M microvm`, driven over stdio."""

    def __init__(self, elf: Path, vcpus: int, mem_mib: int) -> None:
        assert QEMU is not None
        # fmt: off
        self.process = subprocess.Popen(
            [
                QEMU, "-M", "microvm", "-enable-kvm",
                "-cpu", "host,-arch-capabilities",
                "-smp", str(vcpus), "-m", str(mem_mib), "-kernel", str(elf),
                "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        self.pending = b""

    def line(self, timeout: float = 30.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if not readable:
                raise TimeoutError(f"no line from the guest; got {self.pending!r}")
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                raise EOFError(f"QEMU exited; got {self.pending!r}")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def ask(self, command: str, timeout: float = 60.0) -> str:
        """Send a command; its answer, skipping TICK lines."""
        self.send(command)
        while (answer := self.line(timeout)).startswith("TICK "):
            pass
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


@pytest.fixture
def qemu_guest(request: pytest.FixtureRequest) -> Iterator[QemuGuest]:
    vcpus, mem_mib = request.param
    guest = QemuGuest(guest_path(), vcpus, mem_mib)
    try:
        yield guest
    finally:
        guest.close()


@pytest.mark.kvm
@needs_qemu_kvm
@pytest.mark.parametrize("qemu_guest", [(4, 512)], indirect=True)
def test_console_protocol_under_qemu(qemu_guest: QemuGuest) -> None:
    guest = qemu_guest
    assert guest.line() == "READY vcpus=4 mem_mib=512"
    assert guest.ask("cpus") == "CPUS 4 alive 4"

    assert guest.ask("tick on") == "OK"
    ticks = [guest.line() for _ in range(3)]
    numbers = [int(t.removeprefix("TICK ")) for t in ticks]
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    assert guest.ask("tick off") == "OK"

    assert guest.ask("fill 7 256") == "OK"
    assert guest.ask("check 7 256") == "OK"
    assert guest.ask("check 8 1") == "BAD 0x1000000"
    assert guest.ask("fill 7 100000").startswith("ERR ")

    assert guest.ask("fpu set 0x1234") == "OK"
    assert guest.ask("cpus") == "CPUS 4 alive 4"
    assert guest.ask("fpu check 0x1234") == "OK"
    assert guest.ask("fpu check 99") == "BAD"
    assert guest.ask("fpu check 4660") == "OK"  # a failed check changes nothing

    for bad in ("", "bogus", "fill 1", "fill x 1", "fpu", "tick", "cpus 2"):
        assert guest.ask(bad).startswith("ERR "), bad
    assert guest.ask("check 7 256\r") == "OK"  # "\r\n" line ends work too

    guest.send("reset")
    assert guest.process.wait(timeout=30) == 0  # -no-reboot: a reset exits QEMU


@pytest.mark.kvm
@pytest.mark.slow
@needs_qemu_kvm
@pytest.mark.parametrize("qemu_guest", [(2, 4096)], indirect=True)
def test_fill_spills_above_4gib_under_qemu(qemu_guest: QemuGuest) -> None:
    guest = qemu_guest
    assert guest.line() == "READY vcpus=2 mem_mib=4096"
    answer = guest.ask("fill 1 1000000")
    assert answer.startswith("ERR only ")
    fillable = int(answer.split()[2])
    assert fillable > 4000
    assert guest.ask(f"fill 1 {fillable}", timeout=300) == "OK"
    assert guest.ask(f"check 1 {fillable}", timeout=300) == "OK"
    # Overwrite all but the last MiB: the first mismatch is that MiB, above 4 GiB.
    assert guest.ask(f"fill 2 {fillable - 1}", timeout=300) == "OK"
    answer = guest.ask(f"check 2 {fillable}", timeout=300)
    assert answer.startswith("BAD 0x")
    assert int(answer.split()[1], 16) >= 4 << 30

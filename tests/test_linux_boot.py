"""Linux as a guest: Debian's cloud kernel, and the unpacking that gets it here.

The unit tests build small bzImages, ar archives and .debs by hand. The slow test
boots Debian's real kernel and reads what its own early boot log says about the
machine Ember gave it. On this project's PVM-backed hosts the kernel stops soon
after that log (see docs/architecture.md, "Why a test guest"), so the test reads
only as far as it needs.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ember.linux_kernel import (
    BzImageFormatError,
    DebArchiveError,
    KernelDependencyError,
    NotElfError,
    PayloadDecompressError,
    bzimage_payload,
    deb_control,
    deb_vmlinuz,
    fetch_debian_cloud_vmlinux,
    image_packages,
    kernel_release,
    lz4_legacy_stream,
    read_ar,
    vmlinux_from_bzimage,
)

# --- synthetic images ------------------------------------------------------


def fake_elf64(body_size: int = 5000, elf_class: int = 2, machine: int = 62) -> bytes:
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4] = elf_class
    header[5] = 1  # little-endian
    header[6] = 1  # EV_CURRENT
    header[18:20] = machine.to_bytes(2, "little")
    # Compressible but not trivial, so every format produces a real stream.
    body = bytes((i * 7 + i // 300) & 0xFF for i in range(body_size))
    return bytes(header) + body


def size_trailer(data: bytes) -> bytes:
    """What the kernel's build appends to every compressed payload."""
    return (len(data) & 0xFFFFFFFF).to_bytes(4, "little")


def make_bzimage(
    payload: bytes, setup_sects: int = 3, payload_gap: int = 0x40, version: int = 0x20F
) -> bytes:
    """A bzImage with `payload` at `payload_gap` into its protected-mode code."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = version.to_bytes(2, "little")
    setup[0x248:0x24C] = payload_gap.to_bytes(4, "little")
    setup[0x24C:0x250] = len(payload).to_bytes(4, "little")
    decompressor_stub = b"\xcc" * payload_gap
    return bytes(setup) + decompressor_stub + payload + b"\xcc" * 100


def _run(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        # gzip's own trailer (ISIZE) is the size the kernel's build relies on.
        return gzip.compress(data)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ) + size_trailer(data)
    if kind == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE) + size_trailer(data)
    if kind == "bzip2":
        return bz2.compress(data) + size_trailer(data)
    if kind == "lz4":
        # -l: the legacy frame format the kernel uses; small blocks to get several.
        return _run(["lz4", "-l", "-c", "-9"], data) + size_trailer(data)
    if kind == "zstd":
        return _run(["zstd", "-c", "-q"], data) + size_trailer(data)
    raise AssertionError(kind)


def _needs_tool(kind: str) -> None:
    tool = {"lz4": "lz4", "zstd": "zstd"}.get(kind)
    if tool and shutil.which(tool) is None:
        pytest.skip(f"the `{tool}` command is not installed")


# --- bzImage payload extraction -------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd"])
def test_vmlinux_from_bzimage_decompresses_each_format(kind: str) -> None:
    _needs_tool(kind)
    elf = fake_elf64()
    image = make_bzimage(_compress(kind, elf))

    assert vmlinux_from_bzimage(image) == elf


def test_payload_is_located_from_the_protected_mode_code() -> None:
    payload = b"\x1f\x8b" + b"P" * 30
    image = make_bzimage(payload, setup_sects=27, payload_gap=0x2CC)

    assert bzimage_payload(image) == payload


def test_setup_sects_zero_means_four() -> None:
    payload = b"\x1f\x8b" + b"Q" * 30
    image = bytearray(make_bzimage(payload, setup_sects=4))
    image[0x1F1] = 0

    assert bzimage_payload(bytes(image)) == payload


def test_lz4_legacy_stream_stops_before_the_size_trailer() -> None:
    blocks = b"\x03\x00\x00\x00abc" + b"\x02\x00\x00\x00de"
    stream = b"\x02\x21\x4c\x18" + blocks

    assert lz4_legacy_stream(stream + (10**6).to_bytes(4, "little")) == stream


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 100, "too short"),
        (b"\0" * 0x300, "no 'HdrS'"),
        (make_bzimage(b"\x1f\x8bxxxx", version=0x207), "predates 2.08"),
        (make_bzimage(b"\x1f\x8bxxxx")[:0x500], "outside"),
    ],
)
def test_bad_bzimages_are_rejected(image: bytes, message: str) -> None:
    with pytest.raises(BzImageFormatError, match=message):
        vmlinux_from_bzimage(image)


def test_unknown_compression_is_named() -> None:
    image = make_bzimage(b"\x89LZO\0" + b"z" * 20)

    with pytest.raises(PayloadDecompressError, match="LZO"):
        vmlinux_from_bzimage(image)
    with pytest.raises(PayloadDecompressError, match="unknown compression: payload"):
        vmlinux_from_bzimage(make_bzimage(b"garbage-bytes"))


def test_truncated_payload_is_a_decompress_error() -> None:
    compressed = lzma.compress(fake_elf64(), format=lzma.FORMAT_XZ)

    with pytest.raises(PayloadDecompressError, match="xz payload"):
        vmlinux_from_bzimage(make_bzimage(compressed[:-40]))


def test_size_trailer_mismatch_is_caught() -> None:
    elf = fake_elf64()
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + size_trailer(elf + b"x")

    with pytest.raises(PayloadDecompressError, match="trailer says"):
        vmlinux_from_bzimage(make_bzimage(payload))


@pytest.mark.parametrize(
    "kernel",
    [b"not an elf at all" * 10, fake_elf64(elf_class=1), fake_elf64(machine=3)],
)
def test_result_must_be_an_x86_64_elf64(kernel: bytes) -> None:
    with pytest.raises(NotElfError):
        vmlinux_from_bzimage(make_bzimage(gzip.compress(kernel)))


# --- ar archives and .debs ------------------------------------------------


def ar_member(name: str, data: bytes) -> bytes:
    header = (
        name.ljust(16)
        + "0".ljust(12)
        + "0".ljust(6)
        + "0".ljust(6)
        + "100644".ljust(8)
        + str(len(data)).ljust(10)
        + "`\n"
    ).encode("ascii")
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_ar(*members: tuple[str, bytes]) -> bytes:
    return b"!<arch>\n" + b"".join(ar_member(n, d) for n, d in members)


def test_read_ar_returns_members_in_order_with_padding_skipped() -> None:
    archive = make_ar(("debian-binary", b"2.0\n"), ("odd/", b"abc"), ("last", b"xy"))

    members = read_ar(archive)

    assert [(m.name, m.data) for m in members] == [
        ("debian-binary", b"2.0\n"),
        ("odd", b"abc"),
        ("last", b"xy"),
    ]


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (b"PK\x03\x04 not ar", "no '!<arch>' magic"),
        (make_ar(("a", b"0123456789abcdef"))[:-4], "past the archive end"),
        (make_ar(("a", b"1234"))[:30], "truncated"),
        (make_ar(("a", b"1234")).replace(b"4         `", b"x         `"), "bad size"),
    ],
)
def test_read_ar_rejects_malformed_archives(archive: bytes, message: str) -> None:
    with pytest.raises(DebArchiveError, match=message):
        read_ar(archive)


def _tar(files: dict[str, bytes], mode: Literal["w:xz", "w:gz"]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


CONTROL = """\
Package: linux-image-cloud-amd64
Version: 6.1.192-3
Architecture: amd64
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
Description: Linux for x86-64 cloud (meta-package)
"""


def make_deb(tmp_path: Path, data_files: dict[str, bytes]) -> Path:
    deb = tmp_path / "pkg_1.0_amd64.deb"
    deb.write_bytes(
        make_ar(
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", _tar({"./control": CONTROL.encode()}, "w:xz")),
            ("data.tar.gz", _tar(data_files, "w:gz")),
        )
    )
    return deb


def test_deb_control_and_vmlinuz_are_read(tmp_path: Path) -> None:
    bzimage = make_bzimage(gzip.compress(fake_elf64()))
    deb = make_deb(
        tmp_path,
        {
            "./boot/config-6.1.0-57-cloud-amd64": b"CONFIG_X=y\n",
            "./boot/vmlinuz-6.1.0-57-cloud-amd64": bzimage,
        },
    )

    assert "Depends: linux-image-6.1.0-57" in deb_control(deb)
    assert deb_vmlinuz(deb) == ("6.1.0-57-cloud-amd64", bzimage)


def test_deb_without_vmlinuz(tmp_path: Path) -> None:
    deb = make_deb(tmp_path, {"./usr/share/doc/x/copyright": b"c"})

    assert deb_vmlinuz(deb) is None


def test_deb_without_data_member(tmp_path: Path) -> None:
    deb = tmp_path / "broken.deb"
    deb.write_bytes(make_ar(("debian-binary", b"2.0\n")))

    with pytest.raises(DebArchiveError, match=r"no data\.tar\.\* member"):
        deb_vmlinuz(deb)


def test_image_packages_from_depends() -> None:
    assert image_packages(CONTROL) == [
        "linux-image-6.1.0-57-cloud-amd64",
        "linux-image-6.1.0-57-cloud-amd64-unsigned",
    ]
    both = "Depends: linux-image-6.12.9+deb13-cloud-amd64-unsigned | foo, bar (>= 1)\n"
    assert image_packages(both) == ["linux-image-6.12.9+deb13-cloud-amd64-unsigned"]
    assert image_packages("Package: x\nDepends: libc6\n") == []


def test_kernel_release_from_package_name() -> None:
    assert kernel_release("linux-image-6.1.0-57-cloud-amd64") == "6.1.0-57-cloud-amd64"
    assert (
        kernel_release("linux-image-6.1.0-57-cloud-amd64-unsigned")
        == "6.1.0-57-cloud-amd64"
    )
    with pytest.raises(KernelDependencyError):
        kernel_release("linux-image-amd64")


# --- booting Debian's kernel ----------------------------------------------

MEM_MIB = 256
VCPUS = 2
BOOT_TIMEOUT_S = 240.0

# What the kernel must have printed before the test stops reading. The memory
# summary comes last, a moment before this host's emulation failure.
NEEDED = {
    "command line": re.compile(r"Kernel command line: "),
    "memory": re.compile(r"Memory: \d+K/\d+K available"),
    "cpus": re.compile(r"smpboot: Allowing \d+ CPUs"),
}
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\] ")
_E820 = re.compile(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)")


@dataclass
class BootLog:
    marker: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    stderr: str = ""
    exit_status: int | None = None
    elapsed_s: float = 0.0

    def messages(self) -> list[str]:
        """The kernel's lines without their printk timestamps."""
        return [_TIMESTAMP.sub("", line) for _, line in self.lines]

    def first(self, pattern: re.Pattern[str]) -> str:
        found = [m for m in self.messages() if pattern.search(m)]
        assert found, f"the kernel never printed /{pattern.pattern}/:\n{self.tail()}"
        return found[0]

    def tail(self) -> str:
        shown = "\n".join(line for _, line in self.lines[-15:])
        return f"{shown}\n(ember stderr: {self.stderr.strip() or 'empty'})"


def _read_lines(stream: io.BufferedReader, out: queue.Queue[bytes | None]) -> None:
    for raw in stream:
        out.put(raw)
    out.put(None)


def _boot(kernel: Path, marker: str, stderr_path: Path) -> BootLog:
    argv = [sys.executable, "-m", "ember.cli", "run", "--kernel", str(kernel)]
    argv += ["--vcpus", str(VCPUS), "--mem-mib", str(MEM_MIB)]
    argv += ["--cmdline", f"console=ttyS0 earlyprintk=serial,ttyS0 {marker}"]
    log = BootLog(marker)
    lines: queue.Queue[bytes | None] = queue.Queue()
    start = time.monotonic()
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
    assert proc.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines))
    reader.start()
    missing = set(NEEDED)
    try:
        while missing:
            remaining = start + BOOT_TIMEOUT_S - time.monotonic()
            raw = lines.get(timeout=max(remaining, 0.0))
            if raw is None:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            log.lines.append((time.monotonic() - start, line))
            missing -= {name for name in missing if NEEDED[name].search(line)}
    except queue.Empty:
        pass
    finally:
        log.elapsed_s = time.monotonic() - start
        proc.kill()
        log.exit_status = proc.wait()
        reader.join()
        proc.stdout.close()
    log.stderr = stderr_path.read_text(errors="replace")
    return log


def _skip_without_host_support() -> None:
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available to fetch Debian's kernel")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing or not accessible")


@pytest.fixture(scope="module")
def debian_boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootLog]:
    _skip_without_host_support()
    kernel = fetch_debian_cloud_vmlinux()
    marker = f"ember.test={secrets.token_hex(4)}"
    yield _boot(kernel, marker, tmp_path_factory.mktemp("linux") / "stderr")


@pytest.mark.slow
@pytest.mark.kvm
def test_debian_kernel_reports_the_machine_ember_gave_it(
    debian_boot: BootLog, capsys: pytest.CaptureFixture[str]
) -> None:
    log = debian_boot
    with capsys.disabled():
        print(f"\n--- Debian kernel on Ember, {log.elapsed_s:.1f} s of reading ---")
        for at, line in log.lines:
            print(f"[+{at:6.1f} s] {line}")
        print(f"--- ember stderr: {log.stderr.strip() or '(empty)'} ---")

    # Ember's e820 lists RAM only: below the EBDA and from 1 MiB to the end of
    # memory. Linux's own PVH entry code adds the ISA hole [0xa0000, 1 MiB) as
    # reserved before printing, so that line is the kernel's, not Ember's.
    e820 = [m.groups() for m in map(_E820.search, log.messages()) if m]
    assert e820 == [
        ("0x0000000000000000", "0x000000000009fbff", "usable"),
        ("0x00000000000a0000", "0x00000000000fffff", "reserved"),
        ("0x0000000000100000", f"{MEM_MIB * 2**20 - 1:#018x}", "usable"),
    ], log.tail()

    assert log.first(re.compile(r"^Command line: ")).endswith(log.marker)
    assert log.first(NEEDED["command line"]).endswith(log.marker)

    # Linux keeps page 0 for itself and drops the partial page below the EBDA,
    # so it counts the usable e820 ranges in whole pages from 4 KiB.
    usable = (0x9F000 - 0x1000) + (MEM_MIB * 2**20 - 0x100000)
    memory = log.first(NEEDED["memory"])
    assert f"/{usable // 1024}K available" in memory


@pytest.mark.slow
@pytest.mark.kvm
def test_debian_kernel_sees_every_vcpu(debian_boot: BootLog) -> None:
    # Debian's cloud kernel is built without CONFIG_X86_MPPARSE: it ignores the
    # MP table and counts CPUs from ACPI's MADT alone.
    assert debian_boot.first(
        re.compile(r"ACPI: Using ACPI \(MADT\) for SMP configuration")
    )
    cpus = debian_boot.first(NEEDED["cpus"])
    assert f"Allowing {VCPUS} CPUs" in cpus


# "ACPI: FACP 0x00000000000E01B0 000114 (v06 EMBER  EMBERVM  00000001 EMBR ...)"
_ACPI_TABLE = re.compile(
    r"^ACPI: (RSDP|XSDT|FACP|DSDT|APIC) 0x([0-9A-F]{16}) [0-9A-F]{6} \(v0(\d) EMBER "
)


@pytest.mark.slow
@pytest.mark.kvm
def test_debian_kernel_lists_embers_acpi_tables(debian_boot: BootLog) -> None:
    found = {
        m.group(1): (int(m.group(2), 16), int(m.group(3)))
        for m in map(_ACPI_TABLE.search, debian_boot.messages())
        if m
    }
    assert set(found) == {"RSDP", "XSDT", "FACP", "DSDT", "APIC"}, debian_boot.tail()
    assert found["RSDP"] == (0xE0000, 2)  # from the boot protocol, revision 2
    assert found["FACP"][1] == 6  # ACPI 6 FADT, hardware-reduced
    assert all(0xE0000 <= address < 0x100000 for address, _ in found.values())
    assert debian_boot.first(re.compile(rf"IOAPIC\[0\]: apic_id {VCPUS}, .* GSI 0-23"))

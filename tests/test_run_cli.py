"""`ember run` end to end: the test guest through the command line, and bad kernels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from guest_io import EmberProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_first_command() -> str:
    lines = README.read_text().splitlines()
    start = lines.index("```sh") + 1
    return lines[start]


@pytest.mark.kvm
def test_readme_first_command_runs_the_demo_to_the_end() -> None:
    command = _readme_first_command()
    run_part = command.split("&&", 1)[1].strip()  # the install already happened
    assert run_part == "ember demo"
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    out = result.stdout
    assert "origin | READY vcpus=2 mem_mib=256" in out
    assert "restored | CPUS 2 alive 2" in out
    assert "origin < fill 7 64" in out  # the commands sent are shown too
    assert "each clone holds its own pattern and not its neighbour's" in out
    assert "full snapshot" in out.split("timings", 1)[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mem-mib", "32"], "--mem-mib must be at least 128"),
        (["--clones", "-1"], "--clones must be 0 or more"),
        (["--vcpus", "0"], "--vcpus must be 1-32"),
    ],
)
def test_demo_refuses_arguments_it_cannot_run_with(
    flags: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "demo", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"ember: error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


@pytest.mark.kvm
def test_run_with_piped_commands_answers_and_resets() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "--vcpus", "2"],
        input="cpus\nreset\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "READY vcpus=2 mem_mib=128" in result.stdout
    assert "CPUS 2 alive 2" in result.stdout


@pytest.mark.kvm
def test_four_vcpus_and_512_mib_seen_from_inside() -> None:
    guest = EmberProcess(["run", "--vcpus", "4", "--mem-mib", "512"])
    try:
        guest.log.expect(r"^READY vcpus=4 mem_mib=512$")
        assert guest.ask("cpus") == "CPUS 4 alive 4"
        assert guest.ask("tick on") == "OK"
        guest.log.expect(r"^TICK \d+$")
        guest.log.expect(r"^TICK \d+$")
        assert guest.ask("tick off") == "OK"
        assert guest.ask("fpu set 42") == "OK"
        assert guest.ask("fpu check 42") == "OK"
        assert guest.ask("fpu check 43") == "BAD"
        assert guest.ask("no such command").startswith("ERR")
        guest.send("reset")
        assert guest.wait(timeout=10) == 0
    finally:
        guest.close()
    ticks = guest.log.ticks()
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)


@pytest.mark.kvm
@pytest.mark.slow
def test_fill_and_check_span_both_memory_regions() -> None:
    # 4 GiB: RAM below the 3 GiB gap and 1 GiB above 4 GiB; fill from 16 MiB for
    # 3200 MiB reaches past 3 GiB, so it ends in the high region.
    guest = EmberProcess(["run", "--vcpus", "2", "--mem-mib", "4096"])
    try:
        guest.log.expect(r"^READY vcpus=2 mem_mib=4096$")
        assert guest.ask("fill 11 3200", timeout=300) == "OK"
        assert guest.ask("check 11 3200", timeout=300) == "OK"
        assert guest.ask("check 12 3200", timeout=300) == "BAD 0x1000000"
        guest.send("reset")
        assert guest.wait(timeout=10) == 0
    finally:
        guest.close()


@pytest.mark.kvm
def test_reset_ends_run_with_status_zero() -> None:
    guest = EmberProcess(["run"])
    try:
        guest.log.expect(r"^READY ")
        guest.send("reset")
        assert guest.wait(timeout=5) == 0
    finally:
        guest.close()


@pytest.mark.kvm
def test_ctrl_c_stops_the_vm() -> None:
    guest = EmberProcess(["run"])
    try:
        guest.log.expect(r"^READY ")
        guest.process.send_signal(signal.SIGINT)
        assert guest.wait(timeout=10) == 130
        assert "Traceback" not in guest.stderr
    finally:
        guest.close()


def _bad_kernels(tmp_path: Path, guest_elf: str) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    elf = Path(guest_elf).read_bytes()
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(elf[:100])
    random_bytes = tmp_path / "random"
    random_bytes.write_bytes(os.urandom(64 * 1024))
    # A bzImage whose setup header has the boot flag but a corrupted "HdrS" magic.
    broken = bytearray(os.urandom(8192))
    broken[0x1FE:0x200] = b"\x55\xaa"
    broken[0x202:0x206] = b"HdrX"
    bzimage = tmp_path / "broken.bzImage"
    bzimage.write_bytes(bytes(broken))
    return {
        "empty": empty,
        "truncated": truncated,
        "random": random_bytes,
        "bzimage": bzimage,
        "missing": tmp_path / "does-not-exist",
    }


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "bzimage", "missing"])
def test_bad_kernel_gives_one_line_error(
    tmp_path: Path, guest_elf: str, kind: str
) -> None:
    kernel = _bad_kernels(tmp_path, guest_elf)[kind]
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "--kernel", str(kernel)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ember: error: ")
    assert str(kernel) in lines[0]
    assert "Traceback" not in result.stderr


TRIPLE_FAULT_GUEST = """
.section .note.pvh, "a"
.align 4
.long 4, 4, 18
.asciz "Xen"
.long _start
.text
.code32
.globl _start
_start:
    lidt empty_idt
    ud2
.data
empty_idt: .word 0
           .long 0
"""


@pytest.mark.kvm
def test_triple_fault_stops_with_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / "fault.S"
    source.write_text(TRIPLE_FAULT_GUEST)
    script = tmp_path / "fault.ld"
    script.write_text(
        "ENTRY(_start)\nPHDRS { text PT_LOAD; note PT_NOTE; }\n"
        "SECTIONS { . = 0x100000; .text : { *(.text) } :text "
        ".data : { *(.data) } :text .note.pvh : { *(.note.pvh) } :text :note }\n"
    )
    elf = tmp_path / "fault.elf"
    subprocess.run(
        [
            "gcc",
            "-nostdlib",
            "-static",
            "-no-pie",
            f"-Wl,-T,{script}",
            "-o",
            str(elf),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "--kernel", str(elf)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ember: vCPU 0: ")
    assert "triple" in lines[0] or "error" in lines[0]


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 32])
def test_one_to_thirty_two_vcpus(vcpus: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "--vcpus", str(vcpus)],
        input="cpus\nreset\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"READY vcpus={vcpus} mem_mib=128" in result.stdout
    assert f"CPUS {vcpus} alive {vcpus}" in result.stdout


@pytest.mark.parametrize("vcpus", ["0", "33"])
def test_vcpu_count_out_of_range_is_one_line(vcpus: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", "--vcpus", vcpus],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("ember: error: vcpu_count must be 1..32")
    assert len(result.stderr.strip().splitlines()) == 1


def test_monitor_flags_with_a_subcommand_are_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "--api-sock", "/tmp/x.sock", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "cannot be combined with `run`" in result.stderr

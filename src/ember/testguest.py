"""Building Ember's test guest (the C and assembly program in `guest/`).

The guest is compiled with the host's gcc on first use and cached: the file name
carries a hash of every source file and of the compiler's version, so a changed
source or compiler gives a new file and an unchanged one is never rebuilt. The
build writes a temporary file and renames it into place, so concurrent builders
never see half an ELF.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

__all__ = ["GuestBuildError", "build_guest", "guest_path", "guest_source_dir"]

# The files that make up the guest; their order is the link order.
_SOURCES = ("entry.S", "kernel.c", "user.c", "acpi.c", "lib.c")
_LINKER_SCRIPT = "linker.ld"
_SOURCE_SUFFIXES = (".c", ".h", ".S", ".ld")

# Freestanding, no vector registers in compiled code (interrupts do not save
# FPU state and `fpu set`/`fpu check` keep values live in ymm0-15), no red zone
# (interrupts in ring 0 use the same stack), fixed addresses (linked at 1 MiB).
_CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
)
_LDFLAGS = (
    "-no-pie",
    "-nostdlib",
    "-static",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,--no-warn-rwx-segments",
)


class GuestBuildError(RuntimeError):
    """The test guest could not be compiled; the message carries gcc's output."""


def guest_source_dir() -> Path:
    """The directory holding the guest's sources.

    A wheel packages them as `ember/_guest_src`; a checkout (or an editable
    install) has them at `<repo>/guest`.
    """
    module_dir = Path(__file__).resolve().parent
    candidates = (module_dir / "_guest_src", module_dir.parents[1] / "guest")
    for candidate in candidates:
        if (candidate / _LINKER_SCRIPT).is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise GuestBuildError(f"test guest sources not found (looked in {searched})")


def _cache_dir() -> Path:
    configured = os.environ.get("EMBER_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "ember"


def _gcc_version() -> str:
    try:
        result = subprocess.run(
            ["gcc", "--version"], capture_output=True, text=True, check=False
        )
    except OSError as error:
        raise GuestBuildError(f"cannot run gcc: {error}") from error
    if result.returncode != 0:
        raise GuestBuildError(f"gcc --version failed: {result.stderr.strip()}")
    return result.stdout.splitlines()[0] if result.stdout else ""


def _source_hash(source_dir: Path, gcc_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(gcc_version.encode())
    digest.update(repr((_CFLAGS, _LDFLAGS)).encode())
    files = sorted(
        p for p in source_dir.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES
    )
    for path in files:
        data = path.read_bytes()
        digest.update(f"\0{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:20]


def build_guest(force: bool = False, *, source_dir: Path | None = None) -> Path:
    """Compile the test guest if needed; returns the path of the cached ELF.

    `force` rebuilds even when a cached copy exists. `source_dir` overrides where
    the sources are read from (tests use it).
    """
    sources = source_dir if source_dir is not None else guest_source_dir()
    gcc_version = _gcc_version()
    cache = _cache_dir()
    target = cache / f"ember-guest-{_source_hash(sources, gcc_version)}.elf"
    if target.is_file() and not force:
        return target

    cache.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=".guest-", suffix=".elf", dir=cache)
    os.close(fd)
    temp = Path(temp_name)
    command = [
        "gcc",
        *_CFLAGS,
        *_LDFLAGS,
        "-I",
        str(sources),
        "-T",
        str(sources / _LINKER_SCRIPT),
        "-o",
        str(temp),
        *(str(sources / name) for name in _SOURCES),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise GuestBuildError(
                f"building the test guest failed (gcc exit {result.returncode}):\n"
                f"{result.stderr.strip()}"
            )
        temp.chmod(0o644)
        temp.replace(target)
    except OSError as error:
        raise GuestBuildError(f"building the test guest failed: {error}") from error
    finally:
        temp.unlink(missing_ok=True)
    return target


def guest_path() -> Path:
    """The test guest's ELF, built on first use."""
    return build_guest()

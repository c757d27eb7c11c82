"""Debian's cloud kernel, fetched and unpacked into an uncompressed ELF vmlinux.

Ember's Linux boot test wants a real, unmodified distribution kernel, loaded as
an ELF `vmlinux` through its PVH entry. Debian ships only the compressed
bzImage (`/boot/vmlinuz-*`), so getting there takes four unwrapping steps:

1. `apt-get download` the `linux-image-cloud-amd64` metapackage. It contains
   nothing but a `Depends:` on the current versioned image package, such as
   `linux-image-6.1.0-57-cloud-amd64`; that package is downloaded next.
2. A .deb is an `ar` archive (`debian-binary`, `control.tar.*`, `data.tar.*`).
   The ar container is parsed here; the data tarball is read with `tarfile`
   (xz, gzip, bzip2) or, for zstd, which Python's `tarfile` cannot read before
   3.14, through `dpkg-deb --fsys-tarfile`.
3. In the bzImage, the setup header's `payload_offset` (0x248) and
   `payload_length` (0x24c) locate the compressed kernel, counted from the start
   of the protected-mode code, which follows the boot sector and `setup_sects`
   sectors of real-mode setup code.
4. The payload is decompressed by its magic. The kernel's build appends the
   uncompressed size as four little-endian bytes to every payload (gzip's own
   trailer happens to be the same thing), which checks the result; it must also
   be an x86-64 ELF64. Debian builds its kernels with LZ4 (legacy frame format),
   which the standard library lacks: the `lz4` command decompresses it, as the
   `zstd` command does for zstd kernels.

The result is cached as `<cache>/vmlinux-<kernel release>`, written to a
temporary file and renamed into place, so the cache never holds half a kernel.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

METAPACKAGE = "linux-image-cloud-amd64"
CACHE_ENV = "EMBER_CACHE_DIR"

# A versioned image package: the signed one ships a signed vmlinuz, the
# `-unsigned` one the same kernel unsigned. Either carries /boot/vmlinuz-*.
_IMAGE_PACKAGE = re.compile(r"linux-image-(\d[\w.+~-]*-cloud-amd64)(-unsigned)?")
_VMLINUZ = re.compile(r"(?:\./)?boot/vmlinuz-(.+)")
_APT_TIMEOUT_S = 600
_TOOL_TIMEOUT_S = 300


class LinuxKernelError(Exception):
    """Fetching or unpacking Debian's cloud kernel failed; subclasses name the step."""


class AptDownloadError(LinuxKernelError):
    """`apt-get download` (after an `apt-get update`) could not fetch a package."""


class KernelDependencyError(LinuxKernelError):
    """The metapackage names no versioned `linux-image-*-cloud-amd64` package."""


class DebArchiveError(LinuxKernelError):
    """A .deb is not a well-formed ar archive with the expected members."""


class KernelNotInPackageError(LinuxKernelError):
    """No image package candidate holds a `/boot/vmlinuz-*` file."""


class BzImageFormatError(LinuxKernelError):
    """The bzImage's setup header is missing, too old, or points outside the file."""


class PayloadDecompressError(LinuxKernelError):
    """The compressed kernel inside the bzImage could not be decompressed."""


class NotElfError(LinuxKernelError):
    """The decompressed kernel is not an x86-64 ELF64 image."""


class CacheWriteError(LinuxKernelError):
    """The vmlinux could not be written into the cache directory."""


# --- ar archives -----------------------------------------------------------

AR_MAGIC = b"!<arch>\n"
# name[16] mtime[12] uid[6] gid[6] mode[8] size[10] and the two bytes "`\n".
AR_HEADER_SIZE = 60
AR_SIZE_FIELD = slice(48, 58)
AR_END_MAGIC = b"`\n"


@dataclass(frozen=True)
class ArMember:
    name: str
    data: bytes


def read_ar(archive: bytes) -> list[ArMember]:
    """The members of a System V / GNU `ar` archive, in order.

    Names are stripped of padding and of GNU's trailing '/'. A .deb never uses
    the long-name table, so its `//` and `/` special members are not resolved.
    """
    if not archive.startswith(AR_MAGIC):
        raise DebArchiveError("not an ar archive: no '!<arch>' magic")
    members = []
    offset = len(AR_MAGIC)
    while offset < len(archive):
        header = archive[offset : offset + AR_HEADER_SIZE]
        if len(header) < AR_HEADER_SIZE or header[58:60] != AR_END_MAGIC:
            raise DebArchiveError(f"ar member header at {offset:#x} is truncated")
        try:
            size = int(header[AR_SIZE_FIELD].decode("ascii").strip())
        except ValueError:
            raise DebArchiveError(
                f"ar member header at {offset:#x} has a bad size field "
                f"{header[AR_SIZE_FIELD]!r}"
            ) from None
        start = offset + AR_HEADER_SIZE
        if start + size > len(archive):
            raise DebArchiveError(
                f"ar member at {offset:#x} claims {size} bytes, past the archive end"
            )
        name = header[:16].decode("ascii", "replace").rstrip(" ")
        if name not in ("/", "//"):
            name = name.rstrip("/")
        members.append(ArMember(name, archive[start : start + size]))
        # Each member's data is padded to an even offset.
        offset = start + size + (size & 1)
    return members


def _deb_member(members: Sequence[ArMember], stem: str, deb: Path) -> ArMember:
    for member in members:
        if member.name == stem or member.name.startswith(stem + "."):
            return member
    names = ", ".join(m.name for m in members)
    raise DebArchiveError(f"{deb.name}: no {stem}.* member (has {names})")


@contextlib.contextmanager
def _deb_tar(deb: Path, stem: str) -> Iterator[tarfile.TarFile]:
    """`control.tar.*` or `data.tar.*` of `deb`, opened for streaming."""
    member = _deb_member(read_ar(deb.read_bytes()), stem, deb)
    if member.name.endswith(".zst"):
        option = "--ctrl-tarfile" if stem == "control.tar" else "--fsys-tarfile"
        raw = _run_tool(["dpkg-deb", option, str(deb)], b"", DebArchiveError)
        stream: io.BytesIO = io.BytesIO(raw)
    else:
        stream = io.BytesIO(member.data)
    try:
        # "r|*" detects gzip, bzip2 and xz (and no compression) by itself.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar
    except tarfile.TarError as error:
        raise DebArchiveError(f"{deb.name}: {member.name}: {error}") from error


def deb_control(deb: Path) -> str:
    """The text of the package's `control` file."""
    with _deb_tar(deb, "control.tar") as tar:
        for info in tar:
            if info.name in ("control", "./control") and info.isfile():
                return _read_member(tar, info).decode("utf-8", "replace")
    raise DebArchiveError(f"{deb.name}: control.tar has no control file")


def deb_vmlinuz(deb: Path) -> tuple[str, bytes] | None:
    """(kernel release, bzImage bytes) of the package's /boot/vmlinuz-*, if any."""
    with _deb_tar(deb, "data.tar") as tar:
        for info in tar:
            match = _VMLINUZ.fullmatch(info.name)
            if match and info.isfile():
                return match.group(1), _read_member(tar, info)
    return None


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    if handle is None:
        raise DebArchiveError(f"tar member {info.name} cannot be read")
    with handle:
        return handle.read()


def image_packages(control: str) -> list[str]:
    """Versioned image packages named in a control file's `Depends:`, in order.

    Alternatives (`a | b`) count too; each signed name is followed by its
    `-unsigned` twin, a fallback should the signed one lack a vmlinuz.
    """
    depends = ""
    for line in control.splitlines():
        if line.lower().startswith("depends:"):
            depends = line.split(":", 1)[1]
            break
    found: list[str] = []
    for clause in depends.split(","):
        for alternative in clause.split("|"):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            match = _IMAGE_PACKAGE.fullmatch(name)
            if not match:
                continue
            candidates = [name]
            if match.group(2) is None:
                candidates.append(name + "-unsigned")
            found.extend(c for c in candidates if c not in found)
    return found


def kernel_release(package: str) -> str:
    """`6.1.0-57-cloud-amd64` for `linux-image-6.1.0-57-cloud-amd64[-unsigned]`."""
    match = _IMAGE_PACKAGE.fullmatch(package)
    if match is None:
        raise KernelDependencyError(f"{package} is not a versioned cloud image")
    return match.group(1)


# --- bzImage payload ------------------------------------------------------

HEADER_MAGIC_OFFSET = 0x202  # "HdrS"
VERSION_OFFSET = 0x206  # u16 boot protocol version
SETUP_SECTS_OFFSET = 0x1F1  # u8; 0 means 4
PAYLOAD_OFFSET_OFFSET = 0x248  # u32, from the start of the protected-mode code
PAYLOAD_LENGTH_OFFSET = 0x24C  # u32
# payload_offset and payload_length appeared in boot protocol 2.08.
MIN_PAYLOAD_VERSION = 0x208
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4


def bzimage_payload(image: bytes) -> bytes:
    """The compressed kernel (the build's appended size included) in a bzImage."""
    if len(image) < PAYLOAD_LENGTH_OFFSET + 4:
        raise BzImageFormatError(f"{len(image)} bytes is too short for a bzImage")
    if image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] != b"HdrS":
        raise BzImageFormatError("no 'HdrS' setup header magic at 0x202")
    version = _u32(image, VERSION_OFFSET) & 0xFFFF
    if version < MIN_PAYLOAD_VERSION:
        raise BzImageFormatError(
            f"boot protocol {version >> 8}.{version & 0xFF:02d} predates 2.08: "
            "the header does not locate the payload"
        )
    setup_sects = image[SETUP_SECTS_OFFSET] or DEFAULT_SETUP_SECTS
    start = (setup_sects + 1) * SECTOR_SIZE + _u32(image, PAYLOAD_OFFSET_OFFSET)
    length = _u32(image, PAYLOAD_LENGTH_OFFSET)
    if length < 4 or start + length > len(image):
        raise BzImageFormatError(
            f"payload [{start:#x}, +{length:#x}) lies outside the "
            f"{len(image):#x}-byte image"
        )
    return image[start : start + length]


def vmlinux_from_bzimage(image: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage, checked."""
    payload = bzimage_payload(image)
    vmlinux = decompress_payload(payload)
    expected = _u32(payload, len(payload) - 4)
    if len(vmlinux) & 0xFFFFFFFF != expected:
        raise PayloadDecompressError(
            f"decompressed {len(vmlinux)} bytes, but the payload's trailer says "
            f"{expected}"
        )
    check_elf64(vmlinux)
    return vmlinux


def decompress_payload(payload: bytes) -> bytes:
    """Decompress a kernel payload by its magic number."""
    for magic, name, decompress in _DECOMPRESSORS:
        if payload.startswith(magic):
            try:
                return decompress(payload)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
                raise PayloadDecompressError(f"{name} payload: {e}") from e
    if payload.startswith(b"\x89LZO"):
        raise PayloadDecompressError("LZO-compressed kernels are not supported")
    raise PayloadDecompressError(
        f"unknown compression: payload starts {payload[:6].hex(' ')}"
    )


def _gunzip(payload: bytes) -> bytes:
    # wbits 16 + MAX_WBITS: a gzip wrapper, and its CRC and size are checked.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(payload)
    if not inflater.eof:
        raise EOFError("gzip stream ends before its end marker")
    return out


def _lzma_stream(format: int) -> Callable[[bytes], bytes]:
    def decompress(payload: bytes) -> bytes:
        # One stream; the unused data behind it is the build's size trailer.
        decompressor = lzma.LZMADecompressor(format=format)
        out = decompressor.decompress(payload)
        if not decompressor.eof:
            raise EOFError("stream ends before its end marker")
        return out

    return decompress


def _bunzip2(payload: bytes) -> bytes:
    decompressor = bz2.BZ2Decompressor()
    out = decompressor.decompress(payload)
    if not decompressor.eof:
        raise EOFError("bzip2 stream ends before its end marker")
    return out


LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def lz4_legacy_stream(payload: bytes) -> bytes:
    """The LZ4 legacy frame at the start of `payload`, without what follows it.

    The legacy format is the magic, then blocks each led by a u32 compressed
    size, with no end marker: the stream ends where the data does. The kernel
    build appends its size trailer right behind it, which the `lz4` command
    would take as a broken block, so the blocks are walked to find the end.
    """
    offset = len(LZ4_LEGACY_MAGIC)
    while offset + 4 <= len(payload):
        block = _u32(payload, offset)
        if block == 0 or offset + 4 + block > len(payload):
            break
        offset += 4 + block
    return payload[:offset]


def _unlz4(payload: bytes) -> bytes:
    stream = lz4_legacy_stream(payload)
    return _run_tool(["lz4", "-d", "-c"], stream, PayloadDecompressError)


def _unzstd(payload: bytes) -> bytes:
    # The zstd frame is everything but the four-byte size trailer.
    return _run_tool(["zstd", "-d", "-c", "-q"], payload[:-4], PayloadDecompressError)


_DECOMPRESSORS: list[tuple[bytes, str, Callable[[bytes], bytes]]] = [
    (b"\x1f\x8b", "gzip", _gunzip),
    (b"\xfd7zXZ\x00", "xz", _lzma_stream(lzma.FORMAT_XZ)),
    (b"\x5d\x00\x00", "lzma", _lzma_stream(lzma.FORMAT_ALONE)),
    (b"BZh", "bzip2", _bunzip2),
    (LZ4_LEGACY_MAGIC, "lz4", _unlz4),
    (b"\x28\xb5\x2f\xfd", "zstd", _unzstd),
]

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62


def check_elf64(image: bytes) -> None:
    if len(image) < 64 or not image.startswith(ELF_MAGIC):
        raise NotElfError("the decompressed kernel has no ELF magic")
    machine = int.from_bytes(image[18:20], "little")
    if image[4] != ELFCLASS64 or image[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise NotElfError(
            f"the decompressed kernel is ELF class {image[4]}, data {image[5]}, "
            f"machine {machine}; expected a little-endian x86-64 ELF64"
        )


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _run_tool(argv: list[str], stdin: bytes, error: type[LinuxKernelError]) -> bytes:
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, timeout=_TOOL_TIMEOUT_S
        )
    except FileNotFoundError:
        raise error(f"`{argv[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise error(f"`{' '.join(argv)}` ran past {_TOOL_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise error(
            f"`{' '.join(argv)}` failed with status {done.returncode}: "
            f"{_last_line(done.stderr)}"
        )
    return done.stdout


def _last_line(output: bytes) -> str:
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "(no message)"


# --- apt and the cache ----------------------------------------------------


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "ember"


def apt_download(package: str, dest: Path) -> Path:
    """Download `package`'s .deb into `dest`; refresh the lists once if needed."""
    if shutil.which("apt-get") is None:
        raise AptDownloadError("apt-get is not installed")
    first = _apt_get(["download", package], dest)
    if first.returncode != 0:
        # The lists may be missing or stale (an old version gone from the
        # mirror): refresh them and try once more.
        update = _apt_get(["update"], dest)
        if update.returncode != 0:
            raise AptDownloadError(
                f"apt-get download {package} failed "
                f"({_last_line(first.stderr)}), and so did apt-get update: "
                f"{_last_line(update.stderr)}"
            )
        second = _apt_get(["download", package], dest)
        if second.returncode != 0:
            raise AptDownloadError(
                f"apt-get download {package} failed: {_last_line(second.stderr)}"
            )
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise AptDownloadError(f"apt-get download {package} left no .deb in {dest}")
    return debs[-1]


def _apt_get(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    argv = ["apt-get", "-q"]
    if os.geteuid() == 0:
        # apt drops to the `_apt` user to download, which cannot write to a
        # private temporary directory; as root, download as root instead.
        argv += ["-o", "APT::Sandbox::User=root"]
    try:
        return subprocess.run(
            argv + args, cwd=cwd, capture_output=True, timeout=_APT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise AptDownloadError(
            f"apt-get {' '.join(args)} ran past {_APT_TIMEOUT_S} s"
        ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                # mkstemp makes the file private; a kernel is no secret.
                os.fchmod(out.fileno(), 0o644)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
    except OSError as error:
        raise CacheWriteError(f"cannot write {path}: {error}") from error


def fetch_debian_cloud_vmlinux(cache_dir: Path | None = None) -> Path:
    """Path to Debian's current cloud kernel as an ELF vmlinux, fetched if needed.

    The metapackage is always downloaded (it is tiny) to learn the current
    version; the image package only when that version is not cached yet.
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=".debs-"))
    except OSError as error:
        raise CacheWriteError(f"cannot use cache directory {cache}: {error}") from error
    try:
        meta = apt_download(METAPACKAGE, work)
        candidates = image_packages(deb_control(meta))
        if not candidates:
            raise KernelDependencyError(
                f"{meta.name} depends on no linux-image-*-cloud-amd64 package"
            )
        cached = cache / f"vmlinux-{kernel_release(candidates[0])}"
        if cached.is_file():
            return cached
        return _fetch_image(candidates, work, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch_image(candidates: Sequence[str], work: Path, target: Path) -> Path:
    for package in candidates:
        vmlinuz = deb_vmlinuz(apt_download(package, work))
        if vmlinuz is None:
            continue
        _write_atomically(target, vmlinux_from_bzimage(vmlinuz[1]))
        return target
    raise KernelNotInPackageError(
        f"none of {', '.join(candidates)} ships a /boot/vmlinuz-*"
    )


def main() -> int:
    try:
        print(fetch_debian_cloud_vmlinux())
    except LinuxKernelError as error:
        print(f"ember.linux_kernel: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

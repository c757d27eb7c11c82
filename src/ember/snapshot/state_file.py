"""The state file: a versioned, CRC-checked container for `MicrovmState`.

Layout (all integers little-endian):

    magic            8 bytes   0x0710198486640000 on x86-64
    version length   8 bytes   then the format version as UTF-8 semver, "1.0.0"
    payload length   8 bytes   then the payload: MicrovmState as MessagePack
    CRC-64/Jones     8 bytes   over every byte before it

Loading checks, in order and each with its own error: size cap, header present,
magic, version (same major, minor not newer), payload length against the file
size, CRC, and finally that the payload decodes. Writing goes to a temporary file
in the target's directory, is fsync'ed, renamed over the target and the directory
fsync'ed: the target path only ever holds a complete old or a complete new file.
"""

from __future__ import annotations

import os
import struct

import anycrc
import msgspec

from ember.snapshot.atomic import AtomicFile
from ember.snapshot.state import MicrovmState

MAGIC_X86_64 = 0x0710198486640000
FORMAT_VERSION = (1, 0, 0)
MAX_STATE_FILE_BYTES = 10 * 1024 * 1024
_U64 = struct.Struct("<Q")
_crc64_jones = anycrc.Model("CRC64-REDIS")  # CRC-64/Jones, as Firecracker uses


class StateFileError(Exception):
    """A state file could not be read or written."""


class StateFileTooLargeError(StateFileError):
    pass


class StateFileTooShortError(StateFileError):
    pass


class BadMagicError(StateFileError):
    pass


class IncompatibleVersionError(StateFileError):
    pass


class StateFileTruncatedError(StateFileError):
    pass


class CrcMismatchError(StateFileError):
    pass


class UndecodableStateError(StateFileError):
    pass


def crc64(data: bytes | memoryview) -> int:
    return int(_crc64_jones.calc(data))


def version_text(version: tuple[int, int, int] = FORMAT_VERSION) -> str:
    return ".".join(str(part) for part in version)


def encode_state(
    state: MicrovmState, version: tuple[int, int, int] = FORMAT_VERSION
) -> bytes:
    payload = msgspec.msgpack.encode(state)
    version_bytes = version_text(version).encode()
    body = b"".join(
        (
            _U64.pack(MAGIC_X86_64),
            _U64.pack(len(version_bytes)),
            version_bytes,
            _U64.pack(len(payload)),
            payload,
        )
    )
    return body + _U64.pack(crc64(body))


def _parse_version(text: bytes, path: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(part) for part in text.decode("ascii").split("."))
    except (UnicodeDecodeError, ValueError):
        raise IncompatibleVersionError(
            f"state file {path}: format version {text[:32]!r} is not MAJOR.MINOR.PATCH"
        ) from None
    return major, minor, patch


def decode_state(data: bytes, path: str = "<memory>") -> MicrovmState:
    return decode_versioned_state(data, path)[1]


def decode_versioned_state(
    data: bytes, path: str = "<memory>"
) -> tuple[tuple[int, int, int], MicrovmState]:
    """The file's format version and its state, after every check."""
    if len(data) > MAX_STATE_FILE_BYTES:
        raise StateFileTooLargeError(
            f"state file {path} is larger than the {MAX_STATE_FILE_BYTES}-byte cap"
        )
    if len(data) < 32:
        raise StateFileTooShortError(
            f"state file {path} is too short ({len(data)} bytes) to be a snapshot"
        )
    (magic,) = _U64.unpack_from(data, 0)
    if magic != MAGIC_X86_64:
        raise BadMagicError(
            f"state file {path}: magic {magic:#018x} is not an x86-64 Ember snapshot"
        )
    (version_length,) = _U64.unpack_from(data, 8)
    if version_length > 64 or 16 + version_length + 16 > len(data):
        raise StateFileTruncatedError(f"state file {path}: header is truncated")
    version = _parse_version(data[16 : 16 + version_length], path)
    _check_compatible(version, path)
    payload_start = 16 + version_length + 8
    (payload_length,) = _U64.unpack_from(data, payload_start - 8)
    expected_size = payload_start + payload_length + 8
    if expected_size != len(data):
        raise StateFileTruncatedError(
            f"state file {path}: header promises {expected_size} bytes, file has "
            f"{len(data)} (truncated or trailing data)"
        )
    (stored_crc,) = _U64.unpack_from(data, len(data) - 8)
    actual_crc = crc64(memoryview(data)[: len(data) - 8])
    if stored_crc != actual_crc:
        raise CrcMismatchError(
            f"state file {path}: CRC-64 mismatch (stored {stored_crc:#018x}, "
            f"computed {actual_crc:#018x}); the file is corrupt"
        )
    payload = data[payload_start : payload_start + payload_length]
    try:
        return version, msgspec.msgpack.decode(payload, type=MicrovmState)
    except msgspec.DecodeError as error:
        raise UndecodableStateError(
            f"state file {path}: payload does not decode: {error}"
        ) from None


def _check_compatible(version: tuple[int, int, int], path: str) -> None:
    ours = FORMAT_VERSION
    if version[0] != ours[0] or version[1] > ours[1]:
        raise IncompatibleVersionError(
            f"state file {path} has format version {version_text(version)}; this "
            f"Ember reads {ours[0]}.x up to {version_text(ours)}"
        )


def load_state_file(path: str | os.PathLike[str]) -> MicrovmState:
    return load_versioned_state_file(path)[1]


def load_versioned_state_file(
    path: str | os.PathLike[str],
) -> tuple[tuple[int, int, int], MicrovmState]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read(MAX_STATE_FILE_BYTES + 1)
    except OSError as error:
        raise StateFileError(
            f"cannot read state file {name}: {error.strerror}"
        ) from None
    return decode_versioned_state(data, name)


def write_state_file(path: str | os.PathLike[str], state: MicrovmState) -> int:
    """Write atomically; returns the number of bytes written."""
    data = encode_state(state)
    with AtomicFile(path) as file:
        file.write_all(data)
        file.commit()
    return len(data)

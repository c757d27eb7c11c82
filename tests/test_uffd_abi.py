"""userfaultfd's structures and ioctl numbers, the handshake, and the memory file
view the handler keeps; no KVM needed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.uffd_handler import abi
from ember.uffd_handler.memory_file import ReadOnlyMemoryFile
from ember.uffd_handler.protocol import (
    HandshakeError,
    RegionMapping,
    decode_handshake,
    encode_handshake,
)

# ctypes class, C struct, frozen size, {field: (C member, frozen offset)}
LAYOUTS: list[tuple[type, str, int, dict[str, tuple[str, int]]]] = [
    (
        abi.UffdioApi,
        "uffdio_api",
        24,
        {"features": ("features", 8), "ioctls": ("ioctls", 16)},
    ),
    (abi.UffdioRange, "uffdio_range", 16, {"len": ("len", 8)}),
    (
        abi.UffdioRegister,
        "uffdio_register",
        32,
        {"mode": ("mode", 16), "ioctls": ("ioctls", 24)},
    ),
    (
        abi.UffdioCopy,
        "uffdio_copy",
        40,
        {
            "src": ("src", 8),
            "len": ("len", 16),
            "mode": ("mode", 24),
            "copy": ("copy", 32),
        },
    ),
    (
        abi.UffdioZeropage,
        "uffdio_zeropage",
        32,
        {"mode": ("mode", 16), "zeropage": ("zeropage", 24)},
    ),
]

IOCTLS = [
    "USERFAULTFD_IOC_NEW",
    "UFFDIO_API",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE",
]
CONSTANTS = [
    "UFFD_API",
    "UFFD_USER_MODE_ONLY",
    "UFFD_FEATURE_EVENT_REMOVE",
    "UFFD_FEATURE_MISSING_HUGETLBFS",
    "UFFDIO_REGISTER_MODE_MISSING",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_EVENT_REMOVE",
    "UFFD_PAGEFAULT_FLAG_WRITE",
]
# struct uffd_msg members we decode, with their frozen offsets.
MSG_MEMBERS = {
    "event": 0,
    "arg.pagefault.flags": 8,
    "arg.pagefault.address": 16,
    "arg.remove.start": 8,
    "arg.remove.end": 16,
}


@pytest.mark.parametrize(
    ("cls", "cname", "size", "fields"), LAYOUTS, ids=[c[1] for c in LAYOUTS]
)
def test_frozen_layout(
    cls: type, cname: str, size: int, fields: dict[str, tuple[str, int]]
) -> None:
    assert ctypes.sizeof(cls) == size
    for field, (_, offset) in fields.items():
        assert getattr(cls, field).offset == offset, field


def test_ioctl_numbers_frozen() -> None:
    # The numbers follow from the sizes above; frozen here so a struct edit that
    # changes one shows up even where gcc is missing.
    assert abi.UFFDIO_API == 0xC018AA3F
    assert abi.UFFDIO_REGISTER == 0xC020AA00
    assert abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert abi.UFFDIO_WAKE == 0x8010AA02
    assert abi.UFFDIO_COPY == 0xC028AA03
    assert abi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert abi.USERFAULTFD_IOC_NEW == 0xAA00


def _probe_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/userfaultfd.h>",
        "int main(void) {",
        'printf("size uffd_msg %zu\\n", sizeof(struct uffd_msg));',
    ]
    for _, cname, _, fields in LAYOUTS:
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for field, (member, _) in fields.items():
            lines.append(
                f'printf("offset {cname} {field} %zu\\n", '
                f"offsetof(struct {cname}, {member}));"
            )
    for path in MSG_MEMBERS:
        lines.append(f'printf("msg {path} %zu\\n", offsetof(struct uffd_msg, {path}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.mark.skipif(
    shutil.which("gcc") is None
    or not Path("/usr/include/linux/userfaultfd.h").exists(),
    reason="needs gcc and the kernel's uapi headers",
)
def test_abi_matches_c_header(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(_probe_source())
    binary = tmp_path / "probe"
    subprocess.run(
        ["gcc", "-o", str(binary), str(source)], check=True, capture_output=True
    )
    output = subprocess.run(
        [str(binary)], check=True, capture_output=True, text=True
    ).stdout
    classes = {cname: cls for cls, cname, *_ in LAYOUTS}
    checked = 0
    for line in output.splitlines():
        kind, *rest = line.split()
        if kind == "size" and rest[0] == "uffd_msg":
            assert int(rest[1]) == abi.UFFD_MSG_SIZE
        elif kind == "size":
            assert ctypes.sizeof(classes[rest[0]]) == int(rest[1]), rest[0]
        elif kind == "offset":
            cname, field, value = rest
            assert getattr(classes[cname], field).offset == int(value), (cname, field)
        elif kind == "msg":
            assert MSG_MEMBERS[rest[0]] == int(rest[1]), rest[0]
        elif kind == "value":
            assert getattr(abi, rest[0]) == int(rest[1]), rest[0]
        checked += 1
    assert checked == 1 + sum(1 + len(f) for *_, f in LAYOUTS) + len(MSG_MEMBERS) + len(
        IOCTLS
    ) + len(CONSTANTS)


def test_decode_messages() -> None:
    fault = bytes([abi.UFFD_EVENT_PAGEFAULT]) + bytes(7)
    fault += (1).to_bytes(8, "little") + (0x7F0000001234).to_bytes(8, "little")
    fault += bytes(8)
    remove = bytes([abi.UFFD_EVENT_REMOVE]) + bytes(7)
    remove += (0x1000).to_bytes(8, "little") + (0x3000).to_bytes(8, "little")
    remove += bytes(8)
    messages = abi.decode_messages(fault + remove)
    assert messages == [
        abi.UffdMessage(abi.UFFD_EVENT_PAGEFAULT, 1, 0x7F0000001234),
        abi.UffdMessage(abi.UFFD_EVENT_REMOVE, 0x1000, 0x3000),
    ]


# --- the handshake -------------------------------------------------------------


def test_handshake_is_firecrackers_compact_json() -> None:
    regions = [
        RegionMapping(140234717589504, 128 << 20, 0, 4096),
        RegionMapping(140234717589504 + (1 << 30), 1 << 21, 128 << 20, 4096),
    ]
    body = encode_handshake(regions)
    assert body == (
        b'[{"base_host_virt_addr":140234717589504,"size":134217728,"offset":0,'
        b'"page_size":4096,"page_size_kib":4096},'
        b'{"base_host_virt_addr":140235791331328,"size":2097152,'
        b'"offset":134217728,"page_size":4096,"page_size_kib":4096}]'
    )
    assert decode_handshake(body) == regions


def test_handshake_accepts_only_the_old_field_name() -> None:
    body = json.dumps(
        [
            {
                "base_host_virt_addr": 1 << 21,
                "size": 1 << 21,
                "offset": 0,
                "page_size_kib": 2097152,
                "extra": True,
            }
        ]
    ).encode()
    assert decode_handshake(body) == [RegionMapping(1 << 21, 1 << 21, 0, 1 << 21)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "non-empty"),
        (b"{}", "non-empty"),
        (b"[1]", "not a JSON object"),
        (b'[{"size":4096,"offset":0,"page_size":4096}]', "base_host_virt_addr"),
        (
            b'[{"base_host_virt_addr":4096,"size":4096,"offset":-1,"page_size":4096}]',
            "offset",
        ),
        (
            b'[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]',
            "page_size",
        ),
        (
            b'[{"base_host_virt_addr":4096,"size":100,"offset":0,"page_size":4096}]',
            "multiple",
        ),
        (
            b'[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]',
            "aligned",
        ),
        (
            b'[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},'
            b'{"base_host_virt_addr":65536,"size":4096,"offset":4096,"page_size":4096}]',
            "overlap",
        ),
    ],
)
def test_bad_handshakes_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        decode_handshake(body)


# --- the memory file as the handler sees it -------------------------------------


def _sparse_file(path: Path, size: int, data: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, chunk in data:
            file.seek(offset)
            file.write(chunk)


def test_memory_file_knows_its_holes(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    _sparse_file(path, 1 << 20, [(64 << 10, b"x" * (8 << 10)), (512 << 10, b"y")])
    memory = ReadOnlyMemoryFile(str(path))
    try:
        if memory.data_bytes >= 1 << 20:
            pytest.skip("this filesystem does not keep holes")
        assert memory.is_hole(0, 4096)
        assert not memory.is_hole(64 << 10, 4096)
        assert memory.is_data(64 << 10, 8 << 10)
        assert not memory.is_data(60 << 10, 8 << 10)
        assert not memory.is_hole(60 << 10, 8 << 10)
        assert not memory.is_hole(512 << 10, 4096)
        assert memory.is_hole((512 << 10) + 4096, 4096)
        ranges = memory.data_ranges(0, 1 << 20, 4096)
        assert ranges[0] == (64 << 10, 72 << 10)
        assert (512 << 10, (512 << 10) + 4096) in ranges
        assert memory.data_ranges(64 << 10, 4096, 4096) == [(0, 4096)]
        # The mapping reads the file's bytes (the source of every copy).
        assert ctypes.string_at(memory.address + (64 << 10), 2) == b"xx"
    finally:
        memory.close()


def test_memory_file_is_opened_read_only(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    _sparse_file(path, 1 << 16, [(0, b"z")])
    path.chmod(0o444)
    memory = ReadOnlyMemoryFile(str(path))
    try:
        descriptors = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # listdir's own fd
                descriptors.append(os.readlink(f"/proc/self/fd/{fd}"))
        # Opened only to map it, then closed; the mapping itself is read-only.
        assert str(path) not in descriptors
        maps = Path("/proc/self/maps").read_text().splitlines()
        line = next(line for line in maps if line.endswith(str(path)))
        assert line.split()[1].startswith("r--")
    finally:
        memory.close()

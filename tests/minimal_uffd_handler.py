"""A bare page-fault handler written only from the handshake's description.

Deliberately shares no code with Ember (it imports nothing from `ember`): it is the
stand-in for someone else's handler. Usage:

    python minimal_uffd_handler.py SOCKET MEM_FILE

It accepts one connection, reads the one message (a JSON array of regions, the
userfaultfd attached as SCM_RIGHTS), copies the file's bytes into each faulting page,
and exits when the monitor closes the connection. Prints `ready` once listening and
`served <n>` at the end.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import sys


def ioc(direction: int, kind: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | number


READ, WRITE = 2, 1
# struct uffdio_copy: u64 dst, src, len, mode; s64 copy (the kernel's answer)
COPY_FORMAT = "QQQQq"
UFFDIO_COPY = ioc(READ | WRITE, 0xAA, 0x03, struct.calcsize(COPY_FORMAT))
EVENT_PAGEFAULT = 0x12
MESSAGE_SIZE = 32
PAGE = 4096


def main(socket_path: str, mem_path: str) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
    regions = json.loads(data)
    uffd = fds[0]

    with open(mem_path, "rb") as file:
        contents = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE)
    source = ctypes.addressof(ctypes.c_char.from_buffer(contents))

    served = 0
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    poller.register(conn, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == conn.fileno():
                if not conn.recv(1):
                    print(f"served {served}", flush=True)
                    return 0
                continue
            try:
                message = os.read(uffd, MESSAGE_SIZE)
            except BlockingIOError:
                continue
            event = message[0]
            if event != EVENT_PAGEFAULT:
                continue
            address = struct.unpack_from("<Q", message, 16)[0]
            served += copy_page(uffd, regions, source, address)


def copy_page(
    uffd: int, regions: list[dict[str, int]], source: int, address: int
) -> int:
    for region in regions:
        base = region["base_host_virt_addr"]
        if base <= address < base + region["size"]:
            break
    else:
        raise SystemExit(f"fault at {address:#x} outside every region")
    page = address & ~(PAGE - 1)
    src = source + region["offset"] + (page - base)
    request = bytearray(struct.pack(COPY_FORMAT, page, src, PAGE, 0, 0))
    while True:
        try:
            fcntl.ioctl(uffd, UFFDIO_COPY, request)
            return 1
        except OSError as error:
            if error.errno == errno.EEXIST:
                return 0
            if error.errno != errno.EAGAIN:
                raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

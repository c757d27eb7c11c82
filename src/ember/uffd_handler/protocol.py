"""The handshake between a monitor and its page-fault handler.

Once, right after connecting to the handler's Unix stream socket, the monitor sends
one message: a compact JSON array with one object per guest memory region, in region
order, and the userfaultfd as the message's only SCM_RIGHTS descriptor. Each object
says where the region lives in the monitor's address space (the addresses faults
report), how long it is, where its bytes start in the memory file, and its page size
in bytes (`page_size_kib` repeats that value in bytes too: the name is a historical
slip kept for compatibility). Nothing else is ever sent on the connection; the
monitor keeps it open for the life of the microVM, so the handler sees EOF when the
microVM is gone, and the monitor sees EOF when the handler is.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

MAX_HANDSHAKE_BYTES = 64 * 1024
PAGE_SIZES = (4096, 2 * 1024 * 1024)


class HandshakeError(ValueError):
    """A handshake message is not what the protocol describes."""


@dataclass(frozen=True)
class RegionMapping:
    """One guest memory region as the handler sees it."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    def contains(self, address: int) -> bool:
        return self.base_host_virt_addr <= address < self.end

    def to_json(self) -> dict[str, int]:
        return {
            "base_host_virt_addr": self.base_host_virt_addr,
            "size": self.size,
            "offset": self.offset,
            "page_size": self.page_size,
            "page_size_kib": self.page_size,
        }


def encode_handshake(regions: list[RegionMapping]) -> bytes:
    return json.dumps(
        [region.to_json() for region in regions], separators=(",", ":")
    ).encode()


def decode_handshake(data: bytes) -> list[RegionMapping]:
    """Parse and check a handshake body; raises `HandshakeError`."""
    try:
        items = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HandshakeError(f"handshake is not JSON: {error}") from None
    if not isinstance(items, list) or not items:
        raise HandshakeError("handshake must be a non-empty JSON array of regions")
    regions = [_region(index, item) for index, item in enumerate(items)]
    for before, after in itertools.pairwise(regions):
        if after.offset < before.offset + before.size:
            raise HandshakeError("region offsets overlap or are out of order")
    return regions


def _region(index: int, item: object) -> RegionMapping:
    if not isinstance(item, dict):
        raise HandshakeError(f"region {index} is not a JSON object")
    values = {}
    for key in ("base_host_virt_addr", "size", "offset"):
        value = item.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HandshakeError(
                f"region {index}: {key} must be a non-negative integer"
            )
        values[key] = value
    # Old handlers knew only page_size_kib; both carry bytes.
    page_size = item.get("page_size", item.get("page_size_kib"))
    if page_size not in PAGE_SIZES:
        raise HandshakeError(
            f"region {index}: page_size {page_size!r} is not 4096 or 2097152"
        )
    assert isinstance(page_size, int)
    region = RegionMapping(page_size=page_size, **values)
    if region.size == 0 or region.size % page_size:
        raise HandshakeError(f"region {index}: size is not a multiple of page_size")
    if region.base_host_virt_addr % page_size:
        raise HandshakeError(f"region {index}: base address is not page-aligned")
    return region

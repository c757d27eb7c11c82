"""The virtio-mmio transport and split virtqueues, driven by a driver written
here in Python over plain guest memory (no KVM), plus hypothesis fuzzing of
everything a guest controls."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.mmio_bus import MmioBus
from ember.devices.virtio.block import Block
from ember.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    MmioSlot,
    MmioTransport,
    Reg,
)
from ember.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    need_event,
)
from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.vmm.config import DriveConfig

MEM_SIZE = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
DATA = 0x10000


class Driver:
    """Just enough of a virtio driver to set a device up and feed one queue."""

    def __init__(self, memory: GuestMemory, transport: MmioTransport) -> None:
        self.memory = memory
        self.transport = transport
        self.size = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return int.from_bytes(self.transport.read(offset, 4), "little")
        self.transport.write(offset, value.to_bytes(4, "little"))
        return value

    def set_up(
        self,
        features: int = 1 << VIRTIO_F_VERSION_1,
        size: int = 16,
        rings: tuple[int, int, int] = (DESC, AVAIL, USED),
    ) -> int:
        self.reg(Reg.STATUS, 0)
        self.reg(Reg.STATUS, STATUS_ACKNOWLEDGE)
        self.reg(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for select in (0, 1):
            self.reg(Reg.DRIVER_FEATURES_SEL, select)
            self.reg(Reg.DRIVER_FEATURES, (features >> (32 * select)) & 0xFFFFFFFF)
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        self.reg(Reg.STATUS, status)
        if not self.reg(Reg.STATUS) & STATUS_FEATURES_OK:
            return self.reg(Reg.STATUS)
        self.reg(Reg.QUEUE_SEL, 0)
        self.size = size
        self.reg(Reg.QUEUE_NUM, size)
        for low, address in zip(
            (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW),
            rings,
            strict=True,
        ):
            self.reg(low, address & 0xFFFFFFFF)
            self.reg(low + 4, address >> 32)
        self.reg(Reg.QUEUE_READY, 1)
        self.reg(Reg.STATUS, status | STATUS_DRIVER_OK)
        return self.reg(Reg.STATUS)

    def put_descriptor(
        self, index: int, address: int, length: int, flags: int, next_index: int
    ) -> None:
        raw = struct.pack("<QIHH", address, length, flags, next_index)
        self.memory.write(GuestAddress(DESC + 16 * index), raw)

    def chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Lay `buffers` (address, length, device-writable) out as a chain."""
        head = self.next_desc
        for position, (address, length, writable) in enumerate(buffers):
            index = (head + position) % self.size
            last = position == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (
                VIRTQ_DESC_F_WRITE if writable else 0
            )
            self.put_descriptor(index, address, length, flags, (index + 1) % self.size)
        self.next_desc = (head + len(buffers)) % self.size
        return head

    def offer(self, head: int) -> None:
        slot = AVAIL + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write(GuestAddress(slot), head.to_bytes(2, "little"))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(GuestAddress(AVAIL + 2), self.avail_idx.to_bytes(2, "little"))

    def notify(self, queue: int = 0) -> None:
        self.reg(Reg.QUEUE_NOTIFY, queue)

    def used(self) -> list[tuple[int, int]]:
        """Used entries that appeared since the last call."""
        idx = self.memory.read_u16(GuestAddress(USED + 2))
        entries = []
        while self.used_seen != idx:
            slot = USED + 4 + 8 * (self.used_seen % self.size)
            entries.append(
                struct.unpack("<II", self.memory.read(GuestAddress(slot), 8))
            )
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries


class Interrupts:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def block_request(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def memory() -> GuestMemory:
    with GuestMemory.anonymous([(0, MEM_SIZE)]) as memory:
        yield memory


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * 64)  # 64 sectors
    return path


def make_block(
    memory: GuestMemory, disk: Path, **drive: object
) -> tuple[Block, MmioTransport, Interrupts]:
    block = Block(DriveConfig("d0", str(disk), **drive))  # type: ignore[arg-type]
    interrupts = Interrupts()
    return block, MmioTransport(block, memory, interrupts), interrupts


# --- transport --------------------------------------------------------------------


def test_identification_registers(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    assert driver.reg(Reg.MAGIC) == 0x74726976
    assert driver.reg(Reg.VERSION) == 2
    assert driver.reg(Reg.DEVICE_ID) == 2
    driver.reg(Reg.DEVICE_FEATURES_SEL, 1)
    assert driver.reg(Reg.DEVICE_FEATURES) & 1  # VIRTIO_F_VERSION_1 is bit 32
    assert driver.reg(Reg.QUEUE_NUM_MAX) == 256
    driver.reg(Reg.QUEUE_SEL, 1)
    assert driver.reg(Reg.QUEUE_NUM_MAX) == 0  # no second queue


def test_capacity_in_config_space(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    assert transport.read(0x100, 8) == (64).to_bytes(8, "little")
    assert transport.read(0x104, 4) == bytes(4)
    assert transport.read(0x100, 1) == b"\x40"


def test_legacy_driver_refused(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    status = Driver(memory, transport).set_up(features=0)
    assert not status & STATUS_FEATURES_OK


def test_unoffered_features_refused(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    status = Driver(memory, transport).set_up(features=1 << 32 | 1 << 40)
    assert not status & STATUS_FEATURES_OK


def test_queue_outside_memory_needs_reset(memory: GuestMemory, disk: Path) -> None:
    _, transport, interrupts = make_block(memory, disk)
    status = Driver(memory, transport).set_up(rings=(DESC, AVAIL, MEM_SIZE - 8))
    assert status & STATUS_DEVICE_NEEDS_RESET
    assert interrupts.count == 1  # a configuration-change interrupt
    assert transport.read(Reg.INTERRUPT_STATUS, 4) == (2).to_bytes(4, "little")


def test_reset_clears_everything(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    driver.reg(Reg.STATUS, 0)
    assert driver.reg(Reg.STATUS) == 0
    assert not transport.activated
    assert transport.queues[0].size == 256


def test_odd_sized_register_access_is_ignored(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    assert transport.read(Reg.MAGIC, 2) == b"\0\0"
    transport.write(Reg.STATUS, b"\x01")
    assert transport.status == 0


def test_mmio_bus_dispatch(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    bus = MmioBus()
    bus.register(0xC000_0000, 0x1000, transport)
    assert bus.read(0xC000_0000, 4) == (0x74726976).to_bytes(4, "little")
    assert bus.read(0xC000_1000, 4) == b"\xff" * 4
    assert bus.read(0xC000_0FFE, 4) == b"\xff" * 4  # straddles the window's end
    bus.write(0xBFFF_FFFC, b"\0" * 4)
    assert bus.unhandled_accesses == 2 + 1
    with pytest.raises(ValueError):
        bus.register(0xC000_0800, 0x1000, transport)
    bus.unregister(0xC000_0000)
    assert bus.read(0xC000_0000, 4) == b"\xff" * 4


def test_slot_cmdline_entry() -> None:
    slot = MmioSlot(base=0xC000_1000, size=0x1000, irq=6)
    assert slot.cmdline_entry() == "virtio_mmio.device=4K@0xc0001000:6"


def test_need_event_wraps() -> None:
    assert need_event(5, 6, 5)
    assert not need_event(7, 6, 5)
    assert need_event(0xFFFF, 1, 0xFFFE)
    assert not need_event(3, 3, 3)


def test_event_idx_suppresses_interrupts(memory: GuestMemory, disk: Path) -> None:
    _, transport, interrupts = make_block(memory, disk)
    driver = Driver(memory, transport)
    features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    assert driver.set_up(features=features) & STATUS_DRIVER_OK
    used_event = GuestAddress(AVAIL + 4 + 2 * driver.size)
    memory.write(used_event, (5).to_bytes(2, "little"))  # "interrupt after #6"
    for _ in range(8):
        head = driver.chain([(DATA, 16, False), (DATA + 512, 1, True)])
        memory.write(GuestAddress(DATA), block_request(4, 0))
        driver.offer(head)
        driver.notify()
    assert len(driver.used()) == 8
    assert interrupts.count == 1
    avail_event = memory.read_u16(GuestAddress(USED + 4 + 8 * driver.size))
    assert avail_event == 8  # the device asks to hear about the next chain


def test_no_interrupt_flag_without_event_idx(memory: GuestMemory, disk: Path) -> None:
    _, transport, interrupts = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    memory.write(GuestAddress(AVAIL), (1).to_bytes(2, "little"))
    head = driver.chain([(DATA, 16, False), (DATA + 512, 1, True)])
    memory.write(GuestAddress(DATA), block_request(4, 0))
    driver.offer(head)
    driver.notify()
    assert driver.used() == [(head, 1)]
    assert interrupts.count == 0


def test_indirect_chain(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up(features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC)
    table = DATA + 0x2000
    entries = [
        (DATA, 16, VIRTQ_DESC_F_NEXT, 1),
        (DATA + 0x1000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        (DATA + 0x1200, 1, VIRTQ_DESC_F_WRITE, 0),
    ]
    for index, entry in enumerate(entries):
        memory.write(GuestAddress(table + 16 * index), struct.pack("<QIHH", *entry))
    driver.put_descriptor(0, table, 48, VIRTQ_DESC_F_INDIRECT, 0)
    memory.write(GuestAddress(DATA), block_request(0, 1))
    driver.offer(0)
    driver.notify()
    assert driver.used() == [(0, 513)]
    assert memory.read(GuestAddress(DATA + 0x1000), 512) == bytes(range(256)) * 2
    assert memory.read(GuestAddress(DATA + 0x1200), 1) == b"\0"


def test_indirect_refused_unless_negotiated(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    driver.put_descriptor(0, DATA, 48, VIRTQ_DESC_F_INDIRECT, 0)
    driver.offer(0)
    driver.notify()
    assert transport.broken


def test_loop_breaks_the_device_not_the_monitor(
    memory: GuestMemory, disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, transport, interrupts = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    driver.put_descriptor(0, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
    driver.put_descriptor(1, DATA, 16, VIRTQ_DESC_F_NEXT, 0)
    driver.offer(0)
    with caplog.at_level(logging.WARNING):
        driver.notify()
    assert transport.broken
    assert "needs a reset" in caplog.text
    assert "longer than the queue" in caplog.text
    assert interrupts.count == 1
    assert driver.used() == []
    # The driver's way out: reset and set up again.
    driver.avail_idx = driver.used_seen = driver.next_desc = 0
    memory.write(GuestAddress(AVAIL), bytes(4))
    memory.write(GuestAddress(USED), bytes(4))
    assert driver.set_up() & STATUS_DRIVER_OK
    head = driver.chain([(DATA, 16, False), (DATA + 512, 1, True)])
    memory.write(GuestAddress(DATA), block_request(4, 0))
    driver.offer(head)
    driver.notify()
    assert driver.used() == [(head, 1)]


def test_avail_index_running_ahead_breaks_the_device(
    memory: GuestMemory, disk: Path
) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    memory.write(GuestAddress(AVAIL + 2), (17).to_bytes(2, "little"))
    driver.notify()
    assert transport.broken


def test_save_and_restore_transport(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up(features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX)
    head = driver.chain([(DATA, 16, False), (DATA + 512, 1, True)])
    memory.write(GuestAddress(DATA), block_request(4, 0))
    driver.offer(head)
    driver.notify()
    state = transport.save()

    _, again, _ = make_block(memory, disk)
    again.restore(state)
    assert again.save() == state
    assert again.queues[0].event_idx
    head = driver.chain([(DATA, 16, False), (DATA + 512, 1, True)])
    driver.used()
    driver.offer(head)
    again.kick()
    assert driver.used() == [(head, 1)]


def test_restore_refuses_another_device_shape(memory: GuestMemory, disk: Path) -> None:
    from ember.devices.virtio.mmio import VirtioRestoreError

    _, transport, _ = make_block(memory, disk)
    Driver(memory, transport).set_up()
    state = transport.save()
    _, other, _ = make_block(memory, disk)
    with pytest.raises(VirtioRestoreError):
        other.restore(msgspec.structs.replace(state, device_type=1))


def test_queue_check_rejects_bad_sizes(memory: GuestMemory) -> None:
    from ember.devices.virtio.queue import QueueConfigError

    queue = Queue(256)
    queue.desc_table, queue.avail_ring, queue.used_ring = (
        GuestAddress(DESC),
        GuestAddress(AVAIL),
        GuestAddress(USED),
    )
    for size in (0, 3, 512):
        queue.size = size
        with pytest.raises(QueueConfigError):
            queue.check(memory)
    queue.size = 16
    queue.desc_table = GuestAddress(DESC + 8)
    with pytest.raises(QueueConfigError):
        queue.check(memory)


# --- fuzzing -----------------------------------------------------------------------

addresses = st.one_of(
    st.integers(0, MEM_SIZE - 1),
    st.integers(MEM_SIZE - 64, MEM_SIZE + 64),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1))
descriptors = st.tuples(
    addresses, lengths, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    table=st.lists(descriptors, min_size=1, max_size=16),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20),
    avail_idx=st.integers(0, 0xFFFF),
    features=st.sampled_from(
        [
            1 << VIRTIO_F_VERSION_1,
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC,
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX,
        ]
    ),
    header=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
)
def test_fuzzed_queue_never_escapes(
    disk: Path,
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    features: int,
    header: tuple[int, int],
) -> None:
    """Random descriptor tables, heads, indices and request headers: the device
    answers, returns a chain unanswered, or needs a reset — and a second
    device on the same memory keeps working."""
    with GuestMemory.anonymous([(0, MEM_SIZE)]) as memory:
        _, transport, _ = make_block(memory, disk)
        driver = Driver(memory, transport)
        assert driver.set_up(features=features) & STATUS_DRIVER_OK
        for index, entry in enumerate(table):
            driver.put_descriptor(index, *entry)
        # Some descriptors point at a request header; make it a plausible one.
        memory.write(GuestAddress(0), struct.pack("<IIQ", header[0] % 10, 0, header[1]))
        for position, head in enumerate(heads):
            slot = AVAIL + 4 + 2 * (position % driver.size)
            memory.write(GuestAddress(slot), head.to_bytes(2, "little"))
        memory.write(GuestAddress(AVAIL + 2), avail_idx.to_bytes(2, "little"))
        driver.notify()
        if not transport.broken:
            for head, length in driver.used():
                assert head < driver.size
                assert length <= 2**32

        second_disk = disk.with_name("second.img")
        second_disk.write_bytes(bytes(512 * 4))
        other_memory_offset = 0x80000
        _, other, _ = make_block(memory, second_disk)
        other_driver = Driver(memory, other)
        rings = tuple(a + other_memory_offset for a in (DESC, AVAIL, USED))
        assert other_driver.set_up(rings=rings) & STATUS_DRIVER_OK  # type: ignore[arg-type]
        base = other_memory_offset + DATA
        memory.write(GuestAddress(base), block_request(4, 0))
        raw = struct.pack("<QIHH", base, 16, VIRTQ_DESC_F_NEXT, 1) + struct.pack(
            "<QIHH", base + 512, 1, VIRTQ_DESC_F_WRITE, 0
        )
        memory.write(GuestAddress(rings[0]), raw)
        memory.write(GuestAddress(rings[1] + 4), (0).to_bytes(2, "little"))
        memory.write(GuestAddress(rings[1] + 2), (1).to_bytes(2, "little"))
        other_driver.notify()
        assert memory.read(GuestAddress(rings[2] + 2), 2) == (1).to_bytes(2, "little")
        assert memory.read(GuestAddress(base + 512), 1) == b"\0"


@settings(max_examples=300, deadline=None)
@given(
    accesses=st.lists(
        st.tuples(
            st.integers(0, 0x1FF),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, 2**64 - 1),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_fuzzed_registers_never_escape(
    accesses: list[tuple[int, int, int, bool]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    disk = tmp_path_factory.mktemp("fuzz") / "disk.img"
    disk.write_bytes(bytes(4096))
    with GuestMemory.anonymous([(0, MEM_SIZE)]) as memory:
        _, transport, _ = make_block(memory, disk)
        for offset, size, value, is_write in accesses:
            if is_write:
                transport.write(
                    offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                )
            else:
                assert len(transport.read(offset, size)) == size

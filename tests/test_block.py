"""virtio-block: requests served from a Python driver (no KVM), then the test
guest's own driver writing, reading and surviving snapshots (KVM)."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from ember.console import ConsoleLog
from ember.devices.virtio.block import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO
from ember.devices.virtio.mmio import STATUS_DRIVER_OK, Reg
from ember.memory import GuestMemory
from ember.memory.address import GuestAddress
from ember.vmm.config import BootSource, ConfigError, DriveConfig, MachineConfig
from ember.vmm.microvm import Console, Microvm
from guest_io import EmberProcess, InProcessGuest
from test_virtio import DATA, Driver, block_request, make_block

SECTOR = 512
MASK = (1 << 64) - 1


def mix64(z: int) -> int:
    """The guest's pattern function (splitmix64's finaliser)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def pattern(seed: int, sector: int, count: int) -> bytes:
    """What `blk write <sector> <count> <seed>` puts on the disk."""
    start = sector * SECTOR
    words = (mix64(seed ^ (start + 8 * i)) for i in range(count * SECTOR // 8))
    return struct.pack(f"<{count * SECTOR // 8}Q", *words)


def blk_sum(data: bytes) -> str:
    """What `blk read` answers: FNV-1a 64 over little-endian 8-byte words."""
    h = 0xCBF29CE484222325
    for (word,) in struct.iter_unpack("<Q", data):
        h = ((h ^ word) * 0x100000001B3) & MASK
    return f"SUM {h:#x}"


@pytest.fixture
def memory() -> GuestMemory:
    with GuestMemory.anonymous([(0, 1 << 20)]) as memory:
        yield memory


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * 64)  # 64 sectors
    return path


def request(
    driver: Driver, kind: int, sector: int, data: list[tuple[int, int, bool]]
) -> tuple[int, int]:
    """Submit one request (header at DATA, status after the data); returns the
    used length and the status byte."""
    driver.memory.write(GuestAddress(DATA), block_request(kind, sector))
    status = DATA + 0x8000
    driver.memory.write(GuestAddress(status), b"\xee")
    head = driver.chain([(DATA, 16, False), *data, (status, 1, True)])
    driver.offer(head)
    driver.notify()
    [(used_head, length)] = driver.used()
    assert used_head == head
    return length, driver.memory.read(GuestAddress(status), 1)[0]


# --- requests (no KVM) ------------------------------------------------------------


def test_read_and_write(memory: GuestMemory, disk: Path) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    assert driver.set_up() & STATUS_DRIVER_OK
    buffer = DATA + 0x1000
    assert request(driver, 0, 2, [(buffer, 1024, True)]) == (1025, 0)
    assert memory.read(GuestAddress(buffer), 1024) == bytes(range(256)) * 4

    memory.write(GuestAddress(buffer), b"\xab" * 512)
    memory.write(GuestAddress(buffer + 0x800), b"\xcd" * 512)
    split = [(buffer, 512, False), (buffer + 0x800, 512, False)]
    assert request(driver, 1, 63, split[:1]) == (1, 0)
    assert request(driver, 1, 10, split) == (1, 0)
    data = disk.read_bytes()
    assert data[63 * SECTOR :] == b"\xab" * 512
    assert data[10 * SECTOR : 12 * SECTOR] == b"\xab" * 512 + b"\xcd" * 512


def test_header_and_data_may_share_a_descriptor(
    memory: GuestMemory, disk: Path
) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    memory.write(GuestAddress(DATA), block_request(1, 0) + b"\x11" * 512)
    head = driver.chain([(DATA, 16 + 512, False), (DATA + 0x1000, 1, True)])
    driver.offer(head)
    driver.notify()
    assert driver.used() == [(head, 1)]
    assert disk.read_bytes()[:512] == b"\x11" * 512


@pytest.mark.parametrize(
    ("kind", "sector", "length", "status"),
    [
        (0, 64, 512, 1),  # past the end
        (0, 63, 1024, 1),  # runs off the end
        (0, 2**60, 512, 1),  # absurd sector
        (0, 0, 100, 1),  # not whole sectors
        (7, 0, 512, 2),  # unknown type
    ],
)
def test_bad_requests_get_an_error_status(
    memory: GuestMemory, disk: Path, kind: int, sector: int, length: int, status: int
) -> None:
    block, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    assert request(driver, kind, sector, [(DATA + 0x1000, length, True)])[1] == status
    assert block.metrics.invalid_reqs_count == 1
    assert not transport.broken


def test_data_outside_memory_gets_an_error_status(
    memory: GuestMemory, disk: Path
) -> None:
    _, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    assert request(driver, 0, 0, [(0xFFFF_0000, 512, True)]) == (1, 1)
    assert request(driver, 0, 0, [(DATA, 2**32 - 512, True)]) == (1, 1)


def test_chain_without_status_byte_is_returned_unanswered(
    memory: GuestMemory, disk: Path
) -> None:
    block, transport, _ = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    memory.write(GuestAddress(DATA), block_request(0, 0))
    head = driver.chain([(DATA, 16, False), (DATA + 0x1000, 512, False)])
    driver.offer(head)
    driver.notify()
    assert driver.used() == [(head, 0)]
    assert block.metrics.invalid_reqs_count == 1


def test_read_only_disk(memory: GuestMemory, disk: Path) -> None:
    block, transport, _ = make_block(memory, disk, is_read_only=True)
    assert block.features() & (1 << VIRTIO_BLK_F_RO)
    driver = Driver(memory, transport)
    driver.set_up(features=1 << 32 | 1 << VIRTIO_BLK_F_RO)
    before = disk.read_bytes()
    assert request(driver, 1, 0, [(DATA + 0x1000, 512, False)]) == (1, 1)
    assert disk.read_bytes() == before
    assert request(driver, 0, 0, [(DATA + 0x1000, 512, True)]) == (513, 0)


def test_flush_and_get_id(memory: GuestMemory, disk: Path) -> None:
    block, transport, _ = make_block(memory, disk, cache_type="Writeback")
    assert block.features() & (1 << VIRTIO_BLK_F_FLUSH)
    driver = Driver(memory, transport)
    driver.set_up()
    assert request(driver, 4, 0, []) == (1, 0)
    assert block.metrics.flush_count == 1
    assert request(driver, 8, 0, [(DATA + 0x1000, 20, True)]) == (21, 0)
    assert memory.read(GuestAddress(DATA + 0x1000), 20) == b"d0" + bytes(18)


def test_replace_backing_bumps_generation(
    memory: GuestMemory, disk: Path, tmp_path: Path
) -> None:
    block, transport, interrupts = make_block(memory, disk)
    driver = Driver(memory, transport)
    driver.set_up()
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(bytes(SECTOR * 128))
    with transport.lock:
        block.replace_backing(str(bigger))
    transport.config_changed()
    assert driver.reg(Reg.CONFIG_GENERATION) == 1
    assert transport.read(0x100, 8) == (128).to_bytes(8, "little")
    assert interrupts.count == 1
    assert block.drive.path_on_host == str(bigger)


def test_drive_validation() -> None:
    from ember.vmm.config import validate_drives

    for drives in (
        [DriveConfig("a-b", "/x")],
        [DriveConfig("a", "/x"), DriveConfig("a", "/y")],
        [DriveConfig("a", "/x", True), DriveConfig("b", "/y", True)],
        [DriveConfig("", "/x")],
    ):
        with pytest.raises(ConfigError):
            validate_drives(drives)
    validate_drives([DriveConfig("root_1", "/x", True), DriveConfig("b", "/y")])


def test_pattern_helper_matches_its_definition() -> None:
    data = pattern(7, 1, 1)
    assert struct.unpack_from("<Q", data, 8)[0] == mix64(7 ^ (512 + 8))


# --- the test guest (KVM) ------------------------------------------------------------


def boot_with(
    guest_elf: str, drives: list[DriveConfig], mem_mib: int = 256, **machine: object
) -> InProcessGuest:
    log = ConsoleLog()
    config = MachineConfig(vcpu_count=2, mem_size_mib=mem_mib, **machine)  # type: ignore[arg-type]
    microvm = Microvm.boot(
        config, BootSource(guest_elf), Console(write=log.feed), drives=drives
    )
    guest = InProcessGuest(microvm, log)
    log.expect(r"^READY ")
    return guest


def sparse_disk(path: Path, mib: int) -> Path:
    with path.open("wb") as file:
        file.truncate(mib << 20)
    return path


def blk_info(guest: InProcessGuest) -> str:
    guest.send("blk info")
    return guest.log.expect(r"^(BLK|ERR) .*").group(0)


@pytest.mark.kvm
def test_guest_writes_and_reads(guest_elf: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.img", 16)
    guest = boot_with(guest_elf, [DriveConfig("data_1", str(disk))])
    try:
        assert blk_info(guest) == "BLK sectors=32768 ro=0 id=data_1"
        assert guest.ask("blk write 100 300 42") == "OK"
        expected = pattern(42, 100, 300)
        assert disk.read_bytes()[100 * SECTOR : 400 * SECTOR] == expected
        assert guest.ask("blk read 100 300") == blk_sum(expected)
        assert guest.ask("blk read 32767 2") == "ERR status 1"
        assert guest.ask("blk write 0 1") == "ERR usage: " + (
            "blk info | blk write <sector> <count> <seed> | blk read <sector> <count>"
        )
        assert guest.ask("blk read 100 300") == blk_sum(expected)  # still fine
        assert guest.ask("cpus").startswith("CPUS 2 alive")
    finally:
        guest.close()


@pytest.mark.kvm
def test_guest_read_only_drive(guest_elf: str, tmp_path: Path) -> None:
    disk = tmp_path / "ro.img"
    disk.write_bytes(pattern(3, 0, 8))
    disk.chmod(0o444)
    guest = boot_with(guest_elf, [DriveConfig("ro", str(disk), is_read_only=True)])
    try:
        assert blk_info(guest) == "BLK sectors=8 ro=1 id=ro"
        assert guest.ask("blk write 0 8 1") == "ERR status 1"
        assert guest.ask("blk read 0 8") == blk_sum(pattern(3, 0, 8))
    finally:
        guest.close()


@pytest.mark.kvm
def test_guest_without_a_disk(guest_elf: str) -> None:
    guest = InProcessGuest.boot(guest_elf, vcpus=1, mem_mib=128)
    try:
        assert guest.ask("blk read 0 1") == "ERR no disk"
        assert blk_info(guest) == "ERR no disk"
    finally:
        guest.close()


@pytest.mark.kvm
def test_missing_disk_fails_the_boot_cleanly(guest_elf: str, tmp_path: Path) -> None:
    from ember.devices.virtio.block import BlockError

    with pytest.raises(BlockError, match="cannot open disk"):
        Microvm.boot(
            MachineConfig(),
            BootSource(guest_elf),
            Console(write=lambda data: None),
            drives=[DriveConfig("d0", str(tmp_path / "absent.img"))],
        )


@pytest.mark.kvm
def test_more_drives_than_interrupt_lines_fail_the_boot_cleanly(
    guest_elf: str, tmp_path: Path
) -> None:
    # GSIs 5-23 are 19 lines; VMGenID and VMClock take two of them from the same
    # allocator as the drives, so 17 drives fit and 18 do not.
    from ember.devices.virtio.attach import SlotAllocationError

    drives = [
        DriveConfig(f"d{i}", str(sparse_disk(tmp_path / f"{i}.img", 1)))
        for i in range(18)
    ]
    with pytest.raises(SlotAllocationError, match="VMGenID and VMClock"):
        Microvm.boot(
            MachineConfig(),
            BootSource(guest_elf),
            Console(write=lambda _: None),
            drives,
        )
    microvm = Microvm.boot(
        MachineConfig(),
        BootSource(guest_elf),
        Console(write=lambda _: None),
        drives[:17],
    )
    try:
        irqs = sorted(a.slot.irq for a in microvm.drives.values())
        assert irqs == list(range(5, 22))
        assert microvm.vmgenid is not None and microvm.vmclock is not None
        assert {microvm.vmgenid.gsi, microvm.vmclock.gsi} == {22, 23}
    finally:
        microvm.close()


@pytest.mark.kvm
@pytest.mark.slow
def test_write_snapshot_restore_in_a_new_process(
    guest_elf: str, tmp_path: Path, snapshot_dir: Path
) -> None:
    disk = sparse_disk(tmp_path / "disk.img", 16)
    state, mem = str(snapshot_dir / "vm.state"), str(snapshot_dir / "vm.mem")
    guest = boot_with(guest_elf, [DriveConfig("d0", str(disk))])
    try:
        assert guest.ask("blk write 8 2048 77") == "OK"
        guest.microvm.pause()
        guest.microvm.snapshot(state, mem)
    finally:
        guest.close()

    restored = EmberProcess(["run", "--snapshot", state, "--mem-file", mem])
    try:
        first = pattern(77, 8, 2048)
        assert disk.read_bytes()[8 * SECTOR : 2056 * SECTOR] == first
        assert restored.ask("blk read 8 2048") == blk_sum(first)
        assert restored.ask("blk write 4096 64 5") == "OK"
        assert restored.ask("blk read 4096 64") == blk_sum(pattern(5, 4096, 64))
        assert disk.read_bytes()[4096 * SECTOR : 4160 * SECTOR] == pattern(5, 4096, 64)
    finally:
        restored.close()


@pytest.mark.kvm
@pytest.mark.slow
def test_snapshot_while_streaming_writes(
    guest_elf: str, tmp_path: Path, snapshot_dir: Path
) -> None:
    """Pause in the middle of a 256 MiB write; the restored guest (new process)
    finishes it with every request completed and every page on disk."""
    sectors = (256 << 20) // SECTOR
    disk = sparse_disk(tmp_path / "disk.img", 256)
    state, mem = str(snapshot_dir / "vm.state"), str(snapshot_dir / "vm.mem")
    guest = boot_with(guest_elf, [DriveConfig("d0", str(disk))])
    try:
        guest.send(f"blk write 0 {sectors} 99")
        time.sleep(0.05)
        guest.microvm.pause()
        assert "OK" not in guest.log.lines[-1:], "the write finished before the pause"
        guest.microvm.snapshot(state, mem)
    finally:
        guest.close()
    with disk.open("rb") as file:
        file.seek((256 << 20) - 8)
        assert file.read(8) == bytes(8), "the snapshot was not taken mid-stream"

    restored = EmberProcess(["run", "--snapshot", state, "--mem-file", mem])
    try:
        assert restored.log.expect(r"^(OK|ERR.*)$", timeout=60).group(0) == "OK"
        check_pattern_sampled(disk, 99, sectors)
        assert restored.ask("blk read 0 2048") == blk_sum(pattern(99, 0, 2048))
    finally:
        restored.close()


def check_pattern_sampled(disk: Path, seed: int, sectors: int) -> None:
    """The first word of every 4 KiB page, plus random words, hold the pattern
    (a page left unwritten would still be zero)."""
    data = disk.read_bytes()[: sectors * SECTOR]
    offsets = list(range(0, len(data), 4096))
    offsets += random.Random(seed).sample(range(0, len(data), 8), 5000)
    for offset in offsets:
        (word,) = struct.unpack_from("<Q", data, offset)
        assert word == mix64(seed ^ offset), f"disk offset {offset:#x}"

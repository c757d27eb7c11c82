"""The DSDT: the devices a guest cannot find by probing.

Everything lives under `\\_SB_`:

- `COM1` (PNP0501) and `PS2_` (PNP0303): the 8250 UART and the i8042, with
  their ports and ISA IRQs, so an ACPI kernel binds its drivers to them.
- `V000`, `V001`, ...: one virtio-mmio device (`LNRO0005`) per
  `VirtioMmioAcpiDevice`, with its window (Memory32Fixed) and GSI
  (Interrupt), as Linux's virtio_mmio driver reads them.
- `VGEN`: the VM generation ID (`VMGENCTR`); method `ADDR` returns
  `Package {low 32 bits, high 32 bits}` of the 16-byte ID's address.
- `VCLK`: VMClock (`AMZNC10C`, compatible `VMCLOCK`); `_CRS` holds its page.
- `GED_`: a Generic Event Device (`ACPI0013`) owning the GSIs of VGEN and VCLK.
  When one fires, the kernel calls `_EVT(gsi)`, which sends Notify(0x80) to
  the matching device: that is how a guest learns of a new generation.

The test guest reads `ADDR` and VCLK's `_CRS` straight out of these bytes
(guest/README.md); keep their encoding as it is or update it there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.arch.x86_64.acpi import aml
from ember.arch.x86_64.acpi.tables import sdt

DSDT_REVISION = 2  # 64-bit integers


@dataclass(frozen=True)
class VirtioMmioAcpiDevice:
    """A virtio-mmio window as the DSDT lists it."""

    base: int
    size: int
    gsi: int


@dataclass(frozen=True)
class NotifyingDevice:
    """A device whose guest-visible state lives in guest memory at `address`
    and that tells the guest about changes through an edge on `gsi`."""

    address: int
    gsi: int


@dataclass(frozen=True)
class LegacyDevices:
    serial_port: int = 0x3F8
    serial_irq: int = 4
    i8042_port: int = 0x60
    i8042_irq: int = 1


VMCLOCK_PAGE_SIZE = 0x1000


def build_dsdt(
    virtio_devices: Sequence[VirtioMmioAcpiDevice] = (),
    *,
    vmgenid: NotifyingDevice | None = None,
    vmclock: NotifyingDevice | None = None,
    legacy: LegacyDevices | None = LegacyDevices(),
) -> bytes:
    """The DSDT for these devices, header and checksum included."""
    terms: list[bytes] = []
    if legacy is not None:
        terms += _legacy_devices(legacy)
    terms += [_virtio_device(index, dev) for index, dev in enumerate(virtio_devices)]
    if vmgenid is not None:
        terms.append(_vmgenid_device(vmgenid))
    if vmclock is not None:
        terms.append(_vmclock_device(vmclock))
    events = [(path, dev) for path, dev in (("VGEN", vmgenid), ("VCLK", vmclock))]
    wired = [(path, dev.gsi) for path, dev in events if dev is not None]
    if wired:
        terms.append(_generic_event_device(wired))
    return sdt(b"DSDT", DSDT_REVISION, aml.scope("\\_SB_", terms))


def _legacy_devices(legacy: LegacyDevices) -> list[bytes]:
    serial = aml.device(
        "COM1",
        [
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_UID", aml.integer(0)),
            aml.name(
                "_CRS",
                aml.resource_template(
                    [
                        aml.io_port(legacy.serial_port, 8),
                        aml.irq_no_flags(legacy.serial_irq),
                    ]
                ),
            ),
        ],
    )
    keyboard = aml.device(
        "PS2_",
        [
            aml.name("_HID", aml.eisa_id("PNP0303")),
            aml.name(
                "_CRS",
                aml.resource_template(
                    [
                        aml.io_port(legacy.i8042_port, 1),
                        aml.io_port(legacy.i8042_port + 4, 1),
                        aml.irq_no_flags(legacy.i8042_irq),
                    ]
                ),
            ),
        ],
    )
    return [serial, keyboard]


def _virtio_device(index: int, dev: VirtioMmioAcpiDevice) -> bytes:
    if index > 0xFFF:
        raise aml.AmlError("at most 4096 virtio-mmio devices fit V000-VFFF")
    return aml.device(
        f"V{index:03X}",
        [
            aml.name("_HID", aml.string("LNRO0005")),
            aml.name("_UID", aml.integer(index)),
            aml.name(
                "_CRS",
                aml.resource_template(
                    [aml.memory32_fixed(dev.base, dev.size), aml.interrupt([dev.gsi])]
                ),
            ),
        ],
    )


def _vmgenid_device(dev: NotifyingDevice) -> bytes:
    low, high = dev.address & 0xFFFFFFFF, dev.address >> 32
    return aml.device(
        "VGEN",
        [
            aml.name("_HID", aml.string("VMGENCTR")),
            aml.name("_CID", aml.string("VM_Gen_Counter")),
            aml.name("_DDN", aml.string("VM_Gen_Counter")),
            aml.method(
                "ADDR",
                0,
                [aml.return_(aml.package([aml.integer(low), aml.integer(high)]))],
            ),
        ],
    )


def _vmclock_device(dev: NotifyingDevice) -> bytes:
    return aml.device(
        "VCLK",
        [
            aml.name("_HID", aml.string("AMZNC10C")),
            aml.name("_CID", aml.string("VMCLOCK")),
            aml.name("_DDN", aml.string("VMCLOCK")),
            aml.name(
                "_CRS",
                aml.resource_template(
                    [aml.memory32_fixed(dev.address, VMCLOCK_PAGE_SIZE)]
                ),
            ),
        ],
    )


def _generic_event_device(wired: Sequence[tuple[str, int]]) -> bytes:
    events = [
        aml.if_(
            aml.lequal(aml.ARG0, aml.integer(gsi)),
            [aml.notify(f"\\_SB_.{path}", 0x80)],
        )
        for path, gsi in wired
    ]
    return aml.device(
        "GED_",
        [
            aml.name("_HID", aml.string("ACPI0013")),
            aml.name("_UID", aml.integer(0)),
            aml.name(
                "_CRS", aml.resource_template([aml.interrupt([g for _, g in wired])])
            ),
            aml.method("_EVT", 1, events),
        ],
    )

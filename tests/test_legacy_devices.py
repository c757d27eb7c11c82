"""The 8250 UART, the i8042 and the port bus, driven as a guest would (no KVM)."""

from __future__ import annotations

import pytest

from ember.devices.bus import PortBus
from ember.devices.legacy import serial as s
from ember.devices.legacy.i8042 import CTRL_ALT_DEL, I8042


class Recorder:
    def __init__(self) -> None:
        self.output = bytearray()
        self.interrupts = 0

    def write(self, data: bytes) -> None:
        self.output.extend(data)

    def interrupt(self) -> None:
        self.interrupts += 1


@pytest.fixture
def uart() -> tuple[s.Serial8250, Recorder]:
    recorder = Recorder()
    return s.Serial8250(recorder.write, recorder.interrupt), recorder


def test_transmit_and_line_status(uart: tuple[s.Serial8250, Recorder]) -> None:
    device, recorder = uart
    for byte in b"hi\n":
        device.write(s.DATA, byte)
    assert recorder.output == b"hi\n"
    assert device.read(s.LSR) & (s.LSR_THR_EMPTY | s.LSR_IDLE)
    assert not device.read(s.LSR) & s.LSR_DATA_READY


def test_receive_raises_an_interrupt_once_enabled(
    uart: tuple[s.Serial8250, Recorder],
) -> None:
    device, recorder = uart
    device.enqueue_input(b"ab")
    assert recorder.interrupts == 0  # receive interrupt not enabled yet
    device.write(s.IER, s.IER_RECEIVED_DATA)
    assert recorder.interrupts == 1
    assert device.read(s.IIR) & 0x0F == s.IIR_RECEIVED_DATA
    assert bytes([device.read(s.DATA), device.read(s.DATA)]) == b"ab"
    assert device.read(s.IIR) & 0x0F == s.IIR_NONE
    device.enqueue_input(b"c")
    assert recorder.interrupts == 2


def test_thr_empty_interrupt_is_acknowledged_by_reading_iir(
    uart: tuple[s.Serial8250, Recorder],
) -> None:
    device, recorder = uart
    device.write(s.IER, s.IER_THR_EMPTY)
    assert recorder.interrupts == 1
    assert device.read(s.IIR) & 0x0F == s.IIR_THR_EMPTY
    assert device.read(s.IIR) & 0x0F == s.IIR_NONE


def test_divisor_latch_and_scratch(uart: tuple[s.Serial8250, Recorder]) -> None:
    device, recorder = uart
    device.write(s.LCR, s.LCR_DLAB | 0x03)
    device.write(s.DATA, 0x01)
    device.write(s.IER, 0x00)
    assert (device.read(s.DATA), device.read(s.IER)) == (0x01, 0x00)
    device.write(s.LCR, 0x03)
    device.write(s.SCR, 0x5A)
    assert device.read(s.SCR) == 0x5A
    assert recorder.output == b""  # divisor writes are not data


def test_loopback_as_linux_probes_it(uart: tuple[s.Serial8250, Recorder]) -> None:
    device, recorder = uart
    device.write(s.MCR, s.MCR_LOOPBACK | 0x0A)  # loopback, RTS, OUT2
    assert device.read(s.MSR) & 0xF0 == 0x90  # CTS and DCD follow RTS and OUT2
    device.write(s.DATA, 0x42)
    assert recorder.output == b""
    assert device.read(s.DATA) == 0x42


def test_state_round_trip(uart: tuple[s.Serial8250, Recorder]) -> None:
    device, _ = uart
    device.write(s.IER, s.IER_RECEIVED_DATA)
    device.write(s.SCR, 7)
    device.enqueue_input(b"pending")
    state = device.save()
    other = s.Serial8250(lambda data: None, lambda: None)
    other.restore(state)
    assert other.save() == state
    assert bytes(other.read(s.DATA) for _ in range(7)) == b"pending"


def test_input_is_capped(uart: tuple[s.Serial8250, Recorder]) -> None:
    device, _ = uart
    device.enqueue_input(b"x" * (s.MAX_BUFFERED_INPUT + 10))
    assert device.dropped_input_bytes == 10


def test_output_errors_do_not_propagate() -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    device = s.Serial8250(broken, lambda: None)
    device.write(s.DATA, 0x41)
    device.write(s.DATA, 0x42)
    assert device.lost_output_bytes == 2


def test_i8042_reset_self_test_and_ctrl_alt_del() -> None:
    resets: list[bool] = []
    recorder = Recorder()
    device = I8042(lambda: resets.append(True), recorder.interrupt)
    device.write(4, 0xAA)
    assert device.read(4) & 0x01
    assert device.read(0) == 0x55
    device.write(4, 0x20)
    assert device.read(0) == 0x01
    device.send_ctrl_alt_del()
    assert recorder.interrupts == 1
    assert bytes(device.read(0) for _ in CTRL_ALT_DEL) == CTRL_ALT_DEL
    device.write(4, 0xFE)
    assert resets == [True]
    restored = I8042(lambda: None, lambda: None)
    restored.restore(device.save())
    assert restored.save() == device.save()


def test_port_bus_dispatch_and_empty_ports() -> None:
    bus = PortBus()
    recorder = Recorder()
    device = s.Serial8250(recorder.write, recorder.interrupt)
    bus.register(0x3F8, 8, device)
    bus.write(0x3F8, b"A")
    assert recorder.output == b"A"
    assert bus.read(0x3FD, 1)[0] & s.LSR_THR_EMPTY
    assert bus.read(0x2F8, 1) == b"\xff"
    assert bus.read(0xCFC, 4) == b"\xff\xff\xff\xff"
    assert bus.unhandled_accesses == 2
    with pytest.raises(ValueError, match="overlap"):
        bus.register(0x3FC, 2, device)

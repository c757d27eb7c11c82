"""The i8042 keyboard controller, as much of it as a microVM needs.

Guests use it for two things here: Linux's probe (self-test, the command byte) and
the reset line — command 0xFE pulses CPU reset, which is how a guest reboots and how
Ember learns the guest wants to stop. Ctrl-Alt-Del is injected as scancodes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import msgspec

DATA_PORT_OFFSET = 0  # port 0x60
COMMAND_PORT_OFFSET = 4  # port 0x64

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04
STATUS_LAST_WAS_COMMAND = 0x08

CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KEYBOARD = 0xAB
CMD_DISABLE_KEYBOARD = 0xAD
CMD_ENABLE_KEYBOARD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

SELF_TEST_PASSED = 0x55
COMMAND_BYTE_KEYBOARD_INTERRUPT = 0x01

# Set-2 scancodes Ctrl, Alt, Delete (make, then break).
CTRL_ALT_DEL = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])


class I8042State(msgspec.Struct, frozen=True):
    status: int
    command_byte: int
    pending_command: int
    output_buffer: bytes


class I8042:
    def __init__(
        self, on_reset: Callable[[], None], raise_interrupt: Callable[[], None]
    ) -> None:
        self._on_reset = on_reset
        self._raise_interrupt = raise_interrupt
        self._lock = threading.Lock()
        self._status = STATUS_SYSTEM_FLAG
        self._command_byte = COMMAND_BYTE_KEYBOARD_INTERRUPT
        self._pending_command = 0
        self._output: deque[int] = deque()

    def read(self, offset: int) -> int:
        with self._lock:
            if offset == COMMAND_PORT_OFFSET:
                full = STATUS_OUTPUT_FULL if self._output else 0
                return self._status | full
            if offset == DATA_PORT_OFFSET and self._output:
                return self._output.popleft()
            return 0

    def write(self, offset: int, value: int) -> None:
        if offset == COMMAND_PORT_OFFSET:
            if value == CMD_PULSE_RESET:
                self._on_reset()
                return
            with self._lock:
                self._command(value)
        elif offset == DATA_PORT_OFFSET:
            with self._lock:
                self._data(value)

    def _command(self, command: int) -> None:
        self._status |= STATUS_LAST_WAS_COMMAND
        if command == CMD_READ_COMMAND_BYTE:
            self._output.append(self._command_byte)
        elif command in (CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX):
            self._pending_command = command
        elif command == CMD_SELF_TEST:
            self._output.append(SELF_TEST_PASSED)
        elif command in (CMD_TEST_KEYBOARD, CMD_TEST_AUX):
            self._output.append(0x00)
        elif command == CMD_READ_OUTPUT_PORT:
            self._output.append(0x01)  # reset line not asserted

    def _data(self, value: int) -> None:
        self._status &= ~STATUS_LAST_WAS_COMMAND
        command, self._pending_command = self._pending_command, 0
        if command == CMD_WRITE_COMMAND_BYTE:
            self._command_byte = value
        elif command == CMD_WRITE_OUTPUT_PORT and not value & 0x01:
            self._on_reset()  # clearing bit 0 of the output port resets the CPU
        elif command == 0:
            self._output.append(0xFA)  # keyboard ACK for device commands

    def send_ctrl_alt_del(self) -> None:
        with self._lock:
            self._output.extend(CTRL_ALT_DEL)
        self._raise_interrupt()

    def save(self) -> I8042State:
        with self._lock:
            return I8042State(
                status=self._status,
                command_byte=self._command_byte,
                pending_command=self._pending_command,
                output_buffer=bytes(self._output),
            )

    def restore(self, state: I8042State) -> None:
        with self._lock:
            self._status = state.status
            self._command_byte = state.command_byte
            self._pending_command = state.pending_command
            self._output = deque(state.output_buffer)

"""An 8250/16550A UART as Linux and the test guest drive it.

Only what software can observe is modelled: the register file, the receive FIFO,
the two interrupt causes Linux enables (data received, transmitter empty) and
loopback mode, which Linux's probe uses to confirm a UART is present. Bytes are
sent out as soon as they are written; there is no baud-rate timing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import msgspec

from ember.devices.bus import RateLimitedLog

log = logging.getLogger(__name__)

DATA = 0  # RBR on read, THR on write, DLL when DLAB is set
IER = 1  # DLM when DLAB is set
IIR = 2  # FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RECEIVED_DATA = 0x01
IER_THR_EMPTY = 0x02
IIR_NONE = 0x01
IIR_THR_EMPTY = 0x02
IIR_RECEIVED_DATA = 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
LCR_DLAB = 0x80
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_IDLE = 0x40
MCR_LOOPBACK = 0x10
MSR_CONNECTED = 0xB0  # DCD, DSR and CTS asserted: a cable is plugged in

MAX_BUFFERED_INPUT = 1 << 20


class SerialState(msgspec.Struct, frozen=True):
    """Everything a restored UART needs to continue."""

    divisor_low: int
    divisor_high: int
    interrupt_enable: int
    fifo_control: int
    line_control: int
    modem_control: int
    scratch: int
    thr_interrupt_pending: bool
    input_buffer: bytes


class Serial8250:
    def __init__(
        self, output: Callable[[bytes], None], raise_interrupt: Callable[[], None]
    ) -> None:
        self._output = output
        self._raise_interrupt = raise_interrupt
        self._lock = threading.Lock()
        self._input: deque[int] = deque()
        self.dropped_input_bytes = 0
        self.lost_output_bytes = 0
        self._output_error_log = RateLimitedLog(burst=1, period=60.0)
        self._dll = 0x0C  # 9600 baud, the PC power-on default
        self._dlm = 0
        self._ier = 0
        self._fcr = 0
        self._lcr = 0x03  # 8 data bits
        self._mcr = 0x08  # OUT2
        self._scr = 0
        self._thr_pending = False

    # --- guest side (vCPU threads) --------------------------------------------

    def read(self, offset: int) -> int:
        with self._lock:
            return self._read(offset)

    def write(self, offset: int, value: int) -> None:
        raise_now = False
        with self._lock:
            raise_now = self._write(offset, value)
        if raise_now:
            self._raise_interrupt()

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._dll
            return self._input.popleft() if self._input else 0
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._interrupt_identity()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            ready = LSR_DATA_READY if self._input else 0
            return LSR_THR_EMPTY | LSR_IDLE | ready
        if offset == MSR:
            return self._modem_status()
        return self._scr

    def _interrupt_identity(self) -> int:
        fifo = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0
        if self._ier & IER_RECEIVED_DATA and self._input:
            return IIR_RECEIVED_DATA | fifo
        if self._ier & IER_THR_EMPTY and self._thr_pending:
            self._thr_pending = False  # reading IIR acknowledges THR empty
            return IIR_THR_EMPTY | fifo
        return IIR_NONE | fifo

    def _modem_status(self) -> int:
        if not self._mcr & MCR_LOOPBACK:
            return MSR_CONNECTED
        # In loopback the modem outputs feed the modem inputs:
        # DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
        mcr = self._mcr
        return (
            ((mcr & 0x01) << 5)
            | ((mcr & 0x02) << 3)
            | ((mcr & 0x04) << 4)
            | ((mcr & 0x08) << 4)
        )

    def _write(self, offset: int, value: int) -> bool:
        """Apply a register write; returns whether to raise the interrupt."""
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._dll = value
                return False
            return self._transmit(value)
        if offset == IER:
            if dlab:
                self._dlm = value
                return False
            self._ier = value & 0x0F
            if self._ier & IER_THR_EMPTY:
                self._thr_pending = True
                return True
            return bool(self._ier & IER_RECEIVED_DATA and self._input)
        if offset == IIR:
            # FCR's "clear receive FIFO" is not applied: our buffer stands for
            # bytes still on their way from the host, and dropping them would lose
            # console input typed (or piped) before the guest set up its UART.
            self._fcr = value
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & 0x1F
        elif offset == SCR:
            self._scr = value
        return False

    def _transmit(self, value: int) -> bool:
        if self._mcr & MCR_LOOPBACK:
            self._input.append(value)
        else:
            try:
                self._output(bytes((value,)))
            except OSError as error:  # a closed stdout must not kill the vCPU
                self.lost_output_bytes += 1
                if self._output_error_log.allow():
                    log.warning(
                        "serial output failed: %s (%d bytes lost so far)",
                        error,
                        self.lost_output_bytes,
                    )
        self._thr_pending = True
        return bool(self._ier & (IER_THR_EMPTY | IER_RECEIVED_DATA))

    # --- host side (event loop) ------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        with self._lock:
            room = MAX_BUFFERED_INPUT - len(self._input)
            if len(data) > room:
                self.dropped_input_bytes += len(data) - room
                data = data[:room]
            self._input.extend(data)
            raise_now = bool(self._ier & IER_RECEIVED_DATA and self._input)
        if raise_now:
            self._raise_interrupt()

    # --- snapshots ----------------------------------------------------------------

    def save(self) -> SerialState:
        with self._lock:
            return SerialState(
                divisor_low=self._dll,
                divisor_high=self._dlm,
                interrupt_enable=self._ier,
                fifo_control=self._fcr,
                line_control=self._lcr,
                modem_control=self._mcr,
                scratch=self._scr,
                thr_interrupt_pending=self._thr_pending,
                input_buffer=bytes(self._input),
            )

    def restore(self, state: SerialState) -> None:
        with self._lock:
            self._dll = state.divisor_low
            self._dlm = state.divisor_high
            self._ier = state.interrupt_enable
            self._fcr = state.fifo_control
            self._lcr = state.line_control
            self._mcr = state.modem_control
            self._scr = state.scratch
            self._thr_pending = state.thr_interrupt_pending
            self._input = deque(state.input_buffer)

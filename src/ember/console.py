"""Reading a guest's serial console line by line, from any thread.

Used by `ember demo`, the benchmarks and the tests to wait for the test guest's
protocol answers while its `TICK` lines keep arriving in between.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

ANSWER = re.compile(
    r"^(OK|BAD.*|ERR.*|CPUS .*|READY .*|SUM .*|GENID .*|EVENTS .*|PANIC.*)$"
)


class ConsoleLog:
    """Console output split into lines, each stamped with `time.perf_counter()` at
    the moment its newline arrived (benchmarks time answers by it); `expect` waits
    for one matching a pattern."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self._lines: list[tuple[float, str]] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._echo = echo
        self.cursor = 0

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        with self._cond:
            self._partial += data
            *complete, self._partial = self._partial.split(b"\n")
            lines = [line.decode(errors="replace").rstrip("\r") for line in complete]
            self._lines.extend((now, line) for line in lines)
            self._cond.notify_all()
        if self._echo is not None:
            for line in lines:
                self._echo(line)

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return [line for _, line in self._lines]

    def skip_to_end(self) -> None:
        """Ignore everything received so far."""
        with self._cond:
            self.cursor = len(self._lines)

    def expect(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0
    ) -> re.Match[str]:
        """The first line from the cursor on matching `pattern`; moves past it."""
        return self.expect_stamped(pattern, timeout)[1]

    def expect_stamped(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0
    ) -> tuple[float, re.Match[str]]:
        """Like `expect`, with the `perf_counter()` time the line arrived."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(self.cursor, len(self._lines)):
                    stamp, line = self._lines[index]
                    match = regex.search(line)
                    if match:
                        self.cursor = index + 1
                        return stamp, match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(line for _, line in self._lines[-20:])
                    raise TimeoutError(
                        f"no console line matching {regex.pattern!r} within "
                        f"{timeout} s; last lines:\n{tail}"
                    )
                self._cond.wait(remaining)

    def ticks(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("TICK ")]

"""Reading a guest's serial console line by line, from any thread.

Used by `ember demo`, the benchmarks and the tests to wait for the test guest's
protocol answers while its `TICK` lines keep arriving in between.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

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

    def text(self) -> str:
        """Everything received, including an unfinished last line."""
        with self._cond:
            lines = [line for _, line in self._lines]
            tail = self._partial.decode(errors="replace")
        return "\n".join([*lines, tail]) if tail else "\n".join(lines)

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


class ConsoleProcess:
    """`ember ARGS...` as a child process: its stdout (the guest console) and its
    stderr (Ember's messages) are each read into a `ConsoleLog` by a thread."""

    def __init__(
        self, args: Sequence[str], echo: Callable[[str], None] | None = None
    ) -> None:
        self.log = ConsoleLog(echo=echo)
        self.stderr_log = ConsoleLog()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._readers = [
            threading.Thread(target=_pump, args=(stream, log), daemon=True)
            for stream, log in (
                (self.process.stdout, self.log),
                (self.process.stderr, self.stderr_log),
            )
        ]
        for reader in self._readers:
            reader.start()

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def ask(self, command: str, timeout: float = 60.0) -> str:
        """Send one console command; its answer, skipping `TICK` lines."""
        self.send(command)
        return self.log.expect(ANSWER, timeout).group(0)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr; waits for it to exit."""
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        return self.stderr_log.text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _pump(stream: IO[bytes], log: ConsoleLog) -> None:
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        log.feed(chunk)

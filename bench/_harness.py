"""What the benchmarks share: timed console logs, child processes that are always
reaped, a small QMP client for QEMU, statistics and tables.

Every wait here has a timeout, and every child process is killed and reaped on
the way out, whatever went wrong. Nothing here asserts on a timing: benchmarks
print numbers, they do not pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ember.console import ConsoleLog

# The test guest's protocol answers (everything but TICK lines).
ANSWER = re.compile(r"^(OK|BAD.*|ERR.*|CPUS .*|READY .*|PANIC.*)$")
QEMU_BINARY = "qemu-system-x86_64"
QEMU_MISSING_NOTE = (
    f"note: {QEMU_BINARY} not found; the QEMU column stays empty "
    "(install it with `apt-get install -y qemu-system-x86`)"
)


class BenchError(Exception):
    """A benchmark step failed (not a slow one: benchmarks have no limits)."""


# --- console lines with their arrival times -----------------------------------


class TimedLog(ConsoleLog):
    """Ember's console reader, answering `(arrival time, line)` and failing with
    `BenchError`."""

    def expect(  # type: ignore[override]
        self, pattern: str | re.Pattern[str], timeout: float
    ) -> tuple[float, str]:
        try:
            stamp, match = self.expect_stamped(pattern, timeout)
        except TimeoutError as error:
            raise BenchError(str(error)) from None
        return stamp, match.string


# --- child processes ------------------------------------------------------------


class Child:
    """A child process whose stdout is the guest console, read into a TimedLog.

    `started` is `perf_counter()` taken just before the fork. stderr goes to a
    file so it can be shown when something fails, without a pipe that could
    fill up and stall the child."""

    def __init__(self, argv: Sequence[str], stderr_path: Path) -> None:
        self.argv = list(argv)
        self.log = TimedLog()
        self._stderr_path = stderr_path
        self._stderr: IO[bytes] = open(stderr_path, "wb")  # noqa: SIM115
        self.started = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except BaseException:
            self._stderr.close()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        if stdout is None:
            return
        with contextlib.suppress(OSError, ValueError):
            while chunk := stdout.read1(65536):  # type: ignore[attr-defined]
                self.log.feed(chunk)

    def send(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is None:
            raise BenchError("child has no stdin")
        try:
            stdin.write(command.encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.argv[0]} exited: {self.stderr_tail()}") from None

    def expect(
        self, pattern: str | re.Pattern[str], timeout: float
    ) -> tuple[float, str]:
        try:
            return self.log.expect(pattern, timeout)
        except BenchError as error:
            raise BenchError(f"{error}\nstderr: {self.stderr_tail()}") from None

    def ask(self, command: str, timeout: float) -> str:
        self.send(command)
        return self.expect(ANSWER, timeout)[1]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{self.argv[0]} did not exit within {timeout:g} s"
            ) from None

    def stderr_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            text = self._stderr_path.read_text(errors="replace").strip()
            return " | ".join(text.splitlines()[-lines:]) or "(empty)"
        return "(unreadable)"

    def close(self) -> None:
        """Kill (if still running) and reap; safe to call twice."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._reader.join(timeout=5)
        self._stderr.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def ember_argv(*args: str) -> list[str]:
    """`ember ...` run through this interpreter (the installed entry point does
    the same import, so the numbers hold for both)."""
    return [sys.executable, "-m", "ember.cli", *args]


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def qemu_argv(
    binary: str, guest: str, vcpus: int, mem_mib: int, *extra: str
) -> list[str]:
    """QEMU's microvm machine on the test guest, as the test guest's README runs
    it (`-arch-capabilities`: this host's KVM does not accept that MSR)."""
    return [
        binary,
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        str(vcpus),
        "-m",
        str(mem_mib),
        "-kernel",
        guest,
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        *extra,
    ]


def test_guest() -> str:
    from ember.testguest import guest_path

    return str(guest_path())


# --- QMP ------------------------------------------------------------------------


class Qmp:
    """A QMP connection: commands in, answers out, events skipped."""

    def __init__(self, path: str, timeout: float, child: Child | None = None) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as error:
                if child is not None and child.process.poll() is not None:
                    self.sock.close()
                    raise BenchError(f"QEMU exited: {child.stderr_tail()}") from None
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise BenchError(
                        f"QMP socket {path} not up in {timeout:g} s"
                    ) from error
                time.sleep(0.0005)
        self.sock.settimeout(timeout)
        self._buffer = b""
        try:
            self._read_message()  # greeting
            self.command("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise BenchError("QMP did not answer in time") from None
            if not chunk:
                raise BenchError("QMP connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: object) -> Any:
        request: dict[str, object] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "event" in message:
                continue
            if "error" in message:
                raise BenchError(f"QMP {name}: {message['error']}")
            return message.get("return")

    def hmp(self, command_line: str) -> str:
        answer = self.command("human-monitor-command", **{"command-line": command_line})
        return str(answer)

    def close(self) -> None:
        self.sock.close()


def poll_until(
    probe: Any, done: Any, timeout: float, what: str, interval: float = 0.0005
) -> Any:
    """Call `probe()` until `done(value)`; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: still {value!r} after {timeout:g} s")
        time.sleep(interval)


# --- statistics and tables ------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    minimum: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary | None:
        if not samples:
            return None
        ordered = sorted(samples)
        # Nearest-rank p90: with 10 samples, the 9th smallest.
        rank = max(1, -(-9 * len(ordered) // 10))
        return cls(
            statistics.median(ordered), ordered[rank - 1], ordered[0], len(ordered)
        )

    def cell(self, digits: int = 1) -> str:
        return (
            f"{self.median:.{digits}f} / {self.p90:.{digits}f} / "
            f"{self.minimum:.{digits}f}"
        )


def cell(summary: Summary | None, digits: int = 1) -> str:
    return "-" if summary is None else summary.cell(digits)


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    widths = [
        max(len(str(row[column])) for row in [header, *rows])
        for column in range(len(header))
    ]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(value).ljust(width) for value, width in zip(row, widths, strict=True)
        ]
        return ("| " + " | ".join(cells) + " |").rstrip()

    print(f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print(line(row))
    sys.stdout.flush()


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def closing_all() -> Iterator[list[Any]]:
    """A list of things with `close()`, all closed on the way out, last first."""
    things: list[Any] = []
    try:
        yield things
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.close()


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks reap children and delete
    temporary files when the benchmark is stopped."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

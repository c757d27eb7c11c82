"""`ember uffd-handler` as a child process, for the Uffd tests and the benchmark."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def wait_for_userfault(pid: int, timeout: float = 10.0) -> None:
    """Return once some thread of process `pid` sleeps in the kernel waiting for
    a page-fault handler to fill a page (its wchan is handle_userfault)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                if (task / "wchan").read_text() == "handle_userfault":
                    return
            except OSError:
                pass  # the thread ended
        time.sleep(0.02)
    raise TimeoutError(f"no thread of process {pid} waits for a page")


class HandlerProcess:
    """Starts the handler and waits until it accepts connections."""

    def __init__(
        self,
        socket_path: Path | str,
        mem_file: Path | str,
        *extra: str,
        mode: str = "on-demand",
        stats: Path | str | None = None,
    ) -> None:
        self.socket_path = str(socket_path)
        self._stderr: str | None = None
        self.stats_path = str(stats) if stats is not None else f"{socket_path}.stats"
        command = [
            sys.executable,
            "-m",
            "ember.cli",
            "--level",
            "Info",
            "uffd-handler",
            "--socket",
            self.socket_path,
            "--mem-file",
            str(mem_file),
            "--mode",
            mode,
            "--stats",
            self.stats_path,
            *extra,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on"):
            self.process.wait(10)
            message = f"handler did not start: {line!r} {self.stderr()}"
            self.close()
            raise RuntimeError(message)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(Path(self.stats_path).read_text())
        return value

    def wait_stats(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Counters once `predicate(stats)` holds (they are written a few times a
        second)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = self.stats()
                if predicate(stats):
                    return stats
            except (FileNotFoundError, json.JSONDecodeError):
                stats = {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"handler counters never matched: {stats}")
            time.sleep(0.05)

    def wait(self, timeout: float = 10.0) -> int:
        return self.process.wait(timeout)

    def stderr(self) -> str:
        """Everything the handler logged (once it has exited)."""
        if self._stderr is None:
            if self.process.poll() is None:
                return ""
            assert self.process.stderr is not None
            self._stderr = self.process.stderr.read()
        return self._stderr

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

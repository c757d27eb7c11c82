"""Helpers for the API tests (no tests here): a real `ember --api-sock` process,
a client that checks every response it receives against docs/openapi.yaml, and
the test guest's console."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OPENAPI_PATH = REPO / "docs" / "openapi.yaml"
HAVE_KVM = os.path.exists("/dev/kvm")

needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm")


# --- checking responses against the OpenAPI description -------------------------------


class OpenApiChecker:
    """Finds the operation a request hit and validates the response's status and
    body against it; raises AssertionError on any mismatch."""

    def __init__(self, path: Path = OPENAPI_PATH) -> None:
        self.document = yaml.safe_load(path.read_text())
        self._templates = [
            (self._compile(template), template) for template in self.document["paths"]
        ]
        self.checked = 0

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        return re.compile(f"^{pattern}$")

    def operation(self, method: str, path: str) -> dict[str, Any] | None:
        for pattern, template in self._templates:
            if pattern.match(path):
                return self.document["paths"][template].get(method.lower())
        return None

    def check(self, method: str, path: str, status: int, body: bytes) -> None:
        from openapi_schema_validator import OAS30Validator

        operation = self.operation(method, path)
        if operation is None:  # undocumented: the only answer allowed is a fault
            assert status == 400, f"{method} {path} is undocumented but gave {status}"
            response = self.document["components"]["responses"]["Fault"]
        else:
            responses = operation["responses"]
            assert str(status) in responses, (
                f"{method} {path} answered {status}, documented: {list(responses)}"
            )
            response = responses[str(status)]
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[-1]
            response = self.document["components"]["responses"][name]
        content = response.get("content")
        if content is None:
            assert body == b"", f"{method} {path} {status} must have no body"
        else:
            schema = dict(content["application/json"]["schema"])
            schema["components"] = self.document["components"]
            OAS30Validator(schema).validate(json.loads(body))
        self.checked += 1


CHECKER = OpenApiChecker()


# --- talking to the socket ------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        # With a timeout set, connecting to a Unix socket whose backlog is full
        # fails with EAGAIN at once instead of waiting; retry for a while.
        deadline = time.monotonic() + (self.timeout or 10)
        while True:
            try:
                sock.connect(self.unix_path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.01)
            except BaseException:
                sock.close()
                raise
        self.sock = sock


class Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def fault(self) -> str:
        message: str = self.json()["fault_message"]
        return message


class CheckedClient:
    """One keep-alive connection; every answer is checked against the OpenAPI."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        self.connection = _UnixHTTPConnection(str(socket_path), timeout)

    def request(self, method: str, path: str, body: Any = None) -> Answer:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        self.connection.request(method, path, payload, headers)
        response = self.connection.getresponse()
        data = response.read()
        CHECKER.check(method, path, response.status, data)
        return Answer(response.status, data, dict(response.getheaders()))

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Answer:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> Answer:
        return self.request("PATCH", path, body)

    def close(self) -> None:
        self.connection.close()


def raw_exchange(socket_path: str | Path, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def check_raw_response(method: str, path: str, raw: bytes) -> int:
    """Parse one raw HTTP response, check it against the OpenAPI, return status."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    CHECKER.check(method, path, status, rest[:length])
    return status


# --- an ember process -----------------------------------------------------------------


class EmberProcess:
    """`python -m ember.cli --api-sock SOCK ...` with the guest console on pipes."""

    def __init__(self, workdir: Path, *flags: str, api: bool = True) -> None:
        self.socket_path = workdir / f"ember-{id(self)}.sock"
        command = [sys.executable, "-m", "ember.cli"]
        if api:
            command += ["--api-sock", str(self.socket_path)]
        command += list(flags)
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr_lines: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\r\n"))

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ember exited: {self.stderr_text()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return
                except OSError:
                    time.sleep(0.02)
        raise AssertionError("the API socket did not come up")

    def client(self) -> CheckedClient:
        return CheckedClient(self.socket_path)

    def send_console(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def expect_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r}; saw {seen[-10:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.close()

    def close(self) -> int:
        """Wait for the process to end and release its pipes."""
        returncode = self.process.wait()
        for pump in self._pumps:
            pump.join(timeout=5)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return returncode


@contextlib.contextmanager
def ember_process(workdir: Path, *flags: str) -> Iterator[EmberProcess]:
    process = EmberProcess(workdir, *flags)
    try:
        process.wait_for_socket()
        yield process
    finally:
        process.stop()


def guest_kernel() -> str:
    from ember.testguest import guest_path

    return str(guest_path())

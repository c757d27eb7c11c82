"""A real `ember --api-sock` process, spoken to through its socket, with no
microVM: the socket file, malformed HTTP, and the server surviving all of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_api_support import (
    EmberProcess,
    check_raw_response,
    ember_process,
    raw_exchange,
)


@pytest.fixture
def ember(tmp_path: Path) -> Iterator[EmberProcess]:
    with ember_process(tmp_path, "--id", "server-test") as process:
        yield process


def assert_still_serving(ember: EmberProcess) -> None:
    client = ember.client()
    try:
        answer = client.get("/")
        assert answer.status == 200 and answer.json()["id"] == "server-test"
    finally:
        client.close()


def test_socket_is_private(ember: EmberProcess) -> None:
    assert stat.S_IMODE(os.stat(ember.socket_path).st_mode) == 0o600


def test_a_live_socket_is_refused_and_a_stale_one_replaced(
    ember: EmberProcess, tmp_path: Path
) -> None:
    second = subprocess.run(
        [*ember.process.args[:3], "--api-sock", str(ember.socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "another process is serving" in second.stderr
    assert_still_serving(ember)

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(str(stale))  # bound, never listening: what a dead process leaves
    process = EmberProcess(tmp_path, "--api-sock", str(stale), api=False)
    process.socket_path = stale
    try:
        process.wait_for_socket()
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
    finally:
        process.stop()


def test_a_regular_file_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "not-a-socket"
    target.write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "--api-sock", str(target)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    ("raw", "method", "path"),
    [
        (b"PUT /machine-config HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}", "PUT",
         "/machine-config"),
        (b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", "PUT", "/vm"),
        (b"DELETE /vm HTTP/1.1\r\n\r\n", "DELETE", "/vm"),
        (b"GET /no/such/path HTTP/1.1\r\n\r\n", "GET", "/no/such/path"),
        (b"PATCH /vm HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "PATCH", "/vm"),
    ],
)  # fmt: skip
def test_bad_requests_get_400_and_the_connection_stays_usable(
    ember: EmberProcess, raw: bytes, method: str, path: str
) -> None:
    follow_up = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(ember.socket_path, raw + follow_up)
    first, _, second = answer.partition(b"HTTP/1.1 200")
    assert check_raw_response(method, path, first) == 400
    assert second, "the same connection answers the next request"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/3\r\n\r\n",
        b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"PUT /vm HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000,
    ],
)
def test_protocol_errors_get_400_and_close(ember: EmberProcess, raw: bytes) -> None:
    answer = raw_exchange(ember.socket_path, raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in answer
    body = answer.partition(b"\r\n\r\n")[2]
    assert "fault_message" in json.loads(body)
    assert_still_serving(ember)


def test_a_huge_body_actually_sent_is_refused(ember: EmberProcess) -> None:
    body = b"{" + b" " * 2_000_000 + b"}"
    head = f"PUT /machine-config HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
    answer = raw_exchange(ember.socket_path, head.encode() + body)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"larger than the limit" in answer
    assert_still_serving(ember)


def test_clients_disconnecting_mid_request(ember: EmberProcess) -> None:
    for partial in [
        b'PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"vcpu',
        b"PUT /machine-config HTTP/1.1\r\nConte",
        b"G",
    ]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(ember.socket_path))
            sock.sendall(partial)
    # One that resets the connection instead of closing it.
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(ember.socket_path))
    sock.sendall(b"PUT /vm HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
    sock.close()
    assert_still_serving(ember)


def test_many_idle_keep_alive_connections(ember: EmberProcess) -> None:
    idle = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX)
            idle.append(sock)  # closed in `finally` even if connect fails
            sock.connect(str(ember.socket_path))
        idle[0].sendall(b"GET / HTTP/1.1\r\n\r\n")  # some speak, most stay silent
        idle[-1].sendall(b"GET /machine-config HTTP/1.1\r\nContent-Le")
        assert_still_serving(ember)
        idle[0].settimeout(5)
        assert idle[0].recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in idle:
            sock.close()
    assert_still_serving(ember)


def test_expect_100_continue(ember: EmberProcess) -> None:
    body = b'{"vcpu_count": 2, "mem_size_mib": 64}'
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(ember.socket_path))
        sock.sendall(
            b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 204 No Content")


def test_pipelined_requests_are_answered_in_order(ember: EmberProcess) -> None:
    raw = (
        b"PUT /machine-config HTTP/1.1\r\nContent-Length: 35\r\n\r\n"
        b'{"vcpu_count":3,"mem_size_mib":96} '
        b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    answer = raw_exchange(ember.socket_path, raw)
    assert answer.startswith(b"HTTP/1.1 204")
    assert b'"vcpu_count":3' in answer


def test_curl_speaks_to_it(ember: EmberProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        [curl, "-sS", "--unix-socket", str(ember.socket_path), "http://localhost/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(result.stdout)["state"] == "Not started"


def test_sigterm_stops_it_and_removes_the_socket(tmp_path: Path) -> None:
    process = EmberProcess(tmp_path)
    process.wait_for_socket()
    started = time.monotonic()
    assert process.stop() == 128 + 15
    assert time.monotonic() - started < 5
    assert not process.socket_path.exists()


def test_no_api_needs_a_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "--no-api"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "--no-api needs --config-file" in result.stderr

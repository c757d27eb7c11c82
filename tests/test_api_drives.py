"""Drives and the Uffd memory backend through the API socket of a real `ember`
process, with the test guest's virtio-block driver on the other side."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_api_e2e import boot_ticking_guest, continues_ticking
from test_api_support import (
    CheckedClient,
    EmberProcess,
    ember_process,
    guest_kernel,
    needs_kvm,
)
from test_block import SECTOR, blk_sum, pattern
from uffd_process import HandlerProcess

pytestmark = [pytest.mark.kvm, pytest.mark.slow, needs_kvm]

ANSWER = r"^(OK|ERR .*|SUM 0x[0-9a-f]+|BLK .*)$"


def sparse_disk(path: Path, mib: int) -> Path:
    with path.open("wb") as file:
        file.truncate(mib << 20)
    return path


def ask(ember: EmberProcess, command: str) -> str:
    ember.send_console(command)
    return ember.expect_line(ANSWER, timeout=60).group(0)


def drive(drive_id: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "drive_id": drive_id,
        "path_on_host": str(path),
        "is_root_device": False,
        **extra,
    }


def configure(client: CheckedClient, *drives: dict[str, Any]) -> None:
    machine = {"vcpu_count": 1, "mem_size_mib": 64}
    assert client.put("/machine-config", machine).status == 204
    boot = {"kernel_image_path": guest_kernel()}
    assert client.put("/boot-source", boot).status == 204
    for body in drives:
        answer = client.put(f"/drives/{body['drive_id']}", body)
        assert answer.status == 204, answer.body


def start(ember: EmberProcess, client: CheckedClient) -> None:
    assert client.put("/actions", {"action_type": "InstanceStart"}).status == 204
    ember.expect_line(r"READY vcpus=1 ")


@pytest.fixture
def client_of() -> Iterator[Any]:
    clients: list[CheckedClient] = []

    def open_client(ember: EmberProcess) -> CheckedClient:
        clients.append(ember.client())
        return clients[-1]

    yield open_client
    for client in clients:
        client.close()


def test_write_snapshot_load_in_a_new_process_read_back(
    tmp_path: Path, client_of: Any
) -> None:
    disk = sparse_disk(tmp_path / "disk.img", 16)
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    metrics = tmp_path / "metrics.json"
    metrics.touch()
    with ember_process(tmp_path, "--id", "first") as first:
        client = client_of(first)
        assert client.put("/metrics", {"metrics_path": str(metrics)}).status == 204
        configure(client, drive("data_1", disk))
        [listed] = client.get("/vm/config").json()["drives"]
        assert listed["path_on_host"] == str(disk) and listed["io_engine"] == "Sync"
        start(first, client)
        assert ask(first, "blk info") == "BLK sectors=32768 ro=0 id=data_1"
        assert ask(first, "blk write 8 256 42") == "OK"
        written = pattern(42, 8, 256)
        assert disk.read_bytes()[8 * SECTOR : 264 * SECTOR] == written
        assert ask(first, "blk read 8 256") == blk_sum(written)
        assert client.patch("/vm", {"state": "Paused"}).status == 204
        body = {"snapshot_path": str(state), "mem_file_path": str(memory)}
        assert client.put("/snapshot/create", body).status == 204
        assert client.put("/actions", {"action_type": "FlushMetrics"}).status == 204
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["block_data_1"]["write_bytes"] == 256 * SECTOR
    assert line["block_data_1"]["write_count"] >= 1
    assert line["block"]["read_bytes"] >= 256 * SECTOR
    assert line["put_api_requests"]["drive_count"] == 1

    with ember_process(tmp_path, "--id", "second") as second:
        client = client_of(second)
        load = {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "resume_vm": True,
        }
        assert client.put("/snapshot/load", load).status == 204
        assert client.get("/vm/config").json()["drives"] == [listed]
        assert ask(second, "blk read 8 256") == blk_sum(written)
        assert ask(second, "blk write 1000 8 5") == "OK"
        assert disk.read_bytes()[1000 * SECTOR : 1008 * SECTOR] == pattern(5, 1000, 8)

    with ember_process(tmp_path, "--id", "third") as third:
        client = client_of(third)
        assert client.put("/drives/data_1", drive("data_1", disk)).status == 204
        answer = client.put("/snapshot/load", load)
        assert answer.status == 400 and "after boot resources" in answer.fault


def test_patch_path_on_host_after_start(tmp_path: Path, client_of: Any) -> None:
    small = sparse_disk(tmp_path / "small.img", 1)
    large = tmp_path / "large.img"
    large.write_bytes(pattern(9, 0, 16))
    with large.open("r+b") as file:
        file.truncate(4 << 20)
    other = tmp_path / "other.img"
    other.write_bytes(pattern(11, 0, 16))
    metrics = tmp_path / "metrics.json"
    metrics.touch()
    with ember_process(tmp_path, "--metrics-path", str(metrics)) as ember:
        client = client_of(ember)
        configure(client, drive("d0", small, cache_type="Writeback"))
        start(ember, client)
        patch = {"drive_id": "d0", "path_on_host": str(large)}
        assert client.patch("/drives/d0", patch).status == 204
        [listed] = client.get("/vm/config").json()["drives"]
        assert listed["path_on_host"] == str(large)
        # The test guest reads the capacity when it first uses the disk.
        assert ask(ember, "blk info") == "BLK sectors=8192 ro=0 id=d0"
        assert ask(ember, "blk read 0 16") == blk_sum(pattern(9, 0, 16))
        # With the driver running, the data comes from the new file at once.
        patch = {"drive_id": "d0", "path_on_host": str(other)}
        assert client.patch("/drives/d0", patch).status == 204
        assert ask(ember, "blk read 0 16") == blk_sum(pattern(11, 0, 16))
        for body, reason in [
            ({"drive_id": "d1", "path_on_host": str(large)}, "unknown drive 'd1'"),
            ({"drive_id": "d0", "path_on_host": str(tmp_path / "gone")}, "cannot"),
        ]:
            answer = client.patch(f"/drives/{body['drive_id']}", body)
            assert answer.status == 400
            assert answer.fault.startswith("Drive update error: ")
            assert reason in answer.fault
        assert ask(ember, "blk read 0 16") == blk_sum(pattern(11, 0, 16))
        client.put("/actions", {"action_type": "FlushMetrics"})
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["block_d0"]["update_count"] == 2
    assert line["block_d0"]["update_fails"] == 1
    assert line["patch_api_requests"]["drive_fails"] == 2


def test_bad_drive_bodies_are_refused_with_the_reason(
    tmp_path: Path, client_of: Any
) -> None:
    disk = sparse_disk(tmp_path / "disk.img", 1)
    with ember_process(tmp_path) as ember:
        client = client_of(ember)
        for path, body, reason in [
            ("/drives/a", drive("b", disk), "drive_id in the path ('a') differs"),
            ("/drives/a", drive("a", disk, io_engine="Async"), '"Async" is not'),
            (
                "/drives/a",
                drive("a", disk, rate_limiter={"ops": {"size": 5, "refill_time": 9}}),
                "rate_limiter is not supported yet",
            ),
            ("/drives/a", drive("a", disk, socket="/v.sock"), "vhost-user"),
            ("/drives/a", drive("a", tmp_path / "none"), "No such file"),
            ("/drives/a", {"drive_id": "a", "is_root_device": True}, "path_on_host"),
            ("/drives/a", {"drive_id": "a"}, "is_root_device"),
        ]:
            answer = client.put(path, body)
            assert answer.status == 400, body
            assert answer.fault.startswith("Drive configuration error: ")
            assert reason in answer.fault, answer.fault
        root = drive("r", disk, is_root_device=True)
        assert client.put("/drives/r", root).status == 204
        answer = client.put("/drives/s", {**root, "drive_id": "s"})
        assert answer.status == 400 and "root device" in answer.fault
        answer = client.patch("/drives/r", {"drive_id": "r", "path_on_host": "x"})
        assert answer.status == 400 and "before the microVM has started" in (
            answer.fault
        )
        assert client.get("/vm/config").json()["drives"][0]["drive_id"] == "r"


def test_load_through_a_uffd_handler(tmp_path: Path, client_of: Any) -> None:
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with ember_process(tmp_path) as first:
        last = boot_ticking_guest(first, vcpus=2)
        client = client_of(first)
        assert client.patch("/vm", {"state": "Paused"}).status == 204
        body = {"snapshot_path": str(state), "mem_file_path": str(memory)}
        assert client.put("/snapshot/create", body).status == 204

    handler = HandlerProcess(tmp_path / "uffd.sock", memory)
    try:
        with ember_process(tmp_path) as second:
            client = client_of(second)
            missing = {
                "snapshot_path": str(state),
                "mem_backend": {
                    "backend_type": "Uffd",
                    "backend_path": str(tmp_path / "nobody.sock"),
                },
            }
            answer = client.put("/snapshot/load", missing)
            assert answer.status == 400
            assert answer.fault.startswith("Load snapshot error: ")
            assert client.get("/").json()["state"] == "Not started"
            load = {
                "snapshot_path": str(state),
                "mem_backend": {
                    "backend_type": "Uffd",
                    "backend_path": handler.socket_path,
                },
                "resume_vm": True,
            }
            assert client.put("/snapshot/load", load).status == 204
            assert client.get("/").json()["state"] == "Running"
            continues_ticking(second, last)
            second.send_console("cpus")
            second.expect_line(r"CPUS 2 alive 2")
            stats = handler.wait_stats(lambda s: s["totals"]["pages_served"] > 0)
            assert stats["totals"]["errors"] == 0
    finally:
        handler.close()


def test_ember_snapshot_load_with_uffd(tmp_path: Path, client_of: Any) -> None:
    """`ember snapshot load --uffd SOCKET`, the command-line form of the above."""
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with ember_process(tmp_path) as first:
        last = boot_ticking_guest(first, vcpus=1)
        client = client_of(first)
        assert client.patch("/vm", {"state": "Paused"}).status == 204
        body = {"snapshot_path": str(state), "mem_file_path": str(memory)}
        assert client.put("/snapshot/create", body).status == 204

    handler = HandlerProcess(tmp_path / "uffd.sock", memory)
    try:
        with ember_process(tmp_path) as second:
            result = subprocess.run(
                [
                    sys.executable, "-m", "ember.cli", "snapshot", "load",
                    "--api-sock", str(second.socket_path),
                    "--snapshot-path", str(state),
                    "--uffd", handler.socket_path,
                    "--resume",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert "running" in result.stdout
            continues_ticking(second, last)
            assert client_of(second).get("/").json()["state"] == "Running"
    finally:
        handler.close()

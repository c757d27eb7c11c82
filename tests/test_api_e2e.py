"""End to end through the API socket with a real microVM: boot the test guest,
pause, snapshot, load in a second process, and watch its ticks continue. Driven
by curl, by the PyPI client pyrecracker (unchanged), and by Ember's own CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from test_api_support import (
    EmberProcess,
    ember_process,
    guest_kernel,
    needs_kvm,
)

pytestmark = [pytest.mark.kvm, pytest.mark.slow, needs_kvm]


def boot_ticking_guest(ember: EmberProcess, vcpus: int = 2) -> int:
    """Configure and start the guest through the API; the last TICK seen."""
    client = ember.client()
    assert (
        client.put("/machine-config", {"vcpu_count": vcpus, "mem_size_mib": 64}).status
        == 204
    )
    assert (
        client.put("/boot-source", {"kernel_image_path": guest_kernel()}).status == 204
    )
    assert client.put("/actions", {"action_type": "InstanceStart"}).status == 204
    ember.expect_line(rf"READY vcpus={vcpus} ")
    ember.send_console("tick on")
    ember.expect_line(r"^OK$")
    tick = int(ember.expect_line(r"TICK (\d+)").group(1))
    client.close()
    return tick


def continues_ticking(ember: EmberProcess, after: int) -> None:
    ticks = [int(ember.expect_line(r"TICK (\d+)").group(1)) for _ in range(3)]
    assert ticks[0] >= after and ticks == sorted(ticks), ticks


def test_boot_pause_snapshot_load_resume(tmp_path: Path) -> None:
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with ember_process(tmp_path, "--id", "first") as first:
        last_tick = boot_ticking_guest(first)
        client = first.client()
        assert (
            client.put(
                "/snapshot/create",
                {"snapshot_path": str(state), "mem_file_path": str(memory)},
            ).status
            == 400
        )  # running
        assert client.patch("/vm", {"state": "Paused"}).status == 204
        assert client.get("/").json()["state"] == "Paused"
        assert (
            client.put(
                "/snapshot/create",
                {"snapshot_path": str(state), "mem_file_path": str(memory)},
            ).status
            == 204
        )
        assert client.patch("/vm", {"state": "Resumed"}).status == 204
        continues_ticking(first, last_tick)
        config = client.get("/vm/config").json()
        client.close()

    with ember_process(tmp_path, "--id", "second") as second:
        client = second.client()
        answer = client.put(
            "/snapshot/load",
            {
                "snapshot_path": str(state),
                "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            },
        )
        assert answer.status == 204
        assert client.get("/").json()["state"] == "Paused"
        assert (
            client.get("/vm/config").json()["machine-config"]
            == config["machine-config"]
        )
        assert client.patch("/vm", {"state": "Resumed"}).status == 204
        continues_ticking(second, last_tick)
        second.send_console("cpus")
        second.expect_line(r"CPUS 2 alive 2")
        second.send_console("reset")
        assert second.process.wait(timeout=20) == 0
        client.close()
        second.close()


def test_a_failed_load_then_a_good_one_in_the_same_process(tmp_path: Path) -> None:
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with ember_process(tmp_path) as first:
        boot_ticking_guest(first, vcpus=1)
        client = first.client()
        client.patch("/vm", {"state": "Paused"})
        client.put(
            "/snapshot/create",
            {"snapshot_path": str(state), "mem_file_path": str(memory)},
        )
        client.close()
    corrupt = tmp_path / "corrupt.state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    truncated_memory = tmp_path / "short.mem"
    truncated_memory.write_bytes(memory.read_bytes()[: 1 << 20])

    with ember_process(tmp_path) as second:
        client = second.client()
        for bad_state, bad_memory, reason in [
            (corrupt, memory, "CRC"),
            (tmp_path / "missing.state", memory, "No such file"),
            (state, truncated_memory, ""),
            (memory, memory, ""),
        ]:
            answer = client.put(
                "/snapshot/load",
                {"snapshot_path": str(bad_state), "mem_file_path": str(bad_memory)},
            )
            assert answer.status == 400
            assert answer.fault.startswith("Load snapshot error: ")
            assert reason in answer.fault
            assert client.get("/").json()["state"] == "Not started"
        answer = client.put(
            "/snapshot/load",
            {
                "snapshot_path": str(state),
                "mem_file_path": str(memory),
                "resume_vm": True,
            },
        )
        assert answer.status == 204
        assert answer.headers.get("Deprecation") == "true"
        assert client.get("/").json()["state"] == "Running"
        second.send_console("cpus")
        second.expect_line(r"CPUS 1 alive 1")
        client.close()


def test_curl_drives_the_whole_cycle(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    def request(ember: EmberProcess, method: str, path: str, body: Any = None) -> int:
        command = [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}"]
        command += ["--unix-socket", str(ember.socket_path), "-X", method]
        if body is not None:
            command += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        command.append(f"http://localhost{path}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return int(result.stdout)

    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with ember_process(tmp_path) as first:
        assert (
            request(
                first, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}
            )
            == 204
        )
        assert (
            request(first, "PUT", "/boot-source", {"kernel_image_path": guest_kernel()})
            == 204
        )
        assert (
            request(first, "PUT", "/actions", {"action_type": "InstanceStart"}) == 204
        )
        first.expect_line("READY")
        first.send_console("tick on")
        last = int(first.expect_line(r"TICK (\d+)").group(1))
        assert request(first, "PATCH", "/vm", {"state": "Paused"}) == 204
        body = {
            "snapshot_path": str(state),
            "mem_file_path": str(memory),
            "snapshot_type": "Full",
        }
        assert request(first, "PUT", "/snapshot/create", body) == 204
    with ember_process(tmp_path) as second:
        body = {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "resume_vm": True,
        }
        assert request(second, "PUT", "/snapshot/load", body) == 204
        continues_ticking(second, last)


def test_pyrecracker_drives_ember(tmp_path: Path) -> None:
    client_module = pytest.importorskip("pyrecracker.client")
    types = pytest.importorskip("pyrecracker.client_types")
    state, memory = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")

    with ember_process(tmp_path) as first:
        client = client_module.FirecrackerClient(str(first.socket_path))
        client.put_machine_config(
            types.MachineConfiguration(mem_size_mib=64, vcpu_count=2)
        )
        client.put_boot_source(types.BootSource(kernel_image_path=guest_kernel()))
        client.put_actions(
            types.InstanceActionInfo(action_type=types.ActionType.INSTANCE_START)
        )
        first.expect_line("READY vcpus=2")
        first.send_console("tick on")
        last = int(first.expect_line(r"TICK (\d+)").group(1))
        client.patch_vm(types.VM(state=types.VMState.PAUSED))
        client.put_snapshot_create(
            types.SnapshotCreateParams(
                snapshot_path=state,
                mem_file_path=memory,
                snapshot_type=types.SnapshotType.FULL,
            )
        )
        client.patch_vm(types.VM(state=types.VMState.RESUMED))
        continues_ticking(first, last)

    with ember_process(tmp_path) as second:
        client = client_module.FirecrackerClient(str(second.socket_path))
        client.put_snapshot_load(
            types.SnapshotLoadParams(
                snapshot_path=state, mem_file_path=memory, resume_vm=True
            )
        )
        continues_ticking(second, last)
        # Errors come back as HTTP errors the client raises, with Ember's message.
        requests = pytest.importorskip("requests")
        with pytest.raises(requests.HTTPError):
            client.put_actions(
                types.InstanceActionInfo(action_type=types.ActionType.INSTANCE_START)
            )


def test_ember_snapshot_cli_talks_to_the_socket(tmp_path: Path) -> None:
    # The CLI runs in a directory of its own and names the files relative to it:
    # they land there, not in the monitor's working directory.
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    state, memory = client_dir / "vm.state", client_dir / "vm.mem"
    cli = [sys.executable, "-m", "ember.cli", "snapshot"]
    with ember_process(tmp_path) as first:
        last = boot_ticking_guest(first, vcpus=1)
        created = subprocess.run(
            [*cli, "create", "--api-sock", str(first.socket_path),
             "--snapshot-path", "vm.state", "--mem-file-path", "vm.mem"],
            capture_output=True, text=True, timeout=120, cwd=client_dir,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        assert "snapshot written" in created.stdout
        assert state.is_file() and memory.is_file()
        assert not (tmp_path / "vm.state").exists()
        client = first.client()
        assert client.get("/").json()["state"] == "Running"  # resumed afterwards
        client.close()
    with ember_process(tmp_path) as second:
        loaded = subprocess.run(
            [*cli, "load", "--api-sock", str(second.socket_path),
             "--snapshot-path", "vm.state", "--mem-file-path", "vm.mem", "--resume"],
            capture_output=True, text=True, timeout=120, cwd=client_dir,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        assert "running" in loaded.stdout
        continues_ticking(second, last)


def test_config_file_boots_without_api_calls(tmp_path: Path) -> None:
    config = tmp_path / "vm.json"
    metrics = tmp_path / "metrics.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": guest_kernel()},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 32},
                "drives": [],
                "network-interfaces": [],
            }
        )
    )
    ember = EmberProcess(
        tmp_path, "--no-api", "--config-file", str(config), "--metrics-path",
        str(metrics), api=False,
    )  # fmt: skip
    try:
        ember.expect_line("READY vcpus=2 mem_mib=32")
        ember.send_console("reset")
        assert ember.process.wait(timeout=20) == 0
    finally:
        ember.stop()
    line = json.loads(metrics.read_text().splitlines()[-1])
    assert line["put_api_requests"]["machine_cfg_count"] == 0  # not through HTTP
    assert line["vmm"]["guest_stop_count"] == 1


def test_metrics_and_logs_files(tmp_path: Path) -> None:
    metrics, logs = tmp_path / "metrics.fifo-or-file", tmp_path / "ember.log"
    metrics.touch()
    logs.touch()
    with ember_process(tmp_path, "--id", "vm-7") as ember:
        client = ember.client()
        assert (
            client.put(
                "/logger", {"log_path": str(logs), "level": "info", "show_level": True}
            ).status
            == 204
        )
        assert client.put("/metrics", {"metrics_path": str(metrics)}).status == 204
        boot_ticking_guest(ember, vcpus=1)
        client.patch("/vm", {"state": "Paused"})
        client.patch("/vm", {"state": "Resumed"})
        assert client.put("/actions", {"action_type": "FlushMetrics"}).status == 204
        client.close()
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["latencies_us"]["pause_vm"] > 0
    assert line["latencies_us"]["resume_vm"] > 0
    assert line["vmm"]["pause_count"] == 1
    assert line["put_api_requests"]["actions_count"] >= 1
    text = logs.read_text()
    assert "[vm-7:ember_vmm:INFO] microVM started" in text

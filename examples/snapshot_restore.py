"""Boot the test guest, snapshot it, and bring it back — with Ember's Python API.

Run it as root (or as a user who can open /dev/kvm):

    python examples/snapshot_restore.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ember.console import ANSWER, ConsoleLog
from ember.testguest import guest_path
from ember.vmm.config import BootSource, MachineConfig
from ember.vmm.microvm import Console, Microvm


def ask(vm: Microvm, log: ConsoleLog, command: str) -> str:
    """Send one console command to the test guest and return its answer."""
    vm.serial.enqueue_input(command.encode() + b"\n")
    return log.expect(ANSWER, timeout=60).group(0)


def main() -> None:
    # The snapshot files go to a temporary directory, removed at the end.
    with tempfile.TemporaryDirectory(prefix="ember-example-") as workdir:
        run(Path(workdir))


def run(workdir: Path) -> None:
    state, mem = str(workdir / "vm.state"), str(workdir / "vm.mem")
    print(f"snapshot files in {workdir}")

    # Boot with dirty-page tracking so diff snapshots are possible later.
    log = ConsoleLog()
    machine = MachineConfig(vcpu_count=2, mem_size_mib=256, track_dirty_pages=True)
    vm = Microvm.boot(machine, BootSource(str(guest_path())), Console(write=log.feed))
    print(log.expect(r"^READY .*").group(0))
    print(ask(vm, log, "fill 42 32"))  # OK: 32 MiB of guest RAM now hold a pattern

    vm.pause()
    stats = vm.snapshot(state, mem)  # full snapshot
    print(f"full snapshot in {stats.seconds * 1000:.1f} ms")
    vm.resume()
    print(ask(vm, log, "fill 43 4"))
    vm.pause()
    stats = vm.snapshot(state + ".diff", mem + ".diff", diff=True)
    print(f"diff snapshot: {stats.memory_bytes_written >> 20} MiB of changed pages")
    vm.close()

    # Bring the full snapshot back; it continues where it was paused.
    log = ConsoleLog()
    restored = Microvm.restore(state, mem, console=Console(write=log.feed))
    print(ask(restored, log, "check 42 32"))  # OK
    restored.close()


if __name__ == "__main__":
    main()

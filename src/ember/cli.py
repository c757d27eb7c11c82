"""The `ember` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ember import __version__
from ember.api.cli import (
    add_monitor_flags,
    add_snapshot_api_commands,
    run_monitor_from_args,
    wants_monitor,
)
from ember.uffd_handler.cli import add_uffd_handler_command

if TYPE_CHECKING:
    from ember.vmm.config import DriveConfig, HugePages
    from ember.vmm.microvm import Microvm

log = logging.getLogger("ember")

EXIT_INTERRUPTED = 130
# Firecracker's level names; Python has no Trace, and Off is above every level.
LOG_LEVELS = {
    "Off": logging.CRITICAL + 10,
    "Error": logging.ERROR,
    "Warning": logging.WARNING,
    "Info": logging.INFO,
    "Debug": logging.DEBUG,
    "Trace": logging.DEBUG,
}


HUGE_PAGES_FLAGS: dict[str, HugePages] = {
    "none": "None",
    "transparent": "Transparent",
    "2m": "2M",
}

# The demo fills 64 MiB; the test guest keeps its own code and tables below 16 MiB.
DEMO_MIN_MEM_MIB = 128


class CliError(Exception):
    """An error to print as one line, with exit status 1."""


def _add_run(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        help="boot a microVM with its serial console on this terminal",
        description=(
            "Boot a microVM. Its serial console is this process's stdin and stdout. "
            "Without --kernel, Ember's built-in test guest boots. The VM stops when "
            "the guest resets (status 0), on Ctrl-C (130), or on a fatal vCPU "
            "error (1)."
        ),
    )
    run.add_argument("--kernel", metavar="PATH", help="vmlinux (ELF) or bzImage")
    run.add_argument("--initrd", metavar="PATH", help="initial ramdisk")
    run.add_argument("--cmdline", metavar="ARGS", help="kernel command line")
    run.add_argument(
        "--vcpus", type=int, default=1, metavar="N", help="1..32 (default 1)"
    )
    run.add_argument(
        "--mem-mib",
        type=int,
        default=128,
        metavar="M",
        help="guest memory (default 128)",
    )
    run.add_argument(
        "--huge-pages",
        choices=["none", "transparent", "2m"],
        default="transparent",
        help=(
            "back guest memory with transparent huge pages (default: transparent; "
            "first touch of fresh memory is several times faster), or with 2 MiB "
            "pages from the host's hugetlbfs pool (2m)"
        ),
    )
    run.add_argument(
        "--track-dirty-pages",
        action="store_true",
        help="log guest writes so diff snapshots can be taken",
    )
    run.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="PATH[,ro][,root]",
        help="a virtio-block disk backed by the file PATH, named drive0, drive1, "
        "... (repeatable); ',ro' makes it read-only, ',root' the root device",
    )
    run.add_argument(
        "--snapshot",
        metavar="STATE",
        help="instead of booting, restore the microVM saved in this state file",
    )
    run.add_argument(
        "--mem-file",
        metavar="MEM",
        help="the memory file that goes with --snapshot",
    )
    run.add_argument(
        "--uffd",
        metavar="SOCKET",
        help="instead of --mem-file: a page-fault handler's socket that serves "
        "the snapshot's memory (see ember uffd-handler)",
    )
    run.set_defaults(handler=_cmd_run)


def _add_guest(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    guest = subparsers.add_parser("guest", help="the built-in test guest")
    actions = guest.add_subparsers(dest="guest_command", required=True)
    path = actions.add_parser(
        "path", help="print the test guest's path, building it if needed"
    )
    path.set_defaults(handler=_cmd_guest_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember",
        description="Ember: a microVM monitor on Linux KVM, built around snapshots.",
    )
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    parser.add_argument(
        "--level",
        default="Warning",
        choices=list(LOG_LEVELS),
        type=str.capitalize,
        help="log level, as Firecracker's: Off, Error, Warning, Info, Debug, Trace "
        "(default Warning)",
    )
    add_monitor_flags(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(subparsers)
    _add_guest(subparsers)
    add_uffd_handler_command(subparsers)
    _add_snapshot(subparsers)
    demo = subparsers.add_parser(
        "demo",
        help="boot, snapshot, restore and clone the test guest, with timings",
        description="Boot the built-in test guest, show it ticking and holding "
        "memory and FPU state, snapshot it, restore it in a new process, start a "
        "few clones side by side, and print the time each step took. Cleans up "
        "after itself.",
    )
    demo.add_argument(
        "--vcpus", type=int, default=2, metavar="N", help="vCPUs, 1-32 (default 2)"
    )
    demo.add_argument(
        "--mem-mib",
        type=int,
        default=256,
        metavar="M",
        help=f"guest memory, at least {DEMO_MIN_MEM_MIB} MiB (default 256)",
    )
    demo.add_argument(
        "--clones",
        type=int,
        default=3,
        metavar="K",
        help="clones started side by side, 0 for none (default 3)",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from ember.demo import DemoError, run_demo

    if not 1 <= args.vcpus <= 32:
        raise CliError(f"--vcpus must be 1-32, not {args.vcpus}")
    if args.mem_mib < DEMO_MIN_MEM_MIB:
        raise CliError(
            f"--mem-mib must be at least {DEMO_MIN_MEM_MIB}: the demo fills 64 MiB "
            "of guest memory"
        )
    if args.clones < 0:
        raise CliError(f"--clones must be 0 or more, not {args.clones}")
    try:
        return run_demo(vcpus=args.vcpus, mem_mib=args.mem_mib, clones=args.clones)
    except DemoError as error:
        raise CliError(f"demo failed: {error}") from None


def _add_snapshot(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    snapshot = subparsers.add_parser("snapshot", help="create and load snapshots")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True)
    add_snapshot_api_commands(actions)
    info = actions.add_parser(
        "info",
        help="describe a state file",
        description="Print a state file's format version, vCPUs, memory layout "
        "and devices (after checking its magic, version and CRC).",
    )
    info.add_argument("state", metavar="STATE", help="the state file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_cmd_snapshot_info)
    rebase = actions.add_parser(
        "rebase",
        help="merge a diff memory file into its base",
        description="Copy every data extent of a diff memory file onto its base, in "
        "place. Apply diffs in the order they were taken; then restore with the "
        "state file of the last diff merged.",
    )
    rebase.add_argument("--base", required=True, metavar="MEM", help="base memory file")
    rebase.add_argument(
        "--diff", required=True, metavar="DIFF", help="diff memory file"
    )
    rebase.set_defaults(handler=_cmd_snapshot_rebase)


def _cmd_snapshot_info(args: argparse.Namespace) -> int:
    import json

    from ember.snapshot.info import describe, format_text

    info = describe(args.state)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _cmd_snapshot_rebase(args: argparse.Namespace) -> int:
    from ember.snapshot.memory_file import rebase

    copied = rebase(args.base, args.diff)
    print(f"merged {copied} bytes of {args.diff} into {args.base}")
    return 0


def _cmd_guest_path(args: argparse.Namespace) -> int:
    from ember.testguest import guest_path

    print(guest_path())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ember.vmm.config import DEFAULT_CMDLINE, BootSource, MachineConfig
    from ember.vmm.microvm import Microvm

    if args.snapshot is not None or args.mem_file is not None or args.uffd:
        return _run_until_stopped(_restore_from_args(args))
    kernel = args.kernel
    if kernel is None:
        from ember.testguest import guest_path

        kernel = str(guest_path())
    boot = BootSource(
        kernel_image_path=kernel,
        boot_args=args.cmdline if args.cmdline is not None else DEFAULT_CMDLINE,
        initrd_path=args.initrd,
    )
    machine = MachineConfig(
        vcpu_count=args.vcpus,
        mem_size_mib=args.mem_mib,
        track_dirty_pages=args.track_dirty_pages,
        huge_pages=HUGE_PAGES_FLAGS[args.huge_pages],
    )
    drives = _drives_from_args(args.drive)
    return _run_until_stopped(Microvm.boot(machine, boot, drives=drives))


def _drives_from_args(specs: list[str]) -> list[DriveConfig]:
    from ember.vmm.config import DriveConfig

    drives = []
    for index, spec in enumerate(specs):
        path, *options = spec.split(",")
        unknown = set(options) - {"ro", "root"}
        if not path or unknown:
            raise CliError(f"--drive {spec}: expected PATH[,ro][,root]")
        drives.append(
            DriveConfig(
                drive_id=f"drive{index}",
                path_on_host=path,
                is_read_only="ro" in options,
                is_root_device="root" in options,
            )
        )
    return drives


def _restore_from_args(args: argparse.Namespace) -> Microvm:
    from ember.vmm.microvm import Microvm

    if args.snapshot is None or (args.mem_file is None) == (args.uffd is None):
        raise CliError("--snapshot goes with one of --mem-file and --uffd")
    if args.kernel or args.initrd or args.cmdline or args.drive:
        raise CliError(
            "--kernel, --initrd, --cmdline and --drive cannot be used with "
            "--snapshot (drives come back from the snapshot)"
        )
    return Microvm.restore(
        args.snapshot,
        args.uffd or args.mem_file,
        track_dirty_pages=args.track_dirty_pages,
        mem_backend="Uffd" if args.uffd else "File",
    )


def _run_until_stopped(microvm: Microvm) -> int:
    try:
        while True:
            stop = microvm.wait(timeout=0.5)
            if stop is not None:
                break
    except KeyboardInterrupt:
        microvm.stop(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
        stop = microvm.wait()
    finally:
        microvm.close()
    assert stop is not None
    if stop.status != 0:
        print(f"ember: {stop.message}", file=sys.stderr)
    else:
        log.info("%s", stop.message)
    return stop.status


def _expected_errors() -> tuple[type[BaseException], ...]:
    from ember.arch.x86_64.vcpu_state import VcpuRestoreError
    from ember.arch.x86_64.vm_state import VmStateError
    from ember.boot.errors import KernelLoadError
    from ember.devices.virtio.attach import SlotAllocationError
    from ember.devices.virtio.block import BlockError
    from ember.kvm.fd import KvmError
    from ember.kvm.system import KvmUnavailableError
    from ember.memory.guest_memory import GuestMemoryError
    from ember.snapshot.memory_file import RebaseError
    from ember.snapshot.restore import SnapshotLoadError
    from ember.snapshot.state_file import StateFileError
    from ember.testguest import GuestBuildError
    from ember.vmm.config import ConfigError

    return (
        CliError,
        SnapshotLoadError,
        StateFileError,
        RebaseError,
        VcpuRestoreError,
        VmStateError,
        KernelLoadError,
        KvmUnavailableError,
        KvmError,
        ConfigError,
        GuestBuildError,
        BlockError,
        SlotAllocationError,
        GuestMemoryError,
        OSError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # `ember` runs as many short-lived processes (each restore, each clone), and
    # compiling its modules from source costs ~60 ms per start here. The command
    # therefore keeps Python's bytecode cache even where the environment turns it
    # off (PYTHONDONTWRITEBYTECODE); importing ember as a library does not.
    sys.dont_write_bytecode = False
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.level],
        format="%(asctime)s [ember:%(threadName)s] %(levelname)s %(message)s",
    )
    if getattr(args, "handler", None) is None:
        if wants_monitor(args):
            return run_monitor_from_args(args)
        parser.print_help()
        return 2
    if wants_monitor(args):
        print(
            f"ember: error: the monitor flags (--api-sock, --config-file, ...) start "
            f"the API server and cannot be combined with `{args.command}`",
            file=sys.stderr,
        )
        return 2
    try:
        status: int = args.handler(args)
    except _expected_errors() as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())

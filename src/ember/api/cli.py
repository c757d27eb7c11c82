"""The API's part of the `ember` command: the monitor's flags, and the
`ember snapshot create|load` subcommands that talk to a running monitor.

Kept here so that `ember.cli` only wires them in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_monitor_flags(parser: argparse.ArgumentParser) -> None:
    """Firecracker's process flags, at the top level: `ember --api-sock PATH`."""
    group = parser.add_argument_group(
        "monitor (as `firecracker`)",
        "With --api-sock or --config-file and no COMMAND, ember runs as a monitor "
        "process: it serves Firecracker's HTTP API on a Unix socket, and the "
        "guest's serial console is this process's stdin and stdout.",
    )
    group.add_argument(
        "--api-sock", metavar="PATH", help="serve the HTTP API on this Unix socket"
    )
    group.add_argument(
        "--config-file",
        metavar="FILE",
        help="boot at once from a Firecracker-format JSON config file",
    )
    group.add_argument(
        "--no-api",
        action="store_true",
        help="serve no API (needs --config-file)",
    )
    group.add_argument(
        "--id",
        dest="instance_id",
        default="anonymous-instance",
        metavar="ID",
        help="instance id shown in logs, metrics and GET / (default %(default)s)",
    )
    group.add_argument(
        "--log-path", metavar="PATH", help="write logs here instead of stderr"
    )
    group.add_argument(
        "--show-level", action="store_true", help="put the level in each log line"
    )
    group.add_argument(
        "--show-log-origin",
        action="store_true",
        help="put the file and line in each log line",
    )
    group.add_argument(
        "--metrics-path", metavar="PATH", help="flush JSON metrics lines here"
    )
    group.add_argument(
        "--http-api-max-payload-size",
        type=int,
        default=51_200,
        metavar="BYTES",
        help="largest request body accepted (default %(default)s)",
    )


def wants_monitor(args: argparse.Namespace) -> bool:
    return bool(args.api_sock or args.config_file or args.no_api)


def run_monitor_from_args(args: argparse.Namespace) -> int:
    from ember.api.monitor import MonitorError, MonitorOptions, run_monitor

    options = MonitorOptions(
        api_sock=args.api_sock,
        config_file=args.config_file,
        no_api=args.no_api,
        instance_id=args.instance_id,
        log_path=args.log_path,
        level=args.level,
        show_level=args.show_level,
        show_log_origin=args.show_log_origin,
        metrics_path=args.metrics_path,
        max_payload=args.http_api_max_payload_size,
    )
    try:
        return run_monitor(options)
    except MonitorError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 1


# --- ember snapshot create | load -------------------------------------------------


def add_snapshot_api_commands(actions: Subparsers) -> None:
    create = actions.add_parser(
        "create",
        help="snapshot the microVM of a running monitor",
        description=(
            "Ask the monitor at --api-sock to write a snapshot: the state file and "
            "the memory file. A running microVM is paused for the snapshot and "
            "resumed afterwards (unless --keep-paused)."
        ),
    )
    _add_socket(create)
    create.add_argument(
        "--snapshot-path", required=True, metavar="STATE", type=_client_path
    )
    create.add_argument(
        "--mem-file-path", required=True, metavar="MEM", type=_client_path
    )
    create.add_argument(
        "--diff",
        action="store_true",
        help="write only pages dirtied since the last snapshot",
    )
    create.add_argument(
        "--keep-paused",
        action="store_true",
        help="leave the microVM paused after the snapshot",
    )
    create.set_defaults(handler=_cmd_snapshot_create)

    load = actions.add_parser(
        "load",
        help="load a snapshot into a fresh monitor",
        description=(
            "Ask the fresh monitor at --api-sock (nothing configured yet) to "
            "restore a snapshot."
        ),
    )
    _add_socket(load)
    load.add_argument(
        "--snapshot-path", required=True, metavar="STATE", type=_client_path
    )
    memory = load.add_mutually_exclusive_group(required=True)
    memory.add_argument(
        "--mem-file-path",
        metavar="MEM",
        type=_client_path,
        help="map this memory file (File backend)",
    )
    memory.add_argument(
        "--uffd",
        metavar="SOCKET",
        type=_client_path,
        help="have the page-fault handler listening here serve memory (Uffd backend)",
    )
    load.add_argument(
        "--resume", action="store_true", help="run the microVM once loaded"
    )
    load.add_argument(
        "--track-dirty-pages",
        action="store_true",
        help="log guest writes so diff snapshots can be taken",
    )
    load.add_argument(
        "--clock-realtime",
        action="store_true",
        help="advance the guest clock by the time spent in the snapshot",
    )
    load.set_defaults(handler=_cmd_snapshot_load)


def _client_path(path: str) -> str:
    """A path as this command's user meant it: the monitor runs elsewhere and
    would resolve a relative path against its own working directory."""
    return os.path.abspath(path)


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-sock",
        dest="target_sock",
        required=True,
        metavar="PATH",
        help="the monitor's API socket",
    )


def _cmd_snapshot_create(args: argparse.Namespace) -> int:
    return _reporting_api_errors(_snapshot_create, args)


def _cmd_snapshot_load(args: argparse.Namespace) -> int:
    return _reporting_api_errors(_snapshot_load, args)


def _reporting_api_errors(
    command: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    from ember.api.client import ApiRequestError

    try:
        return command(args)
    except ApiRequestError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 1


def _snapshot_create(args: argparse.Namespace) -> int:
    from ember.api.client import ApiClient

    with ApiClient(args.target_sock) as client:
        was_running = client.get("/")["state"] == "Running"
        if was_running:
            client.patch("/vm", {"state": "Paused"})
        body = {
            "snapshot_type": "Diff" if args.diff else "Full",
            "snapshot_path": args.snapshot_path,
            "mem_file_path": args.mem_file_path,
        }
        memory_bytes = int(client.get("/machine-config")["mem_size_mib"]) << 20
        try:
            seconds = _with_progress(
                f"writing {args.mem_file_path}",
                lambda: client.put("/snapshot/create", body),
                Path(args.mem_file_path),
                memory_bytes,
            )
        finally:
            if was_running and not args.keep_paused:
                client.patch("/vm", {"state": "Resumed"})
    memory = Path(args.mem_file_path).stat()
    state = Path(args.snapshot_path).stat()
    written_mib = memory.st_blocks * 512 / (1 << 20)
    print(
        f"snapshot written in {seconds:.2f} s: {args.snapshot_path} "
        f"({state.st_size} bytes), {args.mem_file_path} "
        f"({memory.st_size >> 20} MiB, {written_mib:.1f} MiB on disk)"
    )
    return 0


def _snapshot_load(args: argparse.Namespace) -> int:
    from ember.api.client import ApiClient

    body = {
        "snapshot_path": args.snapshot_path,
        "mem_backend": (
            {"backend_type": "Uffd", "backend_path": args.uffd}
            if args.uffd
            else {"backend_type": "File", "backend_path": args.mem_file_path}
        ),
        "resume_vm": args.resume,
        "track_dirty_pages": args.track_dirty_pages,
        "clock_realtime": args.clock_realtime,
    }
    started = time.monotonic()
    with ApiClient(args.target_sock) as client:
        client.put("/snapshot/load", body)
        state = client.get("/")["state"]
    elapsed_ms = (time.monotonic() - started) * 1000
    print(f"snapshot loaded in {elapsed_ms:.1f} ms; the microVM is {state.lower()}")
    return 0


def _partial_bytes(target: Path) -> int:
    """Bytes already on disk in the monitor's temporary file for `target`.

    The monitor writes `.<name>.<random>.partial` beside the target and renames it
    at the end (ember.snapshot.atomic), so its allocated size is the progress."""
    total = 0
    try:
        for candidate in target.parent.glob(f".{target.name}.*.partial"):
            with contextlib.suppress(OSError):
                total = max(total, candidate.stat().st_blocks * 512)
    except OSError:
        pass
    return total


def _with_progress(
    label: str, work: Callable[[], object], target: Path, total_bytes: int
) -> float:
    """Run `work` (the create request) with a progress bar on a terminal; returns
    its seconds. Pages that are all zeros are left as holes, so a full snapshot of
    a mostly empty guest finishes well before the bar's end."""
    started = time.monotonic()
    if not sys.stderr.isatty():
        work()
        return time.monotonic() - started
    try:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )
    except ImportError:
        work()
        return time.monotonic() - started
    done = threading.Event()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(label, total=total_bytes)

        def watch() -> None:
            while not done.wait(0.1):
                progress.update(task, completed=_partial_bytes(target))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            work()
        finally:
            done.set()
            watcher.join()
        progress.update(task, completed=total_bytes)
    return time.monotonic() - started

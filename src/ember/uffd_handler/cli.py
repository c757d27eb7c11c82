"""`ember uffd-handler`: run Ember's page-fault handler."""

from __future__ import annotations

import argparse
import sys


def add_uffd_handler_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    handler = subparsers.add_parser(
        "uffd-handler",
        help="serve guest memory to microVMs restored with the Uffd backend",
        description=(
            "Listen on a Unix socket and serve the memory of every microVM that "
            "connects (restored with --uffd or mem_backend Uffd) from one memory "
            "file, opened read-only. Prints 'listening on PATH' once connections "
            "are accepted; exits with status 0 when the last microVM is gone. "
            "SIGUSR1 logs the counters; SIGTERM stops it."
        ),
    )
    handler.add_argument("--socket", required=True, metavar="PATH")
    handler.add_argument("--mem-file", required=True, metavar="FILE")
    handler.add_argument(
        "--mode",
        choices=["on-demand", "prefault"],
        default="on-demand",
        help="fill pages as the guest touches them (default), or all of them as "
        "soon as a microVM connects",
    )
    handler.add_argument(
        "--stats",
        metavar="FILE",
        help="keep the counters in this JSON file, rewritten as they change",
    )
    handler.add_argument(
        "--keep-running",
        action="store_true",
        help="do not exit when the last microVM is gone",
    )
    handler.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="exit with status 1 if no microVM connects within this time",
    )
    handler.add_argument(
        "--fault-around",
        type=int,
        default=16,
        metavar="PAGES",
        help="on a fault, copy the aligned block of this many 4 KiB pages around "
        "it where all of it is file data (default 16; 1 copies only the page)",
    )
    handler.set_defaults(handler=run_handler_command)


def run_handler_command(args: argparse.Namespace) -> int:
    from ember.uffd_handler.memory_file import MemoryFileError
    from ember.uffd_handler.server import HandlerError, PageFaultHandler

    if not 1 <= args.fault_around <= 512 or args.fault_around & (args.fault_around - 1):
        print(
            "ember uffd-handler: error: --fault-around must be a power of two "
            "from 1 to 512",
            file=sys.stderr,
        )
        return 2
    try:
        handler = PageFaultHandler(
            args.socket,
            args.mem_file,
            mode=args.mode,
            stats_path=args.stats,
            keep_running=args.keep_running,
            first_connection_timeout=args.timeout,
            fault_around=args.fault_around,
        )
    except MemoryFileError as error:
        print(f"ember uffd-handler: error: {error.strerror}", file=sys.stderr)
        return 1
    try:
        handler.listen()
    except HandlerError as error:
        handler.close()
        print(f"ember uffd-handler: error: {error}", file=sys.stderr)
        return 1
    handler.install_signal_handlers()
    print(f"listening on {args.socket}", flush=True)
    return handler.run()

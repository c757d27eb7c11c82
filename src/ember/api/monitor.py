"""`ember --api-sock PATH`: the monitor process, as Firecracker's is.

Threads. The main thread is the VMM thread: it builds and drives the microVM
(creating the first VM must happen there, where the vCPU kick handler is
installed) and executes API calls one at a time, taken from a queue. The API
thread (`ember_api`) parses HTTP, puts each call on that queue and waits for the
answer; it never touches KVM. A watcher thread waits for the microVM to stop and
tells the main thread, which then exits with the guest's status, as Firecracker
does when its guest shuts down.

Start-up stays small: the VMM's modules are imported by a background thread once
the socket answers, so the socket is ready before they are, and a boot or load
request that follows finds them loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from ember.api.controller import DEFAULT_INSTANCE_ID, ApiCall, Controller
from ember.api.http import DEFAULT_MAX_PAYLOAD, Request, Response
from ember.metrics import FLUSH_INTERVAL_S, Metrics

if TYPE_CHECKING:
    from ember.api.backend import RunningVm
    from ember.api.server import ApiServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorOptions:
    api_sock: str | None
    config_file: str | None = None
    no_api: bool = False
    instance_id: str = DEFAULT_INSTANCE_ID
    log_path: str | None = None
    level: str = "Warning"
    show_level: bool = False
    show_log_origin: bool = False
    metrics_path: str | None = None
    max_payload: int = DEFAULT_MAX_PAYLOAD


class MonitorError(Exception):
    """The monitor cannot start (bad flags, config file, socket)."""


@dataclass
class _Pending:
    """An API call waiting for the VMM thread."""

    call: ApiCall
    done: threading.Event
    response: Response | None = None


@dataclass(frozen=True)
class _VmStopped:
    status: int
    message: str


@dataclass(frozen=True)
class _Shutdown:
    signal_number: int


_Command = _Pending | _VmStopped | _Shutdown


class Monitor:
    def __init__(self, options: MonitorOptions, started_ns: int | None = None) -> None:
        from ember.api.backend import KvmBackend
        from ember.api.logs import LogSettings

        self.options = options
        self.started_ns = started_ns if started_ns is not None else time.monotonic_ns()
        self.metrics = Metrics(options.instance_id)
        self.logs = LogSettings(options.instance_id, options.level, self.metrics)
        self.logs.show_level = options.show_level
        self.logs.show_origin = options.show_log_origin
        # SimpleQueue: its put() is safe in a signal handler, Queue's is not.
        self.commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._exiting = threading.Event()
        self.controller = Controller(
            KvmBackend(),
            self.metrics,
            self.logs,
            options.instance_id,
            on_vm_created=self._watch_vm,
        )
        self.server: ApiServer | None = None

    # --- start-up -----------------------------------------------------------------

    def run(self) -> int:
        threading.current_thread().name = "ember_vmm"
        self._apply_flags()
        previous = {
            number: signal.signal(number, self._on_signal)
            for number in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            if self.options.config_file is not None:
                self._boot_from_config_file(self.options.config_file)
            if not self.options.no_api:
                self._start_api()
            return self._serve()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self._shutdown()

    def _apply_flags(self) -> None:
        from ember.api.logs import LogConfigError
        from ember.metrics import MetricsError

        try:
            if self.options.log_path is not None:
                self.logs.open_path(self.options.log_path, create=True)
            self.logs.level = self.options.level
            if self.options.metrics_path is not None:
                self.metrics.configure(self.options.metrics_path, create=True)
        except (LogConfigError, MetricsError) as error:
            raise MonitorError(str(error)) from None

    def _boot_from_config_file(self, path: str) -> None:
        from ember.api.config_file import ConfigFileError, apply_config_file

        try:
            apply_config_file(self.controller, path)
        except ConfigFileError as error:
            raise MonitorError(str(error)) from None

    def _start_api(self) -> None:
        from ember.api.server import ApiServer, ApiSocketError

        assert self.options.api_sock is not None
        server = ApiServer(
            self.options.api_sock,
            self.respond,
            self.options.max_payload,
            on_protocol_error=lambda: self.metrics.increment(
                "api_server", "request_parse_fails"
            ),
        )
        try:
            server.bind()
        except ApiSocketError as error:
            raise MonitorError(str(error)) from None
        self.server = server
        server.start()
        self._record_startup()
        log.info("API socket ready at %s", self.options.api_sock)
        if self.controller.vm is None:
            threading.Thread(target=_warm_up, name="ember_warmup", daemon=True).start()

    def _record_startup(self) -> None:
        wall_us = (time.monotonic_ns() - self.started_ns) // 1000
        times = os.times()
        cpu_us = int((times.user + times.system) * 1_000_000)
        self.metrics.record_startup(wall_us, cpu_us)

    # --- the API thread's side ----------------------------------------------------

    def respond(self, request: Request) -> Response:
        """Called on the API thread: parse, then wait for the VMM thread."""
        from ember.api.controller import fault_response
        from ember.api.routes import count_request, parse_request

        parsed = parse_request(request.method, request.path, request.body)
        if isinstance(parsed, Response):
            response = parsed
        else:
            pending = _Pending(parsed, threading.Event())
            self.commands.put(pending)
            while not pending.done.wait(0.2):
                if self._exiting.is_set():
                    return fault_response(400, "the monitor is shutting down")
            assert pending.response is not None
            response = pending.response
        count_request(self.metrics, request, response)
        return response

    # --- the VMM thread's loop ----------------------------------------------------

    def _serve(self) -> int:
        next_flush = time.monotonic() + FLUSH_INTERVAL_S
        while True:
            try:
                command = self.commands.get(
                    timeout=max(0, next_flush - time.monotonic())
                )
            except queue.Empty:
                self._flush_metrics()
                next_flush = time.monotonic() + FLUSH_INTERVAL_S
                continue
            if isinstance(command, _Pending):
                command.response = self.controller.handle(command.call)
                command.done.set()
            elif isinstance(command, _VmStopped):
                self.metrics.increment("vmm", "guest_stop_count")
                level = logging.INFO if command.status == 0 else logging.ERROR
                log.log(level, "microVM stopped: %s", command.message)
                return command.status
            else:
                log.info("signal %d: stopping", command.signal_number)
                return 128 + command.signal_number

    def _watch_vm(self, vm: RunningVm) -> None:
        def wait_for_stop() -> None:
            stop = vm.wait()
            if stop is not None:
                self.commands.put(_VmStopped(stop.status, stop.message))

        threading.Thread(target=wait_for_stop, name="ember_watch", daemon=True).start()

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self.commands.put(_Shutdown(number))

    def _flush_metrics(self) -> None:
        from ember.metrics import MetricsError

        try:
            self.metrics.flush()
        except MetricsError as error:
            log.warning("%s", error)

    def _shutdown(self) -> None:
        self._exiting.set()
        if self.server is not None:
            self.server.stop()
        vm = self.controller.vm
        if vm is not None:
            vm.close()
        self._flush_metrics()
        self.metrics.close()


def _warm_up() -> None:
    from ember.api.backend import warm_up_imports

    with contextlib.suppress(Exception):
        warm_up_imports()


def run_monitor(options: MonitorOptions, started_ns: int | None = None) -> int:
    """Run until the microVM stops or a signal arrives; returns the exit status."""
    if options.no_api and options.config_file is None:
        raise MonitorError("--no-api needs --config-file: there is nothing to run")
    if not options.no_api and not options.api_sock:
        raise MonitorError("--api-sock needs a path")
    return Monitor(options, started_ns).run()

"""Ember's page-fault handler: one process serving the memory of many microVMs.

Theory of operation. The handler listens on a Unix stream socket. Each monitor that
restores a microVM with the Uffd backend connects and sends the handshake
(`protocol`): its region table and its userfaultfd. From then on the handler reads
that userfaultfd's events and answers them:

- a page fault at an address: find the region, and fill the page with UFFDIO_COPY
  from the memory file (mapped read-only, shared by every microVM), or with
  UFFDIO_ZEROPAGE where the file has a hole or the range was removed since;
- a remove event (the guest's memory was discarded, e.g. by a balloon): remember the
  range, so a later fault there gets zeros rather than the file's old contents.
  Removes read in a batch are applied before the faults of that batch, because a
  fault raised after a remove may be read first by nobody's fault but ordering;
- EEXIST means the page is already there (two vCPUs touched it; a wide copy got
  there first): nothing to do. EAGAIN means a remove event is queued and every fill
  fails until it is read: the fault is deferred and retried after reading more.

In prefault mode the whole of a microVM's memory is filled right after its
handshake, in wide copies along the file's data extents and zero fills along its
holes, before any fault event is read; faults raised meanwhile find their page
present.

A microVM is gone when its monitor closes the connection (the monitor keeps it open
for the microVM's life). When the last one is gone the handler exits with status 0,
unless told to keep running. One thread, one epoll: a fill is a single system call,
so Python's per-fault overhead, not locking, is what bounds the rate.

Counters (per microVM and in total) are readable while the handler runs: written as
JSON to the `--stats` file a few times a second when they change, and logged on
SIGUSR1.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from ember.uffd_handler import abi
from ember.uffd_handler.memory_file import ReadOnlyMemoryFile, ZeroSource
from ember.uffd_handler.protocol import (
    MAX_HANDSHAKE_BYTES,
    HandshakeError,
    RegionMapping,
    decode_handshake,
)
from ember.unix_socket import SocketInUseError, SocketPathError, clear_stale_socket

log = logging.getLogger(__name__)

Mode = Literal["on-demand", "prefault"]
READ_BATCH = 128  # uffd messages read per read(2)
STATS_INTERVAL_S = 0.25
DEFERRED_RETRY_S = 0.005
HUGE_PAGE = 2 * 1024 * 1024
FAULT_AROUND_PAGES = 16  # 64 KiB per fault, aligned


class HandlerError(Exception):
    """The handler cannot start (socket in use, memory file unreadable)."""


@dataclass
class Counters:
    faults: int = 0  # page-fault events read
    pages_copied: int = 0  # filled from the memory file on a fault
    zero_pages: int = 0  # filled with zeros on a fault (hole or removed range)
    prefaulted_pages: int = 0  # filled before being asked (prefault mode)
    already_present: int = 0  # EEXIST: the page was there already
    deferred: int = 0  # EAGAIN: retried after reading pending events
    remove_events: int = 0
    removed_bytes: int = 0
    errors: int = 0
    serve_seconds: float = 0.0  # time spent answering fault batches
    prefault_seconds: float = 0.0

    @property
    def pages_served(self) -> int:
        return self.pages_copied + self.zero_pages

    def add(self, other: Counters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        values = asdict(self)
        values["pages_served"] = self.pages_served
        return values


class _SessionGone(Exception):
    """The microVM's memory no longer exists (its process has exited)."""


@dataclass
class VmSession:
    """One connected microVM: its connection, userfaultfd and region table."""

    number: int
    conn: socket.socket
    pid: int | None
    uffd: int = -1
    regions: list[RegionMapping] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    connected_at: float = field(default_factory=time.monotonic)
    _pending: bytes = b""
    _removed: list[tuple[int, int]] = field(default_factory=list)
    _deferred: list[int] = field(default_factory=list)
    _filler: abi.RangeFiller | None = None
    _bases: list[int] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.uffd >= 0 and bool(self.regions)

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def describe(self) -> dict[str, object]:
        return {
            "vm": self.number,
            "pid": self.pid,
            "regions": len(self.regions),
            "bytes": sum(region.size for region in self.regions),
            **self.counters.as_dict(),
        }

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.uffd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.uffd)
            self.uffd = -1


class PageFaultHandler:
    def __init__(
        self,
        socket_path: str,
        mem_file: str,
        mode: Mode = "on-demand",
        stats_path: str | None = None,
        keep_running: bool = False,
        first_connection_timeout: float | None = None,
        fault_around: int = FAULT_AROUND_PAGES,
    ) -> None:
        self.socket_path = socket_path
        self.mode = mode
        self.stats_path = stats_path
        self.keep_running = keep_running
        self.first_connection_timeout = first_connection_timeout
        self.fault_around = fault_around
        self.memory = ReadOnlyMemoryFile(mem_file)
        self._zero_source = ZeroSource(HUGE_PAGE)
        self._zero_address = self._zero_source.address
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        self._by_fd: dict[int, tuple[str, VmSession | None]] = {}
        self._sessions: dict[int, VmSession] = {}
        self._next_number = 1
        self._served_any = False
        self._finished = Counters()  # totals of sessions that have ended
        self._stats_dirty = True
        self._stats_written = 0.0
        self._stop = False
        self._dump_requested = False
        self._signal_read = -1
        self._stats_writer = StatsWriter(stats_path) if stats_path else None

    # --- running ----------------------------------------------------------------

    def listen(self) -> None:
        """Bind and listen; the socket path appears only once it accepts."""
        started = time.perf_counter()
        if not self.memory.populate():
            log.info("cannot pre-map the memory file; fills will fault on it")
        populate_ms = (time.perf_counter() - started) * 1000
        _clear_stale_socket(self.socket_path)
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        temporary = f"{self.socket_path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        try:
            listener.bind(temporary)
            listener.listen(64)
            os.rename(temporary, self.socket_path)
        except OSError as error:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise HandlerError(
                f"cannot listen on {self.socket_path}: {error.strerror}"
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self._watch(listener.fileno(), "listener", None)
        log.info(
            "serving %s (%d bytes, %d of data, mapped in %.1f ms) on %s, %s",
            self.memory.path,
            self.memory.size,
            self.memory.data_bytes,
            populate_ms,
            self.socket_path,
            self.mode,
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the handler cleanly; SIGUSR1 logs the counters.
        Main thread only."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end)
        self._signal_read = read_end
        self._watch(read_end, "signal", None)

        def on_stop(signum: int, frame: object) -> None:
            self._stop = True

        def on_dump(signum: int, frame: object) -> None:
            self._dump_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGUSR1, on_dump)

    def run(self) -> int:
        """Serve until every microVM is gone or a stop signal arrives (status 0),
        or until the first-connection timeout passes with none (status 1)."""
        if self._listener is None:
            self.listen()
        started = time.monotonic()
        status = 0
        try:
            while not self._stop:
                if self._served_any and not self._sessions and not self.keep_running:
                    log.info("every microVM is gone; exiting")
                    break
                if self._timed_out(started):
                    log.error(
                        "no microVM connected within %s s; exiting",
                        self.first_connection_timeout,
                    )
                    status = 1
                    break
                self._poll_once()
        finally:
            self._write_stats(force=True)
            self.close()
        return status

    def _timed_out(self, started: float) -> bool:
        limit = self.first_connection_timeout
        return (
            limit is not None
            and not self._served_any
            and time.monotonic() - started > limit
        )

    def _poll_once(self) -> None:
        deferred = any(session.has_deferred for session in self._sessions.values())
        timeout = DEFERRED_RETRY_S if deferred else STATS_INTERVAL_S
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            ready = []
        for fd, _events in ready:
            kind, session = self._by_fd.get(fd, ("", None))
            if kind == "listener":
                self._accept()
            elif kind == "signal":
                with contextlib.suppress(OSError):
                    os.read(fd, 64)
            elif kind == "conn" and session is not None:
                self._on_connection(session)
            elif kind == "uffd" and session is not None:
                self._on_faults(session)
        if deferred:
            for session in list(self._sessions.values()):
                if session.has_deferred:
                    self._on_faults(session)
        if self._dump_requested:
            self._dump_requested = False
            log.warning("counters: %s", json.dumps(self.snapshot_stats()))
            self._write_stats(force=True)
        self._write_stats()

    def _watch(self, fd: int, kind: str, session: VmSession | None) -> None:
        self._by_fd[fd] = (kind, session)
        self._epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        self._by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    # --- connections ------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            session = VmSession(self._next_number, conn, _peer_pid(conn))
            self._next_number += 1
            self._watch(conn.fileno(), "conn", session)

    def _on_connection(self, session: VmSession) -> None:
        if session.ready:
            try:
                data = session.conn.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._end(session, "its monitor closed the connection")
            return
        self._read_handshake(session)

    def _read_handshake(self, session: VmSession) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(session.conn, MAX_HANDSHAKE_BYTES, 4)
        except BlockingIOError:
            return
        except OSError as error:
            self._reject(session, f"cannot read the handshake: {error}")
            return
        for extra in fds[1:] if session.uffd < 0 else fds:
            os.close(extra)
        if fds and session.uffd < 0:
            session.uffd = fds[0]
        if flags & socket.MSG_CTRUNC:
            self._reject(session, "handshake descriptors were truncated")
            return
        if not data:
            self._reject(session, "connection closed before the handshake")
            return
        session._pending += data
        try:
            regions = decode_handshake(session._pending)
        except HandshakeError as error:
            if len(session._pending) < MAX_HANDSHAKE_BYTES and not _complete(
                session._pending
            ):
                return  # the rest of the message is still on its way
            self._reject(session, str(error))
            return
        problem = self._check_session(session, regions)
        if problem:
            self._reject(session, problem)
            return
        self._start(session, regions)

    def _check_session(self, session: VmSession, regions: list[RegionMapping]) -> str:
        if session.uffd < 0:
            return "handshake carried no userfaultfd"
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{session.uffd}")
            if "userfaultfd" not in target:
                return f"handshake descriptor is {target}, not a userfaultfd"
        for index, region in enumerate(regions):
            if region.offset + region.size > self.memory.size:
                return (
                    f"region {index} needs bytes up to {region.offset + region.size} "
                    f"but {self.memory.path} holds {self.memory.size}"
                )
        return ""

    def _start(self, session: VmSession, regions: list[RegionMapping]) -> None:
        session.regions = sorted(regions, key=lambda r: r.base_host_virt_addr)
        session._bases = [region.base_host_virt_addr for region in session.regions]
        session._filler = abi.RangeFiller(session.uffd)
        session._pending = b""
        self._sessions[session.number] = session
        self._served_any = True
        self._stats_dirty = True
        log.info(
            "microVM %d (pid %s): %d regions, %d bytes",
            session.number,
            session.pid,
            len(regions),
            sum(region.size for region in regions),
        )
        if self.mode == "prefault":
            try:
                self._prefault(session)
            except _SessionGone:
                self._end(session, "its memory is gone")
                return
        self._watch(session.uffd, "uffd", session)

    def _reject(self, session: VmSession, reason: str) -> None:
        log.error(
            "refusing microVM %d (pid %s): %s", session.number, session.pid, reason
        )
        self._unwatch(session.conn.fileno())
        session.close()

    def _end(self, session: VmSession, reason: str) -> None:
        log.info(
            "microVM %d (pid %s) done, %s: %d pages served on demand, %d prefaulted",
            session.number,
            session.pid,
            reason,
            session.counters.pages_served,
            session.counters.prefaulted_pages,
        )
        if session.conn.fileno() >= 0:
            self._unwatch(session.conn.fileno())
        if session.uffd >= 0:
            self._unwatch(session.uffd)
        if self._sessions.pop(session.number, None) is not None:
            self._finished.add(session.counters)
        session.close()
        self._stats_dirty = True

    # --- faults -----------------------------------------------------------------

    def _on_faults(self, session: VmSession) -> None:
        started = time.perf_counter()
        try:
            self._drain(session)
        except _SessionGone:
            self._end(session, "its memory is gone")
            return
        session.counters.serve_seconds += time.perf_counter() - started
        self._stats_dirty = True

    def _drain(self, session: VmSession) -> None:
        counters = session.counters
        while True:
            messages = self._read_messages(session)
            faults: list[int] = []
            for message in messages:
                if message.event == abi.UFFD_EVENT_PAGEFAULT:
                    faults.append(message.b)
                elif message.event == abi.UFFD_EVENT_REMOVE:
                    self._removed(session, message.a, message.b)
                else:
                    log.debug("ignoring uffd event %#x", message.event)
            counters.faults += len(faults)
            waiting = session._deferred + faults
            session._deferred = [
                address for address in waiting if not self._serve(session, address)
            ]
            counters.deferred += len(session._deferred)
            if len(messages) < READ_BATCH:
                return

    def _read_messages(self, session: VmSession) -> list[abi.UffdMessage]:
        try:
            data = os.read(session.uffd, abi.UFFD_MSG_SIZE * READ_BATCH)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as error:
            log.warning(
                "microVM %d: reading its userfaultfd: %s", session.number, error
            )
            raise _SessionGone from None
        return abi.decode_messages(data)

    def _removed(self, session: VmSession, start: int, end: int) -> None:
        """Remember [start, end) as discarded: later faults there get zeros."""
        counters = session.counters
        counters.remove_events += 1
        counters.removed_bytes += end - start
        ranges = session._removed
        index = bisect.bisect_left(ranges, (start, end))
        ranges.insert(index, (start, end))
        merged: list[tuple[int, int]] = []
        for low, high in ranges:
            if merged and low <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        session._removed = merged

    def _is_removed(self, session: VmSession, page: int) -> bool:
        ranges = session._removed
        if not ranges:
            return False
        index = bisect.bisect_right(ranges, (page, 1 << 64)) - 1
        return index >= 0 and ranges[index][1] > page

    def _serve(self, session: VmSession, address: int) -> bool:
        """Fill the page holding `address`; False to retry it later (EAGAIN)."""
        index = bisect.bisect_right(session._bases, address) - 1
        region = session.regions[index] if index >= 0 else None
        if region is None or not region.contains(address):
            session.counters.errors += 1
            log.error(
                "microVM %d faulted at %#x, outside its regions",
                session.number,
                address,
            )
            return True
        size = region.page_size
        page = address & ~(size - 1)
        offset = region.offset + (page - region.base_host_virt_addr)
        counters = session.counters
        if self.fault_around > 1 and size < HUGE_PAGE:
            around = self._fill_around(session, region, page)
            if around is not None:
                return around
        zero = self._is_removed(session, page) or self.memory.is_hole(offset, size)
        result = self._fill(session, region, page, size, zero, offset)
        if result == 0:
            if zero:
                counters.zero_pages += 1
            else:
                counters.pages_copied += 1
        elif result == errno.EEXIST:
            counters.already_present += 1
        elif result == errno.EAGAIN:
            return False
        else:
            self._fill_failed(session, page, result)
        return True

    def _fill_around(
        self, session: VmSession, region: RegionMapping, page: int
    ) -> bool | None:
        """Fill the aligned block of `fault_around` pages holding `page`: copy it
        where all of it is file data and none was removed, zero it where all of it
        is a hole; otherwise None, to fill `page` alone.

        Guests touch memory in runs, and on this host a fault round trip costs
        several times the copy of a page, so a block per fault is much faster;
        pages already present stop the copy early, which is harmless."""
        block = self.fault_around * abi.PAGE_SIZE
        start = max(region.base_host_virt_addr, page - page % block)
        end = min(region.end, start - start % block + block)
        offset = region.offset + (start - region.base_host_virt_addr)
        filler = session._filler
        assert filler is not None
        if self.memory.is_hole(offset, end - start):
            done, result = filler.zero(start, end - start)
            session.counters.zero_pages += done // abi.PAGE_SIZE
        elif self.memory.is_data(offset, end - start) and not self._removed_overlaps(
            session, start, end
        ):
            source = self.memory.address + offset
            done, result = filler.copy(start, source, end - start)
            session.counters.pages_copied += done // abi.PAGE_SIZE
        else:
            return None
        if start + done > page:
            return True
        if done == 0 and result == errno.EAGAIN:
            return False
        return None  # stopped before `page` (a present page): fill it alone

    def _removed_overlaps(self, session: VmSession, start: int, end: int) -> bool:
        ranges = session._removed
        if not ranges:
            return False
        index = bisect.bisect_left(ranges, (end, 0)) - 1
        return index >= 0 and ranges[index][1] > start

    def _fill(
        self,
        session: VmSession,
        region: RegionMapping,
        page: int,
        length: int,
        zero: bool,
        offset: int,
    ) -> int:
        """One fill of [page, page + length); returns 0 or errno."""
        filler = session._filler
        assert filler is not None
        if not zero:
            _, result = filler.copy(page, self.memory.address + offset, length)
        elif region.page_size == HUGE_PAGE:
            # hugetlbfs has no UFFDIO_ZEROPAGE: copy from a zero source.
            result = 0
            for start in range(page, page + length, HUGE_PAGE):
                _, result = filler.copy(start, self._zero_address, HUGE_PAGE)
                if result:
                    break
        else:
            _, result = filler.zero(page, length)
        return result

    def _fill_failed(self, session: VmSession, page: int, result: int) -> None:
        if result in (errno.ESRCH, errno.ENOENT):
            raise _SessionGone  # the monitor's memory has been torn down
        session.counters.errors += 1
        log.error(
            "microVM %d: cannot fill page %#x: %s",
            session.number,
            page,
            os.strerror(result),
        )

    # --- prefault ---------------------------------------------------------------

    def _prefault(self, session: VmSession) -> None:
        started = time.perf_counter()
        for region in session.regions:
            page = region.page_size
            data = self.memory.data_ranges(region.offset, region.size, page)
            position = 0
            for low, high in [*data, (region.size, region.size)]:
                if low > position:
                    self._prefill(session, region, position, low, zero=True)
                if high > low:
                    self._prefill(session, region, low, high, zero=False)
                position = max(position, high)
        session.counters.prefault_seconds += time.perf_counter() - started
        log.info(
            "microVM %d: prefaulted %d pages in %.1f ms",
            session.number,
            session.counters.prefaulted_pages,
            session.counters.prefault_seconds * 1000,
        )

    def _prefill(
        self, session: VmSession, region: RegionMapping, low: int, high: int, zero: bool
    ) -> None:
        """Fill region bytes [low, high) in as few calls as the kernel allows."""
        filler = session._filler
        assert filler is not None
        page = region.page_size
        position = low
        while position < high:
            dst = region.base_host_virt_addr + position
            length = high - position
            if zero and page == HUGE_PAGE:
                done, result = filler.copy(dst, self._zero_address, page)
            elif zero:
                done, result = filler.zero(dst, length)
            else:
                src = self.memory.address + region.offset + position
                done, result = filler.copy(dst, src, length)
            done -= done % page
            session.counters.prefaulted_pages += done // page
            position += done
            if result == 0 or done:
                continue  # all done, or a partial fill: go on from there
            if result == errno.EEXIST:
                session.counters.already_present += 1
                position += page
            elif result == errno.EAGAIN:
                # A remove event is queued; read it (and any faults) first.
                session.counters.deferred += 1
                self._drain(session)
            else:
                self._fill_failed(session, dst + done, result)
                position += page

    # --- counters ---------------------------------------------------------------

    def snapshot_stats(self) -> dict[str, object]:
        totals = Counters()
        totals.add(self._finished)
        for session in self._sessions.values():
            totals.add(session.counters)
        return {
            "pid": os.getpid(),
            "mode": self.mode,
            "socket": self.socket_path,
            "mem_file": self.memory.path,
            "vms_served": self._next_number - 1,
            "vms_active": len(self._sessions),
            "totals": totals.as_dict(),
            "vms": [session.describe() for session in self._sessions.values()],
        }

    def _write_stats(self, force: bool = False) -> None:
        if self._stats_writer is None or not (self._stats_dirty or force):
            return
        now = time.monotonic()
        if not force and now - self._stats_written < STATS_INTERVAL_S:
            return
        self._stats_writer.submit(json.dumps(self.snapshot_stats()))
        self._stats_written = now
        self._stats_dirty = False

    def close(self) -> None:
        for session in list(self._sessions.values()):
            self._end(session, "the handler is stopping")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if self._signal_read >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._signal_read)
            self._signal_read = -1
        if self._stats_writer is not None:
            self._stats_writer.close()
        self._epoll.close()
        self.memory.close()
        self._zero_source.close()


class StatsWriter:
    """Writes the counters file on its own thread: replacing a file by rename
    can wait for the disk (ext4 flushes the new data first), and faults must not
    wait behind it. Readers always see a whole file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._latest: str | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)
        self._thread.start()

    def submit(self, text: str) -> None:
        with self._cond:
            self._latest = text
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._closing)
                text, self._latest = self._latest, None
                closing = self._closing
            if text is not None:
                self._write(text)
            if closing and text is None:
                return

    def _write(self, text: str) -> None:
        temporary = f"{self.path}.tmp"
        try:
            with open(temporary, "w") as file:
                file.write(text)
            os.replace(temporary, self.path)
        except OSError as error:
            log.warning("cannot write counters to %s: %s", self.path, error)

    def close(self) -> None:
        """Write what was last submitted, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)


def _complete(data: bytes) -> bool:
    return data.rstrip().endswith(b"]")


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(creds[:4], "little") or None


def _clear_stale_socket(path: str) -> None:
    try:
        clear_stale_socket(path)
    except SocketInUseError:
        raise HandlerError(f"another handler is already listening on {path}") from None
    except SocketPathError as error:
        raise HandlerError(str(error)) from None

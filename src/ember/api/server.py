"""The API socket: a Unix stream socket served by one thread with a selector.

Theory of operation. One thread owns every connection. Reads are non-blocking
and feed each connection's `RequestReader`, so a client that sends half a
request, or sends nothing and keeps its connection open, costs a buffer and a
descriptor, never a thread. Complete requests go to `respond`, which (in the
monitor) hands them to the VMM thread and waits: requests are executed one at a
time, in arrival order, as in Firecracker. Responses are written non-blocking;
a client that does not read its answers stops being read until it does.

Protocol errors (see `ember.api.http`) are answered with a 400 and the
connection is closed gracefully: the write side is shut down, and what the
client still sends is read and dropped for a moment, so that it sees the answer
rather than a reset. When there are `MAX_CONNECTIONS` open connections, the one
that has been idle longest is closed to make room for a new client.

The socket file is created with mode 0600. A socket file left behind by a
process that is gone is replaced; one that a live process answers on is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from ember.api.http import (
    DEFAULT_MAX_PAYLOAD,
    ContinueExpected,
    ProtocolError,
    Request,
    RequestReader,
    Response,
    encode_response,
)
from ember.unix_socket import SocketPathError, clear_stale_socket

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512
READ_SIZE = 64 * 1024
MAX_PENDING_OUTPUT = 256 * 1024  # stop reading a client that does not read
LINGER_S = 1.0  # how long a closing connection's input is drained

Responder = Callable[[Request], Response]


class ApiSocketError(Exception):
    """The API socket cannot be created."""


def bind_api_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600."""
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bind() creates the file with the umask applied: 0177 leaves rw for the owner
    # only, with no window in which it is wider (a chmod afterwards would race).
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise ApiSocketError(
            f"cannot bind the API socket {path}: {error.strerror}"
        ) from None
    finally:
        os.umask(old_umask)
    # A burst of clients must queue, not be refused: keep the backlog deep.
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def _clear_stale_socket(path: str) -> None:
    try:
        clear_stale_socket(path)
    except SocketPathError as error:
        raise ApiSocketError(str(error)) from None


class _Connection:
    def __init__(self, sock: socket.socket, max_payload: int) -> None:
        self.sock = sock
        self.reader = RequestReader(max_payload)
        self.output = bytearray()
        self.closing = False  # answer what is queued, then close
        self.backlogged = False  # requests wait until the client reads answers
        self.lingering_until: float | None = None
        self.last_active = time.monotonic()


class ApiServer:
    def __init__(
        self,
        path: str,
        respond: Responder,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        on_protocol_error: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.respond = respond
        self.max_payload = max_payload
        self.on_protocol_error = on_protocol_error
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._connections: dict[int, _Connection] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        self._listener = bind_api_socket(self.path)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def start(self) -> None:
        """Serve on a thread named `ember_api`."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="ember_api", daemon=True
        )
        self._thread.start()

    def stop(self, unlink: bool = True) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # --- the loop ---------------------------------------------------------------

    def serve_forever(self) -> None:
        assert self._listener is not None, "bind() first"
        try:
            while not self._stopping:
                timeout = self._next_linger_deadline()
                for key, events in self._selector.select(timeout):
                    self._dispatch(key, events)
                self._expire_lingering()
        finally:
            self._close_everything()

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 64)
        else:
            connection: _Connection = key.data
            if events & selectors.EVENT_WRITE:
                self._write(connection)
            if events & selectors.EVENT_READ and not self._is_closed(connection):
                self._read(connection)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a burst of clients, without starving the others
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # EMFILE and friends: leave the client in the backlog for now.
                log.warning("cannot accept an API connection: %s", error.strerror)
                return
            sock.setblocking(False)
            if len(self._connections) >= MAX_CONNECTIONS:
                self._close_idlest()
            connection = _Connection(sock, self.max_payload)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if not data:  # the client is gone (perhaps mid-request: nothing to answer)
            self._close(connection)
            return
        if connection.lingering_until is not None:
            return  # draining after an error answer: drop it
        connection.last_active = time.monotonic()
        connection.reader.feed(data)
        self._process(connection)

    def _process(self, connection: _Connection) -> None:
        connection.backlogged = False
        while not connection.closing:
            if len(connection.output) >= MAX_PENDING_OUTPUT:
                connection.backlogged = True
                break
            event = connection.reader.next_event()
            if event is None:
                break
            if isinstance(event, ContinueExpected):
                connection.output += encode_response(100)
            elif isinstance(event, ProtocolError):
                if self.on_protocol_error is not None:
                    self.on_protocol_error()
                connection.output += _protocol_error_response(event)
                connection.closing = True
            else:
                response = self._respond(event)
                connection.output += response.encode()
                if not event.keep_alive or response.close:
                    connection.closing = True
        self._write(connection)

    def _respond(self, request: Request) -> Response:
        try:
            response = self.respond(request)
        except Exception:
            log.exception("answering %s %s failed", request.method, request.path)
            response = Response(
                500, b'{"fault_message": "internal error in Ember\'s API server"}'
            )
        if not request.keep_alive:
            response.close = True
        return response

    def _write(self, connection: _Connection) -> None:
        while connection.output:
            try:
                sent = connection.sock.send(connection.output)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(connection)
                return
            del connection.output[:sent]
        if connection.output:
            events = selectors.EVENT_WRITE
            if not connection.backlogged:
                events |= selectors.EVENT_READ
            self._watch(connection, events)
            return
        if connection.closing:
            self._linger(connection)
            return
        self._watch(connection, selectors.EVENT_READ)
        if connection.backlogged:
            self._process(connection)  # requests that waited behind the output

    def _watch(self, connection: _Connection, events: int) -> None:
        key = self._selector.get_key(connection.sock)
        if key.events != events:
            self._selector.modify(connection.sock, events, connection)

    # --- closing ----------------------------------------------------------------

    def _linger(self, connection: _Connection) -> None:
        """Everything is answered: stop sending, drain input briefly, then close."""
        if connection.lingering_until is not None:
            return
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        connection.lingering_until = time.monotonic() + LINGER_S
        self._watch(connection, selectors.EVENT_READ)

    def _next_linger_deadline(self) -> float | None:
        deadlines = [
            c.lingering_until
            for c in self._connections.values()
            if c.lingering_until is not None
        ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire_lingering(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections.values()):
            if (
                connection.lingering_until is not None
                and connection.lingering_until <= now
            ):
                self._close(connection)

    def _close_idlest(self) -> None:
        idlest = min(self._connections.values(), key=lambda c: c.last_active)
        log.info("too many API connections: closing the one idle longest")
        self._close(idlest)

    def _is_closed(self, connection: _Connection) -> bool:
        return connection.sock.fileno() < 0

    def _close(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if fd < 0:
            return
        self._connections.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()

    def _close_everything(self) -> None:
        for connection in list(self._connections.values()):
            self._close(connection)
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _protocol_error_response(error: ProtocolError) -> bytes:
    import msgspec

    from ember.api.models import Fault

    body = msgspec.json.encode(Fault(error.message))
    return encode_response(400, body, close=True)

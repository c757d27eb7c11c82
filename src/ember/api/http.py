"""HTTP/1.1 framing for the API socket, without any I/O.

The API's requests are small JSON documents with a Content-Length, sent by tools
that keep a connection open and send one request after another. This module turns
bytes from a connection into `Request`s and `Response`s into bytes; the server
owns the sockets. Keeping the parser here, free of sockets, is what lets the tests
feed it every malformed input they like, and keeps the server's start-up free of
`http.server` and the email package it pulls in.

What is refused, each with a `ProtocolError` after which the connection closes:
a request line that is not `METHOD /target HTTP/1.x`, a header block over
`MAX_HEADER_BYTES` or with a malformed line, a missing or conflicting
Content-Length on a request with a body, `Transfer-Encoding` (no chunked bodies),
and a body over the payload limit (Firecracker's default, 51200 bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
DEFAULT_MAX_PAYLOAD = 51_200

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    500: "Internal Server Error",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class ProtocolError:
    """The bytes on the connection are not a request we can answer; answer this
    message and close."""

    message: str


@dataclass(frozen=True)
class ContinueExpected:
    """The client sent `Expect: 100-continue` and waits before sending its body."""


Event = Request | ProtocolError | ContinueExpected


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False

    def encode(self) -> bytes:
        return encode_response(self.status, self.body, self.headers, self.close)


def encode_response(
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    reason = _REASONS.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}", "Server: Ember"]
    if status not in (100, 204):  # neither carries a body (RFC 9110 §8.6)
        lines.append(f"Content-Length: {len(body)}")
        if body:
            lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class _Head:
    method: str
    path: str
    headers: dict[str, str]
    body_length: int
    keep_alive: bool
    expects_continue: bool


class RequestReader:
    """Feed it a connection's bytes; take complete requests out with `next_event`.

    After a `ProtocolError` the reader is spent: the connection must close, since
    where the next request would start is unknown."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._continue_sent = False
        self._failed = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def idle(self) -> bool:
        """No part of a request has arrived since the last complete one."""
        return not self._buffer and self._head is None

    def next_event(self) -> Event | None:
        if self._failed:
            return None
        if self._head is None:
            head_or_error = self._parse_head()
            if head_or_error is None:
                return None
            if isinstance(head_or_error, ProtocolError):
                self._failed = True
                return head_or_error
            self._head = head_or_error
        head = self._head
        if len(self._buffer) < head.body_length:
            if head.expects_continue and not self._continue_sent:
                self._continue_sent = True
                return ContinueExpected()
            return None
        body = bytes(self._buffer[: head.body_length])
        del self._buffer[: head.body_length]
        self._head = None
        self._continue_sent = False
        return Request(head.method, head.path, head.headers, body, head.keep_alive)

    def _parse_head(self) -> _Head | ProtocolError | None:
        # Tolerate blank lines between requests (RFC 9112 §2.2).
        while self._buffer[:2] == b"\r\n" or self._buffer[:1] == b"\n":
            del self._buffer[: 2 if self._buffer[:1] == b"\r" else 1]
        match = _HEADER_END.search(self._buffer)
        if match is None:
            if len(self._buffer) > MAX_HEADER_BYTES:
                return ProtocolError(
                    f"request headers are larger than {MAX_HEADER_BYTES} bytes"
                )
            return None
        if match.end() > MAX_HEADER_BYTES:
            return ProtocolError(
                f"request headers are larger than {MAX_HEADER_BYTES} bytes"
            )
        text = bytes(self._buffer[: match.start()]).decode("latin-1")
        del self._buffer[: match.end()]
        return parse_head(text, self.max_payload)


def parse_head(text: str, max_payload: int) -> _Head | ProtocolError:
    """The request line and headers (without the blank line that ends them)."""
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith("/"):
        return ProtocolError(f"malformed request line: {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        return ProtocolError(f"unsupported HTTP version: {version[:20]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        return ProtocolError(f"more than {MAX_HEADERS} header lines")

    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            return ProtocolError(f"malformed header line: {line[:100]!r}")
        name = name.lower()
        value = value.strip()
        if name not in headers:
            headers[name] = value
        elif name == "content-length":
            if headers[name] != value:
                return ProtocolError("conflicting Content-Length headers")
        else:
            headers[name] = f"{headers[name]}, {value}"

    if "transfer-encoding" in headers:
        return ProtocolError(
            "Transfer-Encoding is not supported: send the body with a Content-Length"
        )
    length = _content_length(headers.get("content-length", "0"))
    if length is None:
        return ProtocolError("Content-Length is not a number")
    if length > max_payload:
        return ProtocolError(
            f"request body of {length} bytes is larger than the limit of "
            f"{max_payload} bytes"
        )
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    return _Head(
        method=method,
        path=target.split("?", 1)[0],
        headers=headers,
        body_length=length,
        keep_alive=keep_alive,
        expects_continue=headers.get("expect", "").lower() == "100-continue",
    )


def _content_length(value: str) -> int | None:
    # A bare run of digits only: int() would also take "+5", " 5" and "5_0".
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)

"""A small client for a running monitor's API socket (used by `ember snapshot`).

It keeps one connection open and sends one request at a time, as Firecracker's
SDKs do. Errors come back as `ApiRequestError` carrying the fault message.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class ApiRequestError(Exception):
    """The monitor answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    def __init__(self, socket_path: str, timeout: float = 600.0) -> None:
        self.socket_path = socket_path
        self._connection = _UnixConnection(socket_path, timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer, or None for 204."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._connection.request(method, path, payload, headers)
            response = self._connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            self._connection.close()
            raise ApiRequestError(
                f"cannot talk to the monitor at {self.socket_path}: {error}"
            ) from None
        decoded = json.loads(data) if data else None
        if response.status >= 400:
            message = (decoded or {}).get("fault_message", f"HTTP {response.status}")
            raise ApiRequestError(message, response.status)
        return decoded

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Claiming a Unix socket path that a dead process may have left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)


class SocketPathError(Exception):
    """The path cannot be used for a new listening socket."""


class SocketInUseError(SocketPathError):
    """A live process is listening on the path."""


def clear_stale_socket(path: str) -> None:
    """Remove a socket nobody listens on any more; refuse a live one or a file
    that is not a socket, so we never steal another process's endpoint."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise SocketPathError(f"cannot check {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as error:
        raise SocketPathError(f"cannot check {path}: {error.strerror}") from None
    finally:
        probe.close()
    raise SocketInUseError(f"another process is serving on {path}")

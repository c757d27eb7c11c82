"""The one place where a failure becomes a `400 {"fault_message": ...}`.

Handlers raise: `ApiError` for a request the API itself refuses (a rule, a
missing resource), `msgspec` errors for a body that does not parse, and the
monitor's own exceptions for an operation that failed in the VMM. `fault_for`
turns each into the message a client sees, prefixed with the operation that
failed, the way Firecracker's clients expect ("Load snapshot error: ...").

Anything else is a bug in Ember: it is logged with its traceback and answered
with a 500, so that a fuzzer or a test notices instead of a client being told
that its request was wrong.
"""

from __future__ import annotations

import logging

import msgspec

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request refused by the API's rules; the message is the fault message."""


class DeviceNotSupportedError(ApiError):
    """A device endpoint whose device Ember does not have yet."""


def _expected_vmm_errors() -> tuple[type[BaseException], ...]:
    # Imported when an error happens, not at start-up: these modules pull in the
    # whole VMM, and by the time one of their errors exists, they are loaded.
    from ember.arch.x86_64.vcpu_state import VcpuRestoreError
    from ember.arch.x86_64.vm_state import VmStateError as KvmVmStateError
    from ember.boot.errors import KernelLoadError
    from ember.devices.virtio.attach import SlotAllocationError
    from ember.devices.virtio.block import BlockError
    from ember.kvm.system import KvmUnavailableError
    from ember.memory.guest_memory import GuestMemoryError
    from ember.snapshot.atomic import SnapshotWriteError
    from ember.snapshot.create import SnapshotCreateError
    from ember.snapshot.restore import SnapshotLoadError
    from ember.snapshot.state_file import StateFileError
    from ember.vmm.config import ConfigError
    from ember.vmm.microvm import VmStateError

    return (
        ApiError,
        KernelLoadError,
        ConfigError,
        BlockError,
        SlotAllocationError,
        SnapshotCreateError,
        SnapshotWriteError,
        SnapshotLoadError,
        StateFileError,
        VcpuRestoreError,
        KvmVmStateError,
        VmStateError,
        GuestMemoryError,
        KvmUnavailableError,
        OSError,  # KvmError is one; so are ENOMEM from mmap and EACCES from open
    )


def fault_for(operation: str, error: BaseException) -> tuple[int, str]:
    """The HTTP status and fault message for `error` raised while doing
    `operation` (a phrase such as "Load snapshot")."""
    if isinstance(error, msgspec.ValidationError | msgspec.DecodeError):
        return 400, f"{operation} error: invalid request body: {error}"
    if isinstance(error, ApiError):
        return 400, f"{operation} error: {error}"
    if isinstance(error, _expected_vmm_errors()):
        return 400, f"{operation} error: {_describe(error)}"
    log.error("%s failed unexpectedly", operation, exc_info=error)
    return 500, f"{operation} error: internal error in Ember: {error!r}"


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__

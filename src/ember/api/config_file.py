"""`--config-file`: boot from a Firecracker-format JSON file, without API calls.

The file's sections go through the same controller calls as the API's requests,
in the order a client would send them (logger, metrics, machine-config,
boot-source, drives), then InstanceStart. A device section Ember does not
support yet is refused by name when it is non-empty; an empty list (as many
generated configs carry) is accepted.
"""

from __future__ import annotations

import msgspec

from ember.api import models
from ember.api.controller import ApiCall, Controller
from ember.api.routes import UNSUPPORTED_DEVICES


class ConfigFileError(Exception):
    """The config file cannot be read, parsed or applied."""


# ConfigFile attribute -> the path its API endpoint has (and so its refusal).
_DEVICE_SECTIONS = {
    "network_interfaces": "/network-interfaces/",
    "pmem": "/pmem/",
    "vsock": "/vsock",
    "balloon": "/balloon",
    "entropy": "/entropy",
    "mmds_config": "/mmds",
    "cpu_config": "/cpu-config",
    "serial": "/serial",
    "memory_hotplug": "/hotplug/memory",
}


def read_config_file(path: str) -> models.ConfigFile:
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
    except OSError as error:
        raise ConfigFileError(
            f"cannot read config file {path}: {error.strerror}"
        ) from None
    try:
        config = msgspec.json.decode(data, type=models.ConfigFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise ConfigFileError(f"config file {path}: {error}") from None
    for attribute, endpoint in _DEVICE_SECTIONS.items():
        if getattr(config, attribute):
            raise ConfigFileError(
                f"config file {path}: {UNSUPPORTED_DEVICES[endpoint]} "
                "(remove the section or leave it empty)"
            )
    if config.boot_source is None:
        raise ConfigFileError(f"config file {path}: a boot-source section is needed")
    return config


def config_calls(config: models.ConfigFile) -> list[ApiCall]:
    calls: list[ApiCall] = []
    if config.logger is not None:
        calls.append(ApiCall("put_logger", "Logger", config.logger))
    if config.metrics is not None:
        calls.append(ApiCall("put_metrics", "Metrics", config.metrics))
    if config.machine_config is not None:
        calls.append(
            ApiCall("put_machine_config", "Machine config", config.machine_config)
        )
    calls.append(ApiCall("put_boot_source", "Boot source", config.boot_source))
    calls.extend(
        ApiCall("put_drive", "Drive configuration", drive) for drive in config.drives
    )
    start = models.InstanceActionInfo(action_type="InstanceStart")
    calls.append(ApiCall("put_actions", "Start microVM", start))
    return calls


def apply_config_file(controller: Controller, path: str) -> None:
    for call in config_calls(read_config_file(path)):
        response = controller.handle(call)
        if response.status >= 400:
            fault = msgspec.json.decode(response.body, type=models.Fault)
            raise ConfigFileError(f"config file {path}: {fault.fault_message}")

"""Devices a guest finds through ACPI and that tell it about snapshots:
the VM generation ID and VMClock."""

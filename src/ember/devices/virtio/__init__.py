"""Virtio devices on the MMIO transport: split virtqueues, the transport, block."""

"""The KVM layer: ioctl numbers, structures, descriptor wrappers, typed exits."""

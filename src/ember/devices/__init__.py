"""Emulated devices."""

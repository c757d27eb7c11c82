"""Ember: a microVM monitor in Python on Linux KVM, built around snapshots."""

__version__ = "0.1.0"

"""Snapshots: typed state, the state-file format, memory files, create and restore."""

"""Architecture-specific parts of the monitor."""

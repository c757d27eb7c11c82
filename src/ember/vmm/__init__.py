"""The running microVM: threads, lifecycle, devices wiring."""

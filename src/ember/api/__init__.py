"""Ember's HTTP API on a Unix socket, in Firecracker's shape.

Layers, from the wire in: `http` (framing, no I/O) · `server` (the socket, one
thread, a selector) · `routes` (paths and bodies to `ApiCall`s, no I/O) ·
`controller` (lifecycle rules and resources, on the VMM thread) · `backend` (the
microVM itself). `faults` is the one place errors become fault messages;
`monitor` wires it all into the `ember --api-sock` process.
"""

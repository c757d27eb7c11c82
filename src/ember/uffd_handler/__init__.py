"""Ember's page-fault handler: serves guest memory restored with the Uffd backend.

`abi` is userfaultfd's kernel interface and `protocol` the handshake; both are shared
with the monitor side (`ember.snapshot.uffd`). `server` is the handler itself, run as
`ember uffd-handler --socket PATH --mem-file FILE`.
"""

"""Distinct integer types for the three address spaces a monitor juggles.

A guest-physical address, an address in this process and an offset in a memory
file are all plain integers at run time; NewType keeps mypy from letting one pass
for another.
"""

from typing import NewType

GuestAddress = NewType("GuestAddress", int)
HostAddress = NewType("HostAddress", int)
FileOffset = NewType("FileOffset", int)

"""A tiny encoder for the ACPI Machine Language (AML) that a DSDT holds.

Only what Ember's DSDT needs: named objects (`Name`), scopes and devices,
methods that return a constant or notify a device, integers, strings, packages
and resource templates. Each function returns the encoded bytes of one term,
so a table is built by nesting calls, the way ASL nests its blocks:

    device("VGEN", [name("_HID", string("VMGENCTR")), ...])

Encodings follow the ACPI specification, chapter 20 (AML grammar) and 6.4
(resource data types); the numbers are explained where they appear.
"""

from __future__ import annotations

from collections.abc import Iterable

# Opcodes (ACPI 6.5, 20.3).
_ZERO_OP = 0x00
_ONE_OP = 0x01
_NAME_OP = 0x08
_BYTE_PREFIX = 0x0A
_WORD_PREFIX = 0x0B
_DWORD_PREFIX = 0x0C
_STRING_PREFIX = 0x0D
_QWORD_PREFIX = 0x0E
_SCOPE_OP = 0x10
_BUFFER_OP = 0x11
_PACKAGE_OP = 0x12
_METHOD_OP = 0x14
_DUAL_NAME_PREFIX = 0x2E
_MULTI_NAME_PREFIX = 0x2F
_ROOT_CHAR = 0x5C  # '\'
_EXT_OP_PREFIX = 0x5B
_DEVICE_OP = 0x82  # after the extended-op prefix
_ARG0_OP = 0x68
_NOTIFY_OP = 0x86
_LEQUAL_OP = 0x93
_IF_OP = 0xA0
_RETURN_OP = 0xA4
_ONES_OP = 0xFF

_NAME_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class AmlError(ValueError):
    """A value cannot be expressed in AML as asked."""


def pkg_length(body_length: int) -> bytes:
    """The PkgLength that precedes a body of `body_length` bytes; it counts
    itself. One byte holds up to 63; longer lengths take 2-4 bytes, the first
    giving the count of bytes that follow (bits 7-6) and the low nibble."""
    for size in range(1, 5):
        total = body_length + size
        if size == 1 and total < 0x40:
            return bytes([total])
        if size > 1 and total < 1 << (4 + 8 * (size - 1)):
            rest = total >> 4
            return bytes([(size - 1) << 6 | (total & 0xF)]) + rest.to_bytes(
                size - 1, "little"
            )
    raise AmlError(f"AML package of {body_length} bytes is too long")


def _with_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def name_seg(segment: str) -> bytes:
    """A four-character name, padded with '_' as ASL does ("GED" -> "GED_")."""
    raw = segment.encode("ascii").ljust(4, b"_")
    if len(raw) != 4 or raw[0] in b"0123456789" or not set(raw) <= _NAME_CHARS:
        raise AmlError(f"{segment!r} is not an AML name segment")
    return raw


def name_string(path: str) -> bytes:
    """A name path such as "VGEN", "_SB_.VGEN" or "\\_SB_.VGEN"."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([_ROOT_CHAR]), path[1:]
    segments = [name_seg(part) for part in path.split(".")] if path else []
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([_DUAL_NAME_PREFIX]) + b"".join(segments)
    if not segments:
        return prefix + b"\x00"  # NullName: the root itself
    return prefix + bytes([_MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned 64-bit integer."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"{value} does not fit an AML integer")
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    for prefix, size in (
        (_BYTE_PREFIX, 1),
        (_WORD_PREFIX, 2),
        (_DWORD_PREFIX, 4),
        (_QWORD_PREFIX, 8),
    ):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise AmlError("AML strings cannot hold NUL")
    return bytes([_STRING_PREFIX]) + raw + b"\x00"


def eisa_id(text: str) -> bytes:
    """A compressed EISA id such as "PNP0501": three letters in five bits
    each and four hex digits, stored most significant byte first."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"{text!r} is not an EISA id")
    letters = [ord(char) - 0x40 for char in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return bytes([_DWORD_PREFIX]) + value.to_bytes(4, "big")


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): a named constant object."""
    return bytes([_NAME_OP]) + name_string(path) + value


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    return _with_length(bytes([_SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, terms: Iterable[bytes]) -> bytes:
    return _with_length(
        bytes([_EXT_OP_PREFIX, _DEVICE_OP]), name_string(path) + b"".join(terms)
    )


def method(path: str, arg_count: int, terms: Iterable[bytes]) -> bytes:
    """A not-serialized method at sync level 0 taking `arg_count` arguments."""
    if not 0 <= arg_count <= 7:
        raise AmlError(f"a method takes 0-7 arguments, not {arg_count}")
    body = name_string(path) + bytes([arg_count]) + b"".join(terms)
    return _with_length(bytes([_METHOD_OP]), body)


def package(elements: Iterable[bytes]) -> bytes:
    items = list(elements)
    if len(items) > 255:
        raise AmlError("a Package holds at most 255 elements")
    return _with_length(bytes([_PACKAGE_OP]), bytes([len(items)]) + b"".join(items))


def buffer(data: bytes) -> bytes:
    return _with_length(bytes([_BUFFER_OP]), integer(len(data)) + data)


def return_(value: bytes) -> bytes:
    return bytes([_RETURN_OP]) + value


def if_(predicate: bytes, terms: Iterable[bytes]) -> bytes:
    return _with_length(bytes([_IF_OP]), predicate + b"".join(terms))


def lequal(left: bytes, right: bytes) -> bytes:
    return bytes([_LEQUAL_OP]) + left + right


def notify(path: str, value: int) -> bytes:
    return bytes([_NOTIFY_OP]) + name_string(path) + integer(value)


ARG0 = bytes([_ARG0_OP])
ONES = bytes([_ONES_OP])

# --- resource templates (ACPI 6.5, 6.4) -------------------------------------

_END_TAG = 0x79  # small item 0xF, length 1
_IO_PORT = 0x47  # small item 0x8, length 7
_IRQ_NO_FLAGS = 0x22  # small item 0x4, length 2: ISA edge, active high
_MEMORY32_FIXED = 0x86  # large item 0x6
_EXTENDED_INTERRUPT = 0x89  # large item 0x9

_READ_WRITE = 1
_CONSUMER = 1 << 0
_EDGE = 1 << 1


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors and an end tag whose
    checksum byte 0 means "treat the checksum as valid"."""
    return buffer(b"".join(descriptors) + bytes([_END_TAG, 0]))


def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length): a fixed range of ports."""
    return bytes([_IO_PORT, 1]) + base.to_bytes(2, "little") * 2 + bytes([1, length])


def irq_no_flags(irq: int) -> bytes:
    if not 0 <= irq < 16:
        raise AmlError(f"IRQNoFlags takes an ISA IRQ 0-15, not {irq}")
    return bytes([_IRQ_NO_FLAGS]) + (1 << irq).to_bytes(2, "little")


def memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed(ReadWrite, base, length)."""
    if base < 0 or length <= 0 or base + length > 1 << 32:
        raise AmlError(f"{base:#x}+{length:#x} is not a 32-bit memory range")
    return (
        bytes([_MEMORY32_FIXED])
        + (9).to_bytes(2, "little")
        + bytes([_READ_WRITE])
        + base.to_bytes(4, "little")
        + length.to_bytes(4, "little")
    )


def interrupt(gsis: Iterable[int]) -> bytes:
    """Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsis}: the
    edges an irqfd raises."""
    numbers = list(gsis)
    if not 1 <= len(numbers) <= 255:
        raise AmlError("an Interrupt descriptor lists 1-255 interrupts")
    body = bytes([_CONSUMER | _EDGE, len(numbers)]) + b"".join(
        number.to_bytes(4, "little") for number in numbers
    )
    return bytes([_EXTENDED_INTERRUPT]) + len(body).to_bytes(2, "little") + body

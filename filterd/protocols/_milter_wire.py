"""The milter wire format both sides read and write: packets and NUL-terminated strings.

The filter side (`filterd.protocols.milter`) and the MTA side (`filterd.protocols.milter_client`)
frame and decode bytes the same way; only what a bad packet means differs, so every function
that refuses data takes ``error``, which turns a message into the side's RemoteProtocolError
(a TEMPFAIL reply on the filter side, a ``milter:`` prefix on the MTA side).

A packet is a u32 length (big-endian, counting the command byte), the command byte, and its
data. Strings are UTF-8 with surrogate escapes (8-bit bytes survive a round trip), each ended
by a NUL, the last one included.
"""

from __future__ import annotations

__all__ = [
    "CHUNK",
    "OPTIONS",
    "U32",
    "ErrorFactory",
    "PacketReader",
    "cstring",
    "exactly",
    "packet",
    "split_strings",
    "text",
]

import struct
from collections.abc import Callable
from typing import Final, TypeAlias

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols._buffer import ReceiveBuffer

U32: Final = struct.Struct(">I")
# OPTNEG data: version, actions, protocol flags.
OPTIONS: Final = struct.Struct(">III")
# Postfix fills body chunks to 65535 bytes, and libmilter splits replacement bodies the same way.
CHUNK: Final = 65535

ErrorFactory: TypeAlias = Callable[[str], RemoteProtocolError]


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: u32 length of what follows (command byte included), command, data."""
    return U32.pack(1 + len(data)) + command + data


def text(raw: bytes) -> str:
    """A string field as text (surrogate escapes keep bytes that are not UTF-8)."""
    return raw.decode("utf-8", "surrogateescape")


def cstring(value: str, what: str) -> bytes:
    """A string for the peer: no NUL inside, NUL-terminated on the wire."""
    if "\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL byte")
    return value.encode("utf-8", "surrogateescape") + b"\0"


def split_strings(data: bytes, what: str, error: ErrorFactory) -> list[bytes]:
    """NUL-terminated strings back to back; the last one must be terminated too."""
    if not data.endswith(b"\0"):
        raise error(f"{what}: string without its terminating NUL")
    return data[:-1].split(b"\0")


def exactly(data: bytes, count: int, what: str, error: ErrorFactory) -> list[bytes]:
    """`split_strings`, refusing any number of strings but ``count``."""
    strings = split_strings(data, what, error)
    if len(strings) != count:
        raise error(f"{what}: expected {count} NUL-terminated string(s), got {len(strings)}")
    return strings


class PacketReader:
    """Whole packets out of received bytes.

    The length is checked as soon as its 4 bytes arrive (``1 <= length <= max_packet_size``),
    so an oversized packet is refused before its data is buffered.
    """

    __slots__ = ("_buffer", "_error", "_length", "_max_packet_size")

    def __init__(self, max_packet_size: int, error: ErrorFactory) -> None:
        self._max_packet_size = max_packet_size
        self._error = error
        self._buffer = ReceiveBuffer()
        self._length: int | None = None  # length of the packet being read, once known

    @property
    def buffer(self) -> ReceiveBuffer:
        """The bytes received and not yet taken as packets."""
        return self._buffer

    @property
    def mid_packet(self) -> bool:
        """Whether part of a packet has arrived (an EOF now would cut it)."""
        return bool(self._buffer) or self._length is not None

    def next_packet(self) -> tuple[bytes, bytes] | None:
        """The next packet's command byte and data, or None while it is incomplete."""
        if self._length is None:
            header = self._buffer.take(4)
            if header is None:
                return None
            (length,) = U32.unpack(header)
            if length == 0:
                raise self._error("zero-length packet")
            if length > self._max_packet_size:
                raise self._error(f"packet of {length} bytes is over the {self._max_packet_size} byte limit")
            self._length = length
        data = self._buffer.take(self._length)
        if data is None:
            return None
        self._length = None
        return data[:1], data[1:]

    def clear(self) -> None:
        """Drop everything buffered, a partly read packet included."""
        self._buffer.clear()
        self._length = None

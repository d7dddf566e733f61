"""The storage interface every kind of learnt state goes through, and helpers for keys.

A store holds *records*: a key (a namespaced string, ``grey:...``, ``rep:...``) names a small
mapping of field names to text, with an optional time to live. The operations are the few
that Redis does natively on a hash and that SQLite does in one transaction, so both backends
give the same guarantees:

* `StateStore.incr_fields` adds to numeric fields atomically, even with many workers and
  machines incrementing the same record at once;
* `StateStore.set_fields` merges fields into a record (fields not named are kept);
* a ``ttl`` (seconds) on a write makes the whole record expire that long after the write;
  ``ttl=None`` leaves the record's expiry as it was (none for a new record);
* an expired record is never returned, whether or not it has been swept yet.

Values are text; numbers written by the store (increments, or ints and floats given to
`set_fields`) are formatted the same way by both backends (`format_number`).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncIterator, Mapping
from typing import Literal, Protocol, runtime_checkable

__all__ = ["FieldValue", "StateStore", "format_number", "ip_block", "text_fields"]

FieldValue = str | int | float
"""What `StateStore.set_fields` accepts for a field; it is stored as text."""


@runtime_checkable
class StateStore(Protocol):
    """Small keyed records with time to live, shared by every worker (and, with Redis, every
    machine). Made without I/O: nothing is opened before the first operation, so a store built
    before the daemon forks is safe to use in each worker. Use it from one event loop."""

    @property
    def backend(self) -> Literal["sqlite", "redis"]: ...

    async def get_fields(self, key: str) -> dict[str, str] | None:
        """The record's fields, or None when there is no (unexpired) record."""
        ...

    async def set_fields(self, key: str, fields: Mapping[str, FieldValue], *, ttl: float | None = None) -> None:
        """Merge ``fields`` into the record (creating it); ``ttl`` as in the module docstring."""
        ...

    async def incr_fields(self, key: str, deltas: Mapping[str, float], *, ttl: float | None = None) -> dict[str, float]:
        """Add each delta to its field (absent = 0) atomically; returns the new values.

        Raises ValueError when a field holds text that is not a number."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the record; True if there was one."""
        ...

    def scan(self, prefix: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """Every unexpired record whose key starts with ``prefix``, in no particular order."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the store cannot be used afterwards."""
        ...


def format_number(value: float) -> str:
    """A number as stored: integral values without a fraction (``3``), others as ``repr``."""
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def text_fields(fields: Mapping[str, FieldValue]) -> dict[str, str]:
    """``fields`` with every value as stored text. Raises ValueError for an empty mapping."""
    if not fields:
        raise ValueError("expected at least one field")
    return {name: value if isinstance(value, str) else format_number(value) for name, value in fields.items()}


def ip_block(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str | None:
    """The network of ``ip`` at the given prefix length, as text (``192.0.2.0/24``); an
    IPv4-mapped IPv6 address counts as IPv4. None when ``ip`` is not an address."""
    try:
        address = ipaddress.ip_address(ip.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((address, prefix), strict=False))

"""The SMTP client's name, found the way Postfix's smtpd finds it (smtpd_peer.c):

    peer = await lookup_peername(resolver, "192.0.2.1", budget=5.0)
    peer.name           # "mx.example.org" once forward-confirmed, else "unknown"
    peer.reverse_name   # what the PTR record says, unverified ("unknown" if nothing usable)

1. PTR lookup of the address. No answer, or a name that is malformed or numeric (an
   attacker's PTR can say anything, "192.0.2.1" or text with spaces and parentheses that
   would land in our Received header): both names are "unknown".
2. Forward confirmation (FCrDNS): the PTR name's A (AAAA for an IPv6 client) records must
   include the client's address. If they do not, the name is "unknown" but the PTR name is
   kept as ``reverse_name`` (Postfix's reverse_client_name, the milter's {client_ptr}).

Several PTR records: each is tried (up to `MAX_PTR_NAMES`, at once) and the first that confirms
wins. The whole lookup ends within ``budget`` seconds; a DNS failure is never an error, only
"unknown" with ``status`` TEMP. With a `DnsBreaker`, a resolver found dead is not asked (TEMP at
once), and whether the PTR query got any answer is recorded in it. ``status`` uses the words of
the milter macro {client_resolve}: OK, FORGED (the PTR name does not lead back), TEMP (DNS failed
or ran out of time), FAIL (no usable PTR name).
"""

from __future__ import annotations

__all__ = ["MAX_PTR_NAMES", "UNKNOWN", "PeerName", "lookup_peername", "valid_hostname"]

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from filterd.mta.mx import Resolver
from filterd.net.dns import DnsAnswer

UNKNOWN = "unknown"  # Postfix's name for "no name", in logs, Received headers and macros
MAX_PTR_NAMES = 4  # an address with more PTR records than this is not worth more lookups

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # Postfix's valid_hostname allows "_"

Resolve = Literal["OK", "FORGED", "TEMP", "FAIL"]


@dataclass(frozen=True, slots=True)
class PeerName:
    """What DNS says about a client address. ``detail``: why a name is unknown, for the log
    ("" when there is nothing to say: no PTR record, or the name confirmed)."""

    name: str = UNKNOWN
    reverse_name: str = UNKNOWN
    status: Resolve = "FAIL"
    detail: str = ""


def valid_hostname(text: str) -> str:
    """``text`` (a PTR record's target) lower-cased without its final dot, or "" when it is no
    usable host name: malformed, too long, or all numeric (it would pass for an address)."""
    name = text.lower().removesuffix(".")
    if not name or len(name) > 253:
        return ""
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or all(label.isdigit() for label in labels):
        return ""
    return name


async def lookup_peername(resolver: Resolver, client_ip: str, *, budget: float) -> PeerName:
    """The client's names (see the module's docstring); never raises for DNS trouble and
    returns within ``budget`` seconds."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return PeerName(detail=f"not an IP address: {client_ip!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget

    def left() -> float:  # each lookup gets what remains of the budget; the resolver holds to it
        return deadline - loop.time()

    # No breaker zone: one client's broken reverse zone must not stop lookups for the others.
    ptr = await resolver.query(address.reverse_pointer, "PTR", limit=left())
    if not ptr.ok:  # no PTR is common and needs no word in the log; a failed lookup does
        return PeerName(status="TEMP", detail=f"PTR lookup: {_failure(ptr)}") if ptr.temporary else PeerName()
    records = sorted(ptr.records)[:MAX_PTR_NAMES]  # sorted: the same reverse_name every time
    names = list(dict.fromkeys(n for n in map(valid_hostname, records) if n))
    if not names:
        return PeerName(detail=f"malformed or numeric name in PTR: {', '.join(records)}")
    rdtype = "A" if address.version == 4 else "AAAA"
    answers = await asyncio.gather(*(resolver.query(name, rdtype, limit=left()) for name in names))
    for name, answer in zip(names, answers, strict=True):
        if answer.ok and any(_same_address(address, record) for record in answer.records):
            return PeerName(name, name, "OK")
    # Postfix: FORGED unless the forward lookup failed for now (then it may yet confirm: TEMP).
    temporary = any(answer.temporary for answer in answers)
    why = "; ".join(f"{name} {rdtype}: {_failure(answer)}" for name, answer in zip(names, answers, strict=True))
    return PeerName(reverse_name=names[0], status="TEMP" if temporary else "FORGED", detail=why)


def _same_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, record: str) -> bool:
    try:
        return ipaddress.ip_address(record) == address  # IPv6 text has many spellings
    except ValueError:
        return False


def _failure(answer: DnsAnswer) -> str:
    if answer.ok:
        return f"{', '.join(answer.records)} only"
    return f"{answer.status}{': ' + answer.detail if answer.detail else ''}"

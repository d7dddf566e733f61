"""Where to relay mail for a domain: its MX hosts and their addresses, in the order to try.

    hops = await next_hops(resolver, "example.org", rng=random.Random())

RFC 5321 §5.1: MX records in preference order, lowest first, shuffled among equal preferences
so that load spreads; a domain without MX records (NODATA) is its own mail server (the
"implicit MX", its A/AAAA addresses with preference 0); a domain that does not exist is a
permanent failure. RFC 7505: a null MX (one record, preference 0, target ".") says the domain
takes no mail at all: bounce at once with 5.1.10, never connect.

Each host's IPv4 addresses come before its IPv6 ones (loopback tests and many hosts have no
IPv6 route; a v4-first order fails fast). Failures raise `TemporaryDeliveryError` (DNS timed out
or failed: try later) or `PermanentDeliveryError` (the name definitely has nowhere to deliver),
each with an RFC 3463 status. With a `DnsBreaker` that found the resolver dead, the MX lookup
is not made: `TemporaryDeliveryError` at once.
"""

from __future__ import annotations

__all__ = ["MAX_ADDRESSES", "NextHop", "Resolver", "next_hops", "parse_mx"]

import asyncio
import ipaddress
import itertools
import random
from dataclasses import dataclass
from typing import Protocol

from filterd.errors import PermanentDeliveryError, TemporaryDeliveryError
from filterd.net.dns import DnsAnswer

# Addresses tried per delivery attempt at most, across all MX hosts (Postfix's
# smtp_mx_address_limit is 5; a few more cover hosts with both IPv4 and IPv6).
MAX_ADDRESSES = 10


class Resolver(Protocol):
    """What the MTA needs of a DNS resolver (`filterd.net.dns.Resolver`, or a fake in tests)."""

    async def query(self, name: str, rdtype: str, *, zone: str = "", limit: float | None = None) -> DnsAnswer: ...


@dataclass(frozen=True, slots=True)
class NextHop:
    """One address to try: the MX host's name (the domain itself for an implicit MX)."""

    host: str
    preference: int
    address: str

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]"


def parse_mx(record: str) -> tuple[int, str] | None:
    """``"10 mx.example.org."`` as (10, "mx.example.org"); "." stays "." (null MX); None if malformed."""
    pref, _, host = record.strip().partition(" ")
    if not pref.isdigit() or not host.strip():
        return None
    host = host.strip().lower()
    return int(pref), host if host == "." else host.rstrip(".")


def _address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3) as an address, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def _addresses(resolver: Resolver, host: str) -> tuple[list[str], bool, str]:
    """``host``'s IPv4 then IPv6 addresses; whether a lookup failed temporarily; the failure text."""
    answers = await asyncio.gather(resolver.query(host, "A"), resolver.query(host, "AAAA"))
    addresses = [r for a in answers if a.ok for r in a.records]
    failed = [a for a in answers if a.temporary]
    detail = "; ".join(f"{a.rdtype} {a.status}{': ' + a.detail if a.detail else ''}" for a in failed)
    return addresses, bool(failed), detail


async def next_hops(resolver: Resolver, domain: str, *, rng: random.Random) -> list[NextHop]:
    """The addresses to try for ``domain``, best first (at most `MAX_ADDRESSES`)."""
    literal = _address_literal(domain)
    if literal is not None:
        return [NextHop(domain, 0, literal)]
    domain = domain.lower().rstrip(".")
    mx = await resolver.query(domain, "MX")
    if mx.status == "nxdomain":
        raise PermanentDeliveryError(f"Host or domain name not found: {domain} (MX: NXDOMAIN)", "5.1.2")
    if mx.temporary:
        raise TemporaryDeliveryError(f"MX lookup for {domain} failed: {mx.status} {mx.detail}".rstrip(), "4.4.3")
    if mx.status == "nodata":  # the implicit MX
        addresses, failed, detail = await _addresses(resolver, domain)
        if addresses:
            return [NextHop(domain, 0, a) for a in addresses[:MAX_ADDRESSES]]
        if failed:
            raise TemporaryDeliveryError(f"address lookup for {domain} failed: {detail}", "4.4.3")
        raise PermanentDeliveryError(f"{domain} has no MX and no address records", "5.1.2")

    records = [r for r in (parse_mx(text) for text in mx.records) if r is not None]
    if any(host == "." for _, host in records):
        real = [r for r in records if r[1] != "."]
        if not real:  # RFC 7505 §3: a null MX is alone; with others it is only a broken record
            raise PermanentDeliveryError(f"{domain} accepts no mail (null MX, RFC 7505)", "5.1.10")
        records = real
    if not records:
        raise TemporaryDeliveryError(f"MX records of {domain} are unreadable: {mx.records!r}", "4.4.3")
    # Lowest preference first; a random order among equal ones spreads the load (RFC 5321 §5.1).
    records.sort(key=lambda r: r[0])
    ordered: list[tuple[int, str]] = []
    for _, group in itertools.groupby(records, key=lambda r: r[0]):
        same = list(group)
        rng.shuffle(same)
        ordered += same
    looked_up = await asyncio.gather(*(_addresses(resolver, host) for _, host in ordered))
    hops: list[NextHop] = []
    temp_details = []
    for (pref, host), (addresses, failed, detail) in zip(ordered, looked_up, strict=True):
        hops += [NextHop(host, pref, a) for a in addresses]
        if failed:
            temp_details.append(f"{host}: {detail}")
    if hops:
        return hops[:MAX_ADDRESSES]
    if temp_details:
        raise TemporaryDeliveryError(f"no address for the MX hosts of {domain}: {'; '.join(temp_details)}", "4.4.3")
    hosts = ", ".join(host for _, host in ordered)
    raise PermanentDeliveryError(f"the MX hosts of {domain} have no addresses ({hosts})", "5.4.4")

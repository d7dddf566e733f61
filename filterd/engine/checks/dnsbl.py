"""DNS blocklists: relay addresses (DNSBL) and domain names (URIBL, RHSBL) looked up in DNS.

Each enabled zone of `dnsbl.zones` is asked about what its type says:

- ``type: ip``: the last external relay of the trust path (``relays: last_external``: the one
  that handed the message to our internal network, a trusted partner's relay included), the
  first untrusted one (``first_untrusted``: the one that handed it to the trusted relays, whose
  address a trusted relay wrote down; SpamAssassin's ``-firsttrusted``, for allowlists) or every
  untrusted relay (``all_untrusted``), as ``7.2.0.192.zen.spamhaus.org`` (octets reversed) or,
  for IPv6, its 32 nibbles reversed (RFC 5782). Private and reserved addresses are never asked.
- ``type: domain``: registered domains (the public suffix list decides, through the engine's
  URI parser) from the zone's ``sources``: ``helo`` (the last external relay's HELO name),
  ``sender`` (envelope sender, else Return-Path), ``from`` (From:), ``uri`` (body links, most
  frequent first). The few header domains go first, then URI domains, up to
  ``dnsbl.max_domains`` per zone. Numeric URI hosts are not asked of domain lists: some refuse
  IP queries outright (DBL answers 127.0.1.255) and the URI checks score numeric hosts already.

An answer maps to rules by ``answers`` (exact address) first, then ``last_octet`` (the last
octet's value, whatever the rest: DNSWL's 127.0.<category>.<trust>) and ``bitmask`` (each set bit
of the last octet that has a rule fires it), then ``any_answer``. Answers outside 127.0.0.0/8
that ``answers`` does not name are ignored: that is a resolver rewriting NXDOMAIN, not a listing.

An allowlist is a zone like the others whose rules are ``nice`` (negative scores): the shipped
``dnswl`` zone (list.dnswl.org) fires RCVD_IN_DNSWL_NONE/LOW/MED/HI for trust 0..3 of the first
untrusted relay.

Lists refuse queries from big public resolvers and answer with a special code instead
(``blocked_answers``). Such an answer never fires a listing rule: the zone is marked blocked in
the resolver's zone health (metrics show it), a warning is logged once, and the zone's
``blocked_rule`` (zero score: DNSBL_BLOCKED, or RCVD_IN_DNSWL_BLOCKED for DNSWL's 127.0.0.255)
shows it in the report. A normal answer later clears the mark.

All lookups of a message run at once; the check returns what arrived before the scan's
deadline and records the rest in ``scan.problems``.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from filterd.config import DnsblConfig, DnsblZone
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.trust import connection_trust_path, trust_path_of
from filterd.net.dns import DnsAnswer

__all__ = ["CONNECT_DONE", "DnsblCheck", "DnsblConnectCheck", "answer_rules", "reversed_ip", "zone_rules"]

log = logging.getLogger(__name__)

BLOCKED_RULE = "DNSBL_BLOCKED"
CONNECT_DONE = "dnsbl_connect_ip"  # scan.facts key: the client looked up at connect
_MAX_RELAYS = 16  # all_untrusted: a forged chain of 100 Received headers asks 16 at most
_MARGIN = 0.02  # seconds kept before the scan deadline so the engine never cancels us first
_LISTING_RANGE = ipaddress.ip_network("127.0.0.0/8")
_DOMAIN = re.compile(r"^(?=.{4,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


def reversed_ip(ip: str) -> str | None:
    """The DNSBL query label of a routable address (``192.0.2.7`` -> ``7.2.0.192``, IPv6 by
    nibbles); None for private, reserved or unreadable ones."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_global:
        return None
    # reverse_pointer is "7.2.0.192.in-addr.arpa" / "<nibbles>.ip6.arpa"; the lists use the same order.
    return address.reverse_pointer.rpartition(".in-addr.arpa" if address.version == 4 else ".ip6.arpa")[0]


def answer_rules(zone: DnsblZone, answer: str) -> list[str]:
    """Rules one answer address fires in ``zone`` (blocked answers are the caller's business)."""
    exact = zone.answers.get(answer)
    if exact:
        return [exact]
    try:
        address = ipaddress.IPv4Address(answer)
    except ValueError:
        return []
    if address not in _LISTING_RANGE:
        return []
    last = int(address) & 0xFF
    by_value = zone.last_octet.get(str(last))
    found = [by_value] if by_value else []
    found += [rule for bit, rule in zone.bitmask.items() if last & int(bit) == int(bit)]
    if not found and zone.any_answer:
        found.append(zone.any_answer)
    return found


def zone_rules(config: DnsblConfig) -> frozenset[str]:
    """Every rule the configured zones can fire, their blocked rules, and DNSBL_BLOCKED."""
    names = {BLOCKED_RULE}
    for zone in config.zones.values():
        names.update(zone.answers.values())
        names.update(zone.last_octet.values())
        names.update(zone.bitmask.values())
        names.add(zone.blocked_rule)
        if zone.any_answer:
            names.add(zone.any_answer)
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class _Lookup:
    zone: DnsblZone
    subject: str  # what may be listed: an address or a domain
    qname: str


@dataclass(slots=True)
class _Listing:
    detail: str
    more: int = 0


def _domain_part(address: str) -> str:
    return address.strip().strip("<>").rpartition("@")[2].lower().rstrip(".")


class DnsblCheck:
    """Looks relays and domains up in the configured DNS blocklists."""

    name: ClassVar[str] = "dnsbl"
    stage: ClassVar[Stage] = Stage.BODY  # domain lists need the body's URIs
    autolearn_side: ClassVar[AutolearnSide] = "header"  # relays; the URI domain lists' rules are tflags autolearn_body
    # The shipped zones' rules; an instance adds those of zones the configuration brings, so that
    # a site's own list can fire rules it declares in its own rule files.
    emits: frozenset[str] = zone_rules(DnsblConfig())

    def __init__(self, setup: CheckSetup) -> None:
        config = setup.config
        self.emits = type(self).emits | zone_rules(config.dnsbl)
        self._resolver = setup.resolver
        self._network = config.network
        self._registered_domain = setup.uri_parser.registered_domain
        self._max_domains = config.dnsbl.max_domains
        self._timeout = config.dns.timeout
        self._zones = [z for z in config.dnsbl.zones.values() if z.enabled] if config.dnsbl.enabled else []

    async def run(self, scan: Scan) -> Sequence[Hit]:
        resolver = self._resolver
        if resolver is None or not self._zones or scan.ctx.local_only:
            return ()
        return await self._lookup(scan, self._plan(scan))

    async def _lookup(self, scan: Scan, lookups: list[_Lookup]) -> Sequence[Hit]:
        resolver = self._resolver
        assert resolver is not None
        if not lookups:
            return ()
        now = time.monotonic()
        deadline = scan.deadline or now + self._timeout + _MARGIN
        remaining = deadline - now - _MARGIN
        if remaining <= 0:
            scan.problems.append(f"dnsbl: no time left before the scan deadline for {len(lookups)} lookups")
            return ()
        tasks = {
            asyncio.ensure_future(resolver.query(lk.qname, "A", zone=lk.zone.zone, limit=remaining)): lk
            for lk in lookups
        }
        try:
            done, pending = await asyncio.wait(tasks, timeout=remaining)
        finally:
            for task in tasks:
                task.cancel()  # no-op for finished ones; the resolver keeps the lookups themselves going
        # In planned order (header domains first, then the most frequent), so details are stable.
        answers = [(lookup, task.result()) for task, lookup in tasks.items() if task in done]
        late = [lookup for task, lookup in tasks.items() if task in pending]
        return self._hits(scan, answers, late)

    # -- what to ask ------------------------------------------------------------------------------

    def _plan(self, scan: Scan) -> list[_Lookup]:
        trust = trust_path_of(scan, self._network)
        lookups: list[_Lookup] = []
        domains: dict[str, list[str]] | None = None
        asked_at_connect = scan.facts.get(CONNECT_DONE)
        for zone in self._zones:
            if zone.type == "ip":
                if zone.relays in ("last_external", "first_untrusted"):
                    if zone.relays == "last_external":
                        ips = [trust.last_external.ip] if trust.last_external is not None else []
                    else:
                        ips = trust.untrusted_ips[:1]
                    if asked_at_connect in ips:
                        continue  # DnsblConnectCheck looked this client up already
                else:
                    ips = [r.ip for r in trust.untrusted]
                labels = _unique((ip, label) for ip in ips if (label := reversed_ip(ip)) is not None)
                lookups += [_Lookup(zone, ip, f"{label}.{zone.zone}") for ip, label in labels[:_MAX_RELAYS]]
            else:
                if domains is None:
                    domains = self._domains(scan)
                ordered = [d for source in ("helo", "sender", "from", "uri") if source in zone.sources
                           for d in domains[source]]  # fmt: skip
                names = [d for d, _ in _unique((d, d) for d in ordered)][: self._max_domains]
                lookups += [_Lookup(zone, d, f"{d}.{zone.zone}") for d in names]
        return lookups

    def _domains(self, scan: Scan) -> dict[str, list[str]]:
        """Registered domains by source; ``uri`` most frequent first."""
        msg = scan.message
        ctx = scan.ctx
        trust = trust_path_of(scan, self._network)
        found: dict[str, list[str]] = {"helo": [], "sender": [], "from": [], "uri": []}
        if trust.last_external is not None:
            helo = trust.last_external.helo
        else:
            helo = "" if trust.from_connection else ctx.helo  # an internal connection: nothing to judge
        self._add_domain(found["helo"], helo.lower().rstrip("."))
        sender = ctx.mail_from if ctx.mail_from is not None else msg.get("return-path")
        if sender:
            self._add_domain(found["sender"], _domain_part(sender))
        for _, address in msg.addresses("from"):
            self._add_domain(found["from"], _domain_part(address))
        counts = collections.Counter(self._registered_domain(u.host) for u in msg.uris if not u.ip_literal and u.host)
        for domain, _ in counts.most_common():
            self._add_domain(found["uri"], domain)
        return found

    def _add_domain(self, into: list[str], host: str) -> None:
        if not host or _is_ip(host) or not _DOMAIN.match(host):
            return
        domain = self._registered_domain(host)
        if domain and domain not in into and _DOMAIN.match(domain):
            into.append(domain)

    # -- what the answers mean --------------------------------------------------------------------

    def _hits(self, scan: Scan, answers: list[tuple[_Lookup, DnsAnswer]], late: list[_Lookup]) -> list[Hit]:
        assert self._resolver is not None
        listings: dict[str, _Listing] = {}
        blocked: dict[str, tuple[str, str]] = {}  # zone -> (what it answered, the zone's blocked rule)
        answered: set[str] = set()  # zones that gave a normal answer this time
        failed: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for lookup, answer in answers:
            zone = lookup.zone
            if answer.status in ("nxdomain", "nodata"):
                answered.add(zone.zone)
                continue
            if not answer.ok:
                failed[zone.zone][answer.status] += 1
                continue
            refused = [a for a in answer.records if a in zone.blocked_answers]
            if refused:
                blocked.setdefault(zone.zone, (refused[0], zone.blocked_rule))
                continue
            answered.add(zone.zone)
            for record in answer.records:
                for rule in answer_rules(zone, record):
                    detail = f"listed in {zone.zone}: {lookup.subject} -> {record}"
                    if rule in listings:
                        listings[rule].more += 1
                    else:
                        listings[rule] = _Listing(detail)
        hits = [Hit(rule, f"{x.detail} (+{x.more} more)" if x.more else x.detail) for rule, x in listings.items()]
        for zone_name, (code, _) in blocked.items():
            if self._resolver.mark_blocked(zone_name):
                log.warning(
                    "%s answered %s: this resolver is blocked by the list (a public or open resolver, or over the "
                    "list's free query limit?); "
                    "its results are ignored until it answers normally again. Use a recursive resolver "
                    "of your own (dns.nameservers).",
                    zone_name, code,
                )  # fmt: skip
        by_rule: dict[str, list[str]] = {}
        for zone_name, (code, rule) in blocked.items():
            by_rule.setdefault(rule, []).append(f"{zone_name} answered {code}")
        for rule, shown in by_rule.items():
            hits.append(Hit(rule, f"{', '.join(shown)}: this resolver is refused; the list is unusable"))
        for zone_name in answered - blocked.keys():
            health = self._resolver.zones.get(zone_name)
            if health is not None and health.blocked and self._resolver.mark_blocked(zone_name, False):
                log.warning("%s answers this resolver normally again; its listings count again", zone_name)
        for zone_name, counts in failed.items():
            what = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            scan.problems.append(f"dnsbl: {zone_name}: lookups failed ({what})")
        if late:
            zones = ", ".join(sorted({lk.zone.zone for lk in late}))
            scan.problems.append(f"dnsbl: {len(late)} lookups unanswered at the scan deadline ({zones})")
        return hits


def _unique(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for key, value in pairs:
        if value not in seen:
            seen.add(value)
            out.append((key, value))
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return False
    return True


class DnsblConnectCheck(DnsblCheck):
    """The IP lists of the last external (or first untrusted) relay, at connect, when a milter or
    MTA names the client: zones asking about the last external relay ask about an external
    client, and zones asking about the first untrusted one about an untrusted client.

    That lets a milter refuse a listed client before MAIL FROM (milter.reject_at_connect). With
    the message already known (spamd, `filterd check`) it does nothing and DnsblCheck asks
    everything at once, so the lookups overlap.
    """

    name: ClassVar[str] = "dnsbl_connect"
    stage: ClassVar[Stage] = Stage.CONNECT

    async def run(self, scan: Scan) -> Sequence[Hit]:
        ctx = scan.ctx
        if self._resolver is None or scan.msg is not None or not ctx.client_ip or ctx.local_only:
            return ()
        path = connection_trust_path(scan, self._network)
        if path.last_external is None:
            return ()  # an internal client: the Received headers will say who is behind it
        label = reversed_ip(ctx.client_ip)
        asks = ("last_external", "first_untrusted") if path.untrusted else ("last_external",)
        zones = [z for z in self._zones if z.type == "ip" and z.relays in asks]
        if label is None or not zones:
            return ()
        scan.facts[CONNECT_DONE] = ctx.client_ip
        return await self._lookup(scan, [_Lookup(z, ctx.client_ip, f"{label}.{z.zone}") for z in zones])

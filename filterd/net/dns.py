"""DNS for the network checks: dnspython's async resolver behind a TTL cache and circuit breakers.

One `Resolver` per worker process is shared by every scan in it:

    resolver = Resolver(config.dns)
    answer = await resolver.query("2.0.0.127.zen.spamhaus.org", "A", zone="zen.spamhaus.org", limit=0.5)
    if answer.ok: ...answer.records...

- Answers are cached for their TTL (clamped to min_ttl..max_ttl); NXDOMAIN and empty answers
  for the SOA minimum (or ``negative_ttl``). Concurrent identical queries share one lookup.
- Every lookup has a time limit (``dns.timeout``; the caller may pass a shorter one).
- A circuit breaker per ``zone`` (any key the caller names: a DNSBL zone, "spf", ...) opens
  after ``breaker_failures`` consecutive timeouts or server failures; while open, queries for
  that zone are answered SKIPPED at once, and after ``breaker_cooldown`` one query probes it.
- Failures never raise: the answer's ``status`` says what happened.

Synchronous libraries (pyspf) run in a thread and call `query_from_thread`, which hands the
lookup to the event loop, so they share the cache and the breakers.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from filterd.config import DnsConfig

__all__ = ["DnsAnswer", "Resolver", "Status", "ZoneHealth", "parse_nameserver"]

log = logging.getLogger(__name__)

Status = Literal["ok", "nxdomain", "nodata", "timeout", "servfail", "skipped", "error"]


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What a lookup found. ``records`` are text: addresses, TXT strings joined, "10 mx." for MX."""

    name: str
    rdtype: str
    status: Status
    records: tuple[str, ...] = ()
    ttl: float = 0.0
    cached: bool = False
    detail: str = ""

    @property
    def ok(self) -> bool:
        """The name has records of this type (status "ok")."""
        return self.status == "ok"

    @property
    def exists(self) -> bool:
        """A definite answer: records, NXDOMAIN or no data (not a failure)."""
        return self.status in ("ok", "nxdomain", "nodata")

    @property
    def temporary(self) -> bool:
        """Nothing is known: timeout, server failure, skipped zone, or another error."""
        return not self.exists


@dataclass(slots=True)
class ZoneHealth:
    """Per-zone counters and the breaker's state, for logs and metrics."""

    queries: int = 0
    failures: int = 0  # all timeouts and server failures
    consecutive_failures: int = 0
    open_until: float = 0.0  # monotonic time; 0 = closed
    probing: bool = False
    trips: int = 0
    skipped: int = 0
    blocked: bool = False  # a DNSBL answered "you may not use me from this resolver"
    last_error: str = ""
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT`` or ``[V6]:PORT`` as (address, port). Raises ValueError."""
    spec = spec.strip()
    if spec.startswith("["):
        addr, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif spec.count(":") == 1:
        addr, _, port_text = spec.partition(":")
        port = int(port_text)
    else:
        addr, port = spec, 53
    ipaddress.ip_address(addr)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in nameserver {spec!r}")
    return addr, port


class Resolver:
    """Cached, time-limited, breaker-guarded DNS lookups on one event loop."""

    def __init__(self, config: DnsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        if config.nameservers:
            inner = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for spec in config.nameservers:
                addr, port = parse_nameserver(spec)
                servers.append(dns.nameserver.Do53Nameserver(addr, port))
            inner.nameservers = servers
        else:
            inner = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        inner.cache = None  # ours honours negative TTLs and is bounded
        inner.retry_servfail = False
        self._inner = inner
        self._cache: collections.OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = collections.OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        self.zones: dict[str, ZoneHealth] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public ---------------------------------------------------------------------------

    async def query(self, name: str, rdtype: str, *, zone: str = "", limit: float | None = None) -> DnsAnswer:
        """Look ``name`` up (never raises). ``zone`` names the breaker and statistics to use."""
        self._loop = asyncio.get_running_loop()
        key = (name.lower().rstrip("."), rdtype.upper())
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(key)
                answer = cached[1]
                return DnsAnswer(answer.name, answer.rdtype, answer.status, answer.records,
                                 max(0.0, cached[0] - now), True, answer.detail)  # fmt: skip
            del self._cache[key]
        health = self.zones.setdefault(zone, ZoneHealth()) if zone else None
        if health is not None and not self._may_ask(health, now):
            health.skipped += 1
            return DnsAnswer(key[0], key[1], "skipped", detail=f"zone {zone} skipped: {health.last_error}")
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[DnsAnswer] = self._loop.create_future()
        self._inflight[key] = future
        try:
            answer = await self._ask(key[0], key[1], limit, health)
            future.set_result(answer)
        except BaseException as exc:  # cancelled: waiters sharing the lookup get the same
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[key]
        return answer

    def query_from_thread(self, name: str, rdtype: str, *, zone: str = "", limit: float | None = None) -> DnsAnswer:
        """`query` for code running in a worker thread while the loop runs elsewhere."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the resolver has not been used from its event loop yet")
        wait = (limit or self.config.timeout) + 1.0
        coro = self.query(name, rdtype, zone=zone, limit=limit)
        return asyncio.run_coroutine_threadsafe(coro, loop).result(wait)

    def bind_loop(self) -> None:
        """Remember the running loop (call from it before handing work to threads)."""
        self._loop = asyncio.get_running_loop()

    def mark_blocked(self, zone: str, blocked: bool = True) -> bool:
        """Record that ``zone`` refuses this resolver; True when that is news (to log once)."""
        health = self.zones.setdefault(zone, ZoneHealth())
        news = health.blocked != blocked
        health.blocked = blocked
        return news

    # -- internals ------------------------------------------------------------------------

    def _may_ask(self, health: ZoneHealth, now: float) -> bool:
        if not health.open_until:
            return True
        if now < health.open_until or health.probing:
            return False
        health.probing = True  # half open: this one query decides
        return True

    async def _ask(self, name: str, rdtype: str, wanted: float | None, health: ZoneHealth | None) -> DnsAnswer:
        limit = min(wanted, self.config.timeout) if wanted else self.config.timeout
        started = self._clock()
        try:
            result = await self._inner.resolve(
                name, rdtype, lifetime=limit, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            qnames = exc.qnames()  # type: ignore[no-untyped-call]
            response = exc.response(qnames[0]) if qnames else None  # type: ignore[no-untyped-call]
            answer = DnsAnswer(name, rdtype, "nxdomain", ttl=self._negative_ttl(response))
        except dns.resolver.LifetimeTimeout:
            answer = DnsAnswer(name, rdtype, "timeout", detail=f"no answer within {limit * 1000:.0f} ms")
        except dns.resolver.NoNameservers as exc:
            answer = DnsAnswer(name, rdtype, "servfail", detail=_short(exc))
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            answer = DnsAnswer(name, rdtype, "error", detail=_short(exc))
        else:
            rrset = result.rrset
            if rrset is None:
                answer = DnsAnswer(name, rdtype, "nodata", ttl=self._negative_ttl(result.response))
            else:
                records = tuple(_text(rdata) for rdata in rrset)
                ttl = min(max(float(rrset.ttl), self.config.min_ttl), self.config.max_ttl)
                answer = DnsAnswer(name, rdtype, "ok", records, ttl)
        if health is not None:
            self._account(health, answer, self._clock() - started)
        if answer.exists and self.config.cache_entries and answer.ttl > 0:
            self._cache[(name, rdtype)] = (self._clock() + answer.ttl, answer)
            while len(self._cache) > self.config.cache_entries:
                self._cache.popitem(last=False)
        return answer

    def _account(self, health: ZoneHealth, answer: DnsAnswer, elapsed: float) -> None:
        health.queries += 1
        health.latencies.append(elapsed)
        if answer.exists:
            if health.open_until:
                log.info("DNS zone answers again; using it again")
            health.consecutive_failures = 0
            health.open_until = 0.0
            health.probing = False
            return
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = f"{answer.status}: {answer.detail}"
        if health.probing or health.consecutive_failures >= self.config.breaker_failures:
            if not health.open_until or health.probing:
                health.trips += 1
                log.warning(
                    "DNS lookups for %s failed %d times in a row (%s); skipping it for %.0f s",
                    answer.name, health.consecutive_failures, health.last_error, self.config.breaker_cooldown,
                )  # fmt: skip
            health.open_until = self._clock() + self.config.breaker_cooldown
            health.probing = False

    def _negative_ttl(self, response: dns.message.Message | None) -> float:
        ttl = float(self.config.negative_ttl)
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    ttl = min(ttl, float(rrset.ttl), float(rrset[0].minimum))
        return min(max(ttl, self.config.min_ttl), self.config.max_ttl)


def _text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:  # TXT: the character-strings of one record are concatenated
        return b"".join(strings).decode("utf-8", "replace")
    return str(rdata)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]

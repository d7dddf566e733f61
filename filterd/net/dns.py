"""DNS for the network checks: dnspython's async resolver behind a TTL cache and circuit breakers.

One `Resolver` per worker process is shared by every scan in it:

    resolver = Resolver(config.dns)
    answer = await resolver.query("2.0.0.127.zen.spamhaus.org", "A", zone="zen.spamhaus.org", limit=0.5)
    if answer.ok: ...answer.records...

- Answers are cached for their TTL (clamped to min_ttl..max_ttl); NXDOMAIN and empty answers
  for min(SOA TTL, SOA minimum) as RFC 2308 says (``negative_ttl`` when no SOA came back).
  Concurrent identical queries share one lookup.
- Every lookup has a time limit (``dns.timeout``; the caller may pass a shorter one). A caller
  that stops waiting (its scan's deadline) does not stop the lookup: its answer still feeds
  the cache and the breaker.
- A circuit breaker per ``zone`` (any key the caller names: a DNSBL zone, "spf", ...) opens
  after ``breaker_failures`` consecutive timeouts or server failures; while open, queries for
  that zone are answered SKIPPED at once, and after ``breaker_cooldown`` one query probes it.
- Optionally (`guard_resolver`, for ``filterd mta``) a breaker over the resolver as a whole
  (`filterd.net.dnsbreaker`): a resolver found dead — timeouts in a row, and no answer to
  `ping` — is not asked for a while: lookups not in the cache are answered SKIPPED at once.
- Failures never raise: the answer's ``status`` says what happened.

Synchronous libraries (pyspf) run in a thread and call `query_from_thread`, which hands the
lookup to the event loop, so they share the cache and the breakers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
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
from filterd.net.dnsbreaker import PING_LIMIT, DnsBreaker

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

    queries: int = 0  # lookups sent (cache hits and skipped ones are not)
    cached: int = 0  # answered from the cache
    failures: int = 0  # all timeouts and server failures
    consecutive_failures: int = 0
    open_until: float = 0.0  # clock time; 0 = closed
    probing: bool = False
    trips: int = 0
    skipped: int = 0
    blocked: bool = False  # a DNSBL answered "you may not use me from this resolver"
    last_error: str = ""
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))

    def state(self, now: float) -> Literal["closed", "open", "half-open"]:
        """The breaker: closed (asking), open (skipping), half-open (one probe may go)."""
        if not self.open_until:
            return "closed"
        return "open" if now < self.open_until or self.probing else "half-open"


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


Key = tuple[str, str]


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
        self._cache: collections.OrderedDict[Key, tuple[float, DnsAnswer]] = collections.OrderedDict()
        # One lookup per name in flight, run as its own task: a caller that gives up or is
        # cancelled (its scan hit the deadline) leaves it running for the cache and the breaker.
        self._inflight: dict[Key, asyncio.Task[DnsAnswer]] = {}
        self.zones: dict[str, ZoneHealth] = {}
        # Over the resolver as a whole (`guard_resolver`); None: every lookup is made.
        self.resolver_breaker: DnsBreaker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public ---------------------------------------------------------------------------

    async def query(self, name: str, rdtype: str, *, zone: str = "", limit: float | None = None) -> DnsAnswer:
        """Look ``name`` up (never raises). ``zone`` names the breaker and statistics to use;
        ``limit`` (seconds) shortens ``dns.timeout`` for this caller."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        key = (name.lower().rstrip("."), rdtype.upper())
        now = self._clock()
        health = self.zones.setdefault(zone, ZoneHealth()) if zone else None
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if expires > now:
                self._cache.move_to_end(key)
                if health is not None:
                    health.cached += 1
                return dataclasses.replace(answer, ttl=expires - now, cached=True)
            del self._cache[key]
        wait = self.config.timeout if limit is None else min(limit, self.config.timeout)
        if wait <= 0:
            return DnsAnswer(key[0], key[1], "timeout", detail="no time left to ask")
        task = self._inflight.get(key)
        if task is not None and task.get_loop() is loop:  # someone asked already: wait for that
            done, _ = await asyncio.wait({task}, timeout=wait)
            if not done:  # it was started with a longer limit than ours
                return DnsAnswer(key[0], key[1], "timeout", detail=f"no answer within {wait * 1000:.0f} ms")
            return task.result()
        probe = False
        if health is not None and health.open_until:
            if not self._may_ask(health, now):
                health.skipped += 1
                return DnsAnswer(key[0], key[1], "skipped", detail=f"zone {zone} skipped: {health.last_error}")
            probe = True
        if self.resolver_breaker is not None and not self.resolver_breaker.allow():
            return DnsAnswer(key[0], key[1], "skipped", detail="DNS resolver not answering: lookup skipped")
        task = loop.create_task(self._lookup(key, wait, zone, health, probe))
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._forget, key))
        # The lookup ends by `wait` on its own; shielded, so that our being cancelled leaves it be.
        return await asyncio.shield(task)

    def guard_resolver(self, *, failures: int, cooldown: float) -> DnsBreaker:
        """Install a breaker over the resolver as a whole (`filterd.net.dnsbreaker`), confirmed by
        `ping`, or return the one installed already. Cached answers are served whatever it says;
        while it is open, lookups are answered "skipped" at once."""
        if self.resolver_breaker is None:

            async def confirm() -> bool:
                return await self.ping(min(PING_LIMIT, float(self.config.timeout)))

            self.resolver_breaker = DnsBreaker(failures=failures, cooldown=cooldown, confirm=confirm, clock=self._clock)
        return self.resolver_breaker

    async def ping(self, limit: float) -> bool:
        """Whether the resolver answers at all now, past the cache: one query for the root
        zone's NS records, which a recursive resolver always has at hand. Any response counts
        (REFUSED and SERVFAIL too: something is there and answering); none within ``limit``
        seconds, or only I/O errors, is False. It tells a dead resolver from slow or lame zones
        behind a live one, whose lookups time out as well."""
        try:
            async with asyncio.timeout(limit):
                await self._inner.resolve(".", "NS", lifetime=limit, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return True
        except dns.resolver.NoNameservers as exc:  # errors: (server, tcp, port, error, response)
            return any(len(error) > 4 and error[4] is not None for error in exc.kwargs.get("errors") or ())
        except (dns.exception.DNSException, OSError, ValueError, TimeoutError):
            return False
        return True

    def query_from_thread(self, name: str, rdtype: str, *, zone: str = "", limit: float | None = None) -> DnsAnswer:
        """`query` for code running in a worker thread while the resolver's loop runs elsewhere
        (call `bind_loop` from the loop first). Never raises for DNS problems."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the resolver has no event loop yet: call bind_loop() from it first")
        running = None
        with contextlib.suppress(RuntimeError):
            running = asyncio.get_running_loop()
        if running is loop:  # waiting here would block the very loop that must answer
            raise RuntimeError("query_from_thread called from the resolver's own loop; await query()")
        wait = self.config.timeout if limit is None else min(limit, self.config.timeout)
        key = (name.lower().rstrip("."), rdtype.upper())
        coro = self.query(name, rdtype, zone=zone, limit=limit)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            return DnsAnswer(key[0], key[1], "error", detail=_short(exc))
        try:
            # The slack covers handing the call over and back; the lookup itself is bounded by `wait`.
            return future.result(wait + 1.0)
        except TimeoutError:
            future.cancel()
            return DnsAnswer(key[0], key[1], "timeout", detail="the resolver's loop did not answer in time")

    def bind_loop(self) -> None:
        """Remember the running loop (call from it before handing work to threads)."""
        self._loop = asyncio.get_running_loop()

    def mark_blocked(self, zone: str, blocked: bool = True) -> bool:
        """Record that ``zone`` refuses this resolver (or no longer does); True when that is news."""
        health = self.zones.setdefault(zone, ZoneHealth())
        news = health.blocked != blocked
        health.blocked = blocked
        return news

    def breaker_state(self, zone: str) -> Literal["closed", "open", "half-open"]:
        """The state of ``zone``'s circuit breaker now."""
        health = self.zones.get(zone)
        return "closed" if health is None else health.state(self._clock())

    # -- internals ------------------------------------------------------------------------

    def _forget(self, key: Key, task: asyncio.Task[DnsAnswer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    def _may_ask(self, health: ZoneHealth, now: float) -> bool:
        if not health.open_until:
            return True
        if now < health.open_until or health.probing:
            return False
        health.probing = True  # half open: this one query decides
        return True

    async def _lookup(self, key: Key, limit: float, zone: str, health: ZoneHealth | None, probe: bool) -> DnsAnswer:
        try:
            answer = await self._ask(key[0], key[1], limit, zone, health)
            if self.resolver_breaker is not None:  # in the task: a caller that gave up does not lose it
                await self.resolver_breaker.record(timed_out=answer.status == "timeout")
            return answer
        finally:
            if probe and health is not None and health.probing:
                # A probe cancelled before it was accounted (its loop is shutting down): let
                # the next query probe instead of skipping the zone for ever.
                health.probing = False

    async def _ask(self, name: str, rdtype: str, limit: float, zone: str, health: ZoneHealth | None) -> DnsAnswer:
        started = self._clock()
        try:
            # dnspython may overrun its lifetime (it backs off between tries): hold it to the limit.
            async with asyncio.timeout(limit):
                result = await self._inner.resolve(name, rdtype, lifetime=limit, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            qnames = exc.qnames()  # type: ignore[no-untyped-call]
            response = exc.response(qnames[0]) if qnames else None  # type: ignore[no-untyped-call]
            answer = DnsAnswer(name, rdtype, "nxdomain", ttl=self._negative_ttl(response))
        except (dns.resolver.LifetimeTimeout, TimeoutError):
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
                # The chain's shortest TTL (a CNAME may expire before its target).
                ttl = min([float(rrset.ttl), *(float(r.ttl) for r in result.response.answer)])
                answer = DnsAnswer(name, rdtype, "ok", records, self._clamp(ttl))
        if health is not None:
            self._account(zone, health, answer, self._clock() - started)
        if answer.exists and self.config.cache_entries and answer.ttl > 0:
            self._cache[(name, rdtype)] = (self._clock() + answer.ttl, answer)
            self._cache.move_to_end((name, rdtype))
            while len(self._cache) > self.config.cache_entries:
                self._cache.popitem(last=False)
        return answer

    def _account(self, zone: str, health: ZoneHealth, answer: DnsAnswer, elapsed: float) -> None:
        health.queries += 1
        health.latencies.append(elapsed)
        if answer.exists:
            if health.open_until:
                log.info("DNS zone %s answers again; using it again", zone)
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
                    "DNS lookups in %s failed %d times in a row (last: %s); skipping it for %.0f s",
                    zone, health.consecutive_failures, health.last_error, self.config.breaker_cooldown,
                )  # fmt: skip
            health.open_until = self._clock() + self.config.breaker_cooldown
            health.probing = False

    def _negative_ttl(self, response: dns.message.Message | None) -> float:
        """RFC 2308 section 5: a negative answer lives min(SOA TTL, SOA MINIMUM); without an SOA
        in the authority section, ``negative_ttl``."""
        ttl = float(self.config.negative_ttl)
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    ttl = min(float(rrset.ttl), float(rrset[0].minimum))
                    break
        return self._clamp(ttl)

    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.config.min_ttl), self.config.max_ttl)


def _text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:  # TXT: the character-strings of one record are concatenated
        return b"".join(strings).decode("utf-8", "replace")
    return str(rdata)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]

"""Whether a DNS resolver is worth waiting for: a circuit breaker over the resolver as a whole
(`Resolver.guard_resolver` installs one; the per-zone breakers of `filterd.net.dns` are another
matter: one DNSBL failing says nothing about the others). ``filterd mta`` guards its resolver so
that a dead one stalls neither SMTP greetings nor the queue.

The resolver consults its cache first, then asks `allow`; a lookup it does make reports its
outcome to `record`:

    breaker = DnsBreaker(failures=5, cooldown=30.0, confirm=lambda: resolver.ping(1.0))
    if breaker.allow():                  # False: skip the lookup, the resolver is dead
        answer = ...                     # ask
        await breaker.record(timed_out=answer.status == "timeout")

A lookup that got no answer at all (a timeout) counts against the resolver; any answer, NXDOMAIN
and SERVFAIL included, shows that it is alive. After ``failures`` timeouts in a row the breaker
asks ``confirm`` whether the resolver answers at all (`Resolver.ping`): timeouts are ambiguous,
since a live recursive resolver may take longer than we wait for one lame zone — spam bots'
reverse zones, a bounce's dead domain — and those must not make the MTA call its resolver dead
and defer all outbound mail. Only when the resolver does not answer that either does the
breaker open: `allow` says False for ``cooldown`` seconds, then True to one caller, the probe,
whose answer closes it again; if the probe times out, ``confirm`` decides again whether to close
or to open for another ``cooldown``. Each change is logged once, and counted in
`DnsBreakerStats`. Without ``confirm`` the timeouts alone decide.
"""

from __future__ import annotations

__all__ = ["PING_LIMIT", "DnsBreaker", "DnsBreakerStats"]

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PING_LIMIT = 1.0  # seconds: a live resolver answers the root zone's NS from memory in milliseconds


@dataclass(slots=True)
class DnsBreakerStats:
    """Counters since start, for logs, tests and benchmarks."""

    trips: int = 0  # closed -> open: the resolver was found dead
    recoveries: int = 0  # open -> closed: it answered a probe (or any lookup) again
    probes: int = 0  # lookups let through while open, to see whether it is back
    skipped: int = 0  # lookups not made because it was dead
    false_alarms: int = 0  # timeouts enough to trip, but the resolver itself answered `confirm`


class DnsBreaker:
    """See the module docstring. ``failures`` 0: never opens."""

    def __init__(
        self,
        *,
        failures: int,
        cooldown: float,
        confirm: Callable[[], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.confirm = confirm
        self._confirming = False
        self.stats = DnsBreakerStats()
        self._clock = clock
        self._consecutive = 0
        self._open_until = 0.0  # 0: closed
        self._probe_since = 0.0  # 0: no probe in flight

    @property
    def is_open(self) -> bool:
        """The resolver was found dead and has not answered since (half-open included)."""
        return bool(self._open_until)

    def allow(self) -> bool:
        """Whether to ask DNS now (False: skip, counted). While open, True once per ``cooldown``."""
        if not self._open_until:
            return True
        now = self._clock()
        # A probe that never reported (its caller was cancelled) must not block the next one.
        probing = self._probe_since and now - self._probe_since < self.cooldown
        if now < self._open_until or probing:
            self.stats.skipped += 1
            return False
        self._probe_since = now
        self.stats.probes += 1
        return True

    async def record(self, *, timed_out: bool) -> None:
        """A lookup's outcome: no answer at all (``timed_out``), or some answer."""
        if not timed_out:
            self._answered()
            return
        if self._probe_since:  # the probe got no answer: dead still, unless the resolver says otherwise
            self._probe_since = 0.0
            self._open_until = self._clock() + self.cooldown  # the others keep skipping meanwhile
            if await self._resolver_answers():
                self._answered()
            elif self._open_until:  # another cool-off, from now
                self._open_until = self._clock() + self.cooldown
            return
        if self._open_until or not self.failures:
            return
        self._consecutive += 1
        if self._consecutive < self.failures or self._confirming:
            return
        if await self._resolver_answers():
            if self._consecutive:  # not reset by an answer meanwhile
                self.stats.false_alarms += 1
                log.info(
                    "%d DNS lookups in a row got no answer, but the resolver answers: slow or lame zones "
                    "(client reverse DNS, say), not a dead resolver; still looking names up",
                    self._consecutive,
                )
            self._consecutive = 0
            return
        if self._consecutive < self.failures or self._open_until:  # an answer came, or another caller tripped it
            return
        self.stats.trips += 1
        self._open_until = self._clock() + self.cooldown
        log.warning(
            "DNS resolver gave no answer to %d lookups in a row; not waiting for it for %.0f s "
            "(client names 'unknown', remote deliveries deferred), then one lookup tries it again",
            self._consecutive, self.cooldown,
        )  # fmt: skip

    def _answered(self) -> None:
        if self._open_until:
            self.stats.recoveries += 1
            log.warning("DNS resolver answers again; looking names up again")
        self._consecutive = 0
        self._open_until = self._probe_since = 0.0

    async def _resolver_answers(self) -> bool:
        """``confirm``'s verdict (one at a time: callers arriving meanwhile are not asked); without
        ``confirm``, False: the timeouts decide alone."""
        if self.confirm is None or self._confirming:
            return False
        self._confirming = True
        try:
            return await self.confirm()
        finally:
            self._confirming = False

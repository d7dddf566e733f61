"""Whether the MTA's DNS resolver is worth waiting for: a circuit breaker over the resolver as a
whole, one per ``filterd mta`` process (the SMTP server owns it; the queue manager reads it).

    breaker = DnsBreaker(failures=5, cooldown=30.0)
    if breaker.allow():                  # False: skip the lookup, the resolver is dead
        answer = await resolver.query(...)
        if not answer.cached:            # the cache says nothing about the resolver
            breaker.record(timed_out=answer.status == "timeout")

A lookup that got no answer at all (a timeout) counts against the resolver; any answer, NXDOMAIN
and SERVFAIL included, shows that it is alive (SERVFAIL and REFUSED come back at once: they cost
no waiting, and a client's broken reverse zone commonly gives them). After ``failures`` timeouts
in a row the breaker opens: `allow` says False for ``cooldown`` seconds, then True to one caller,
the probe, whose outcome closes it again or opens it for another ``cooldown``. Each change is
logged once, and counted in `DnsBreakerStats`.

Timeouts are ambiguous (a recursive resolver may take longer than we wait for one lame zone), so
a caller whose timeouts say little (the queue manager: a domain's dead name servers) passes
``count=False``: its timeouts then count only when it is the probe; its answers always count.
"""

from __future__ import annotations

__all__ = ["DnsBreaker", "DnsBreakerStats"]

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DnsBreakerStats:
    """Counters since start, for logs, tests and benchmarks."""

    trips: int = 0  # closed -> open: the resolver was found dead
    recoveries: int = 0  # open -> closed: it answered a probe (or any lookup) again
    probes: int = 0  # lookups let through while open, to see whether it is back
    skipped: int = 0  # lookups not made because it was dead


class DnsBreaker:
    """See the module docstring. ``failures`` 0: never opens."""

    def __init__(self, *, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown = cooldown
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

    def record(self, *, timed_out: bool, count: bool = True) -> None:
        """A lookup's outcome: no answer at all (``timed_out``), or some answer. ``count`` False:
        a timeout counts only if this lookup was the probe (see the module docstring)."""
        if not timed_out:
            if self._open_until:
                self.stats.recoveries += 1
                log.warning("DNS resolver answers again; looking names up again")
            self._consecutive = 0
            self._open_until = self._probe_since = 0.0
            return
        if self._probe_since:  # the probe failed: still dead, no news to log
            self._probe_since = 0.0
            self._open_until = self._clock() + self.cooldown
            return
        if not count or self._open_until or not self.failures:
            return
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self.stats.trips += 1
            self._open_until = self._clock() + self.cooldown
            log.warning(
                "DNS resolver gave no answer to %d lookups in a row; not waiting for it for %.0f s "
                "(client names 'unknown', remote deliveries deferred), then one lookup tries it again",
                self._consecutive, self.cooldown,
            )  # fmt: skip

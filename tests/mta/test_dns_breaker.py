"""The DNS breaker (`filterd.mta.dnsbreaker`) on a fake clock."""

from __future__ import annotations

import logging

import pytest

from filterd.mta.dnsbreaker import DnsBreaker

# -- the breaker on a fake clock ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(failures: int = 3, cooldown: float = 30.0) -> tuple[DnsBreaker, Clock]:
    clock = Clock()
    return DnsBreaker(failures=failures, cooldown=cooldown, clock=clock), clock


def test_dns_breaker_opens_after_consecutive_timeouts() -> None:
    breaker, _ = _breaker(failures=3)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(timed_out=True)
    assert not breaker.is_open
    breaker.record(timed_out=True)
    assert breaker.is_open and not breaker.allow()
    assert breaker.stats.trips == 1 and breaker.stats.skipped == 1


def test_dns_breaker_any_answer_resets_the_count() -> None:
    breaker, _ = _breaker(failures=2)
    for _ in range(5):  # NXDOMAIN, SERVFAIL, records: all answers, between the timeouts
        breaker.record(timed_out=True)
        breaker.record(timed_out=False)
    assert not breaker.is_open and breaker.stats.trips == 0


def test_dns_breaker_lets_one_probe_through_per_cooldown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="filterd.mta.dnsbreaker")
    breaker, clock = _breaker(failures=1, cooldown=30.0)
    breaker.record(timed_out=True)
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # the others wait for its outcome
    breaker.record(timed_out=True)  # still dead: another cool-off, nothing new to log
    assert breaker.is_open and not breaker.allow()
    clock.now += 30.1
    assert breaker.allow()
    breaker.record(timed_out=False)
    assert not breaker.is_open and breaker.allow()
    assert (breaker.stats.trips, breaker.stats.probes, breaker.stats.recoveries) == (1, 2, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gave no answer to 1 lookups in a row" in messages[0] and "answers again" in messages[1]


def test_dns_breaker_replaces_a_probe_that_never_reported() -> None:
    breaker, clock = _breaker(failures=1, cooldown=10.0)
    breaker.record(timed_out=True)
    clock.now += 10.0
    assert breaker.allow()  # its caller is cancelled and never records
    clock.now += 9.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_dns_breaker_uncounted_timeouts_matter_only_as_the_probe() -> None:
    breaker, clock = _breaker(failures=1, cooldown=10.0)
    for _ in range(5):  # a domain's dead name servers: the resolver is not blamed
        breaker.record(timed_out=True, count=False)
    assert not breaker.is_open
    breaker.record(timed_out=True)
    clock.now += 10.0
    assert breaker.allow()
    breaker.record(timed_out=True, count=False)  # a failed probe all the same
    assert breaker.is_open and not breaker.allow()
    clock.now += 10.0
    assert breaker.allow()
    breaker.record(timed_out=False, count=False)  # any answer shows the resolver alive
    assert not breaker.is_open


def test_dns_breaker_with_zero_failures_never_opens() -> None:
    breaker, _ = _breaker(failures=0)
    for _ in range(100):
        breaker.record(timed_out=True)
    assert breaker.allow() and breaker.stats.trips == 0

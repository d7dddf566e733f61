"""The resolver against real DNS servers on loopback (knotd, a delaying proxy, a silent server):
answers and their TTLs, negative caching, time limits, shared lookups, the circuit breaker, and
calls from threads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from filterd.config import DnsConfig
from filterd.net.dns import DnsAnswer, Resolver, parse_nameserver
from tests.dns_fixture import (
    DelayingDnsProxy,
    DnsServer,
    MakeDelayingProxy,
    MakeDnsServer,
    MakeSilentDnsServer,
    Nameserver,
)

pytest_plugins = ["tests.dns_fixture"]

T = TypeVar("T")

ZONES = {
    "bl.test": """
        2.0.0.127        A    127.0.0.2
        2.0.0.127        TXT  "listed; see https://bl.test/"
        two              A    127.0.0.2
        two              A    127.0.0.4
        short       30   A    127.0.0.3
        alias            CNAME short
    """,
}


class FakeClock:
    """The resolver's clock for cache and breaker times; lookups themselves run in real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_resolver(server: Nameserver, clock: FakeClock | None = None, **settings: Any) -> Resolver:
    config = dataclasses.replace(DnsConfig(), nameservers=(server.spec,), **settings)
    return Resolver(config) if clock is None else Resolver(config, clock=clock)


@pytest.fixture(scope="module")
def knot(make_session_dns_server: MakeDnsServer) -> DnsServer:
    return make_session_dns_server(ZONES)


@pytest.fixture
def counted(knot: DnsServer, make_delaying_proxy: MakeDelayingProxy) -> DelayingDnsProxy:
    """knotd behind a proxy that adds no delay: its `queries` count what reached the server side."""
    return make_delaying_proxy(knot, delay=0.0)


def sent(proxy: DelayingDnsProxy, name: str) -> int:
    return sum(1 for qname, _ in proxy.queries if qname == name + ".")


# --- answers ---------------------------------------------------------------------------------------


def test_parse_nameserver_forms() -> None:
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match=r"port|does not appear"):
            parse_nameserver(bad)


def test_records_status_and_ttl(knot: DnsServer) -> None:
    resolver = make_resolver(knot)

    async def go() -> list[DnsAnswer]:
        return [
            await resolver.query("2.0.0.127.bl.test", "A", zone="bl.test"),
            await resolver.query("two.bl.test.", "a", zone="bl.test"),
            await resolver.query("2.0.0.127.bl.test", "TXT", zone="bl.test"),
            await resolver.query("nothere.bl.test", "A", zone="bl.test"),
            await resolver.query("two.bl.test", "AAAA", zone="bl.test"),
            await resolver.query("alias.bl.test", "A", zone="bl.test"),
        ]

    listed, two, txt, missing, nodata, alias = run(go())
    assert (listed.status, listed.records, listed.ttl, listed.cached) == ("ok", ("127.0.0.2",), 60.0, False)
    assert sorted(two.records) == ["127.0.0.2", "127.0.0.4"]
    assert txt.records == ("listed; see https://bl.test/",)
    assert missing.status == "nxdomain" and missing.exists and not missing.ok
    assert nodata.status == "nodata" and nodata.records == ()
    assert alias.records == ("127.0.0.3",) and alias.ttl == 30.0  # the chain's shortest TTL
    health = resolver.zones["bl.test"]
    assert (health.queries, health.failures, health.consecutive_failures) == (6, 0, 0)


def test_answers_are_cached_for_their_ttl(counted: DelayingDnsProxy) -> None:
    clock = FakeClock()
    resolver = make_resolver(counted, clock)

    async def ask() -> DnsAnswer:
        return await resolver.query("short.bl.test", "A", zone="bl.test")

    first = run(ask())
    clock.now += 29
    again = run(ask())
    assert (first.cached, again.cached) == (False, True)
    assert again.records == first.records and again.ttl == pytest.approx(1.0)
    assert sent(counted, "short.bl.test") == 1
    assert (resolver.zones["bl.test"].queries, resolver.zones["bl.test"].cached) == (1, 1)
    clock.now += 2  # past the 30 s TTL
    assert run(ask()).cached is False
    assert sent(counted, "short.bl.test") == 2


def test_ttl_is_clamped_to_min_and_max(knot: DnsServer) -> None:
    low = make_resolver(knot, max_ttl=10.0)
    high = make_resolver(knot, min_ttl=600.0)
    assert run(low.query("2.0.0.127.bl.test", "A")).ttl == 10.0
    assert run(high.query("2.0.0.127.bl.test", "A")).ttl == 600.0


def test_negative_answers_are_cached_for_the_soa_minimum(counted: DelayingDnsProxy) -> None:
    # The fixture's SOA says: negative answers live 1 s (RFC 2308: min(SOA TTL, MINIMUM)).
    # negative_ttl only applies when no SOA comes back, so even 0 does not shorten it.
    clock = FakeClock()
    resolver = make_resolver(counted, clock, negative_ttl=0.0)

    async def ask(name: str, rdtype: str = "A") -> DnsAnswer:
        return await resolver.query(name, rdtype)

    nx = run(ask("gone.bl.test"))
    nodata = run(ask("two.bl.test", "MX"))
    assert (nx.status, nx.ttl, nodata.status, nodata.ttl) == ("nxdomain", 1.0, "nodata", 1.0)
    clock.now += 0.5
    assert run(ask("gone.bl.test")).cached and run(ask("two.bl.test", "MX")).cached
    clock.now += 1.0
    assert not run(ask("gone.bl.test")).cached
    assert sent(counted, "gone.bl.test") == 2


def test_cache_keeps_at_most_cache_entries(counted: DelayingDnsProxy) -> None:
    resolver = make_resolver(counted, cache_entries=2)

    async def go() -> None:
        for name in ("a1.bl.test", "a2.bl.test", "a3.bl.test", "a1.bl.test", "a3.bl.test"):
            await resolver.query(name, "A")

    run(go())
    assert sent(counted, "a1.bl.test") == 2  # pushed out by a3
    assert sent(counted, "a3.bl.test") == 1


def test_no_cache_when_cache_entries_is_zero(counted: DelayingDnsProxy) -> None:
    resolver = make_resolver(counted, cache_entries=0)
    run(resolver.query("two.bl.test", "A"))
    assert not run(resolver.query("two.bl.test", "A")).cached
    assert sent(counted, "two.bl.test") == 2


# --- failures and time limits ------------------------------------------------------------------------


def test_refused_zone_is_a_server_failure(knot: DnsServer) -> None:
    resolver = make_resolver(knot)
    answer = run(resolver.query("1.0.0.127.not-served.test", "A", zone="not-served.test"))
    assert answer.status == "servfail" and answer.temporary and "REFUSED" in answer.detail
    assert resolver.zones["not-served.test"].failures == 1


def test_silent_server_times_out_within_the_limit(make_silent_dns_server: MakeSilentDnsServer) -> None:
    silent = make_silent_dns_server()
    resolver = make_resolver(silent, timeout=0.3)
    started = time.monotonic()
    answer = run(resolver.query("2.0.0.127.bl.test", "A", zone="bl.test"))
    elapsed = time.monotonic() - started
    assert answer.status == "timeout" and "300 ms" in answer.detail
    # It waited out its limit, and the limit is what ended it (the server never answers): the
    # upper bound only catches a limit that does not hold (a hang), so it is 20 x the limit,
    # far above what a loaded machine adds.
    assert 0.25 < elapsed < 20 * 0.3, elapsed
    short = run(resolver.query("3.0.0.127.bl.test", "A", limit=0.1))
    assert short.status == "timeout" and "100 ms" in short.detail
    assert run(resolver.query("4.0.0.127.bl.test", "A", limit=0.0)).status == "timeout"
    assert ("4.0.0.127.bl.test.", "A") not in silent.queries  # no time left: not even asked


def test_failures_are_not_cached(make_silent_dns_server: MakeSilentDnsServer) -> None:
    server = make_silent_dns_server("servfail")
    resolver = make_resolver(server)
    assert run(resolver.query("x.bl.test", "A")).status == "servfail"
    assert run(resolver.query("x.bl.test", "A")).cached is False
    assert len(server.queries) == 2


# --- circuit breaker ---------------------------------------------------------------------------------


def test_breaker_opens_then_skips_fast(
    make_silent_dns_server: MakeSilentDnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    silent = make_silent_dns_server()
    clock = FakeClock()
    resolver = make_resolver(silent, clock, timeout=0.1, breaker_failures=3, breaker_cooldown=60.0)

    async def ask(i: int, zone: str = "bl.test") -> DnsAnswer:
        return await resolver.query(f"{i}.bl.test", "A", zone=zone)

    with caplog.at_level(logging.WARNING, logger="filterd.net.dns"):
        assert [run(ask(i)).status for i in range(3)] == ["timeout"] * 3
    assert "DNS lookups in bl.test failed 3 times in a row" in caplog.text
    assert resolver.breaker_state("bl.test") == "open"
    asked = len(silent.queries)
    skipped = run(ask(10))
    assert skipped.status == "skipped" and "zone bl.test skipped: timeout" in skipped.detail
    assert len(silent.queries) == asked  # not even sent: nothing to wait for (no timing asserted)
    health = resolver.zones["bl.test"]
    assert (health.trips, health.skipped, health.failures, health.queries) == (1, 1, 3, 3)
    # Other zones have breakers of their own, and a query naming no zone has none.
    assert run(ask(11, "other.test")).status == "timeout"
    assert run(ask(12, "")).status == "timeout"


def test_half_open_probe_closes_or_reopens(make_silent_dns_server: MakeSilentDnsServer) -> None:
    server = make_silent_dns_server()
    clock = FakeClock()
    resolver = make_resolver(server, clock, timeout=0.2, breaker_failures=2, breaker_cooldown=30.0)

    async def ask(i: int) -> DnsAnswer:
        return await resolver.query(f"{i}.bl.test", "A", zone="bl.test")

    run(ask(1))
    run(ask(2))
    assert resolver.breaker_state("bl.test") == "open"
    clock.now += 31
    assert resolver.breaker_state("bl.test") == "half-open"

    async def probe_with_company() -> tuple[DnsAnswer, DnsAnswer]:
        probe = asyncio.ensure_future(ask(3))
        await asyncio.sleep(0.02)
        assert resolver.breaker_state("bl.test") == "open"  # while the probe is out
        other = await ask(4)  # skipped: only the probe may go
        return await probe, other

    probe, other = run(probe_with_company())
    assert (probe.status, other.status) == ("timeout", "skipped")
    health = resolver.zones["bl.test"]
    assert health.trips == 2 and resolver.breaker_state("bl.test") == "open"  # the probe failed: open again
    clock.now += 31
    server.mode = "nxdomain"  # the server is back
    assert run(ask(5)).status == "nxdomain"
    assert resolver.breaker_state("bl.test") == "closed"
    assert health.consecutive_failures == 0
    assert run(ask(6)).status == "nxdomain"


def test_probe_cut_off_by_its_loop_closing_does_not_wedge_the_zone(
    make_silent_dns_server: MakeSilentDnsServer,
) -> None:
    # `filterd check` runs each scan in a fresh event loop; a probe still out when one ends must
    # not leave the zone skipped for ever.
    server = make_silent_dns_server()
    clock = FakeClock()
    resolver = make_resolver(server, clock, timeout=1.0, breaker_failures=1, breaker_cooldown=10.0)
    run(resolver.query("1.bl.test", "A", zone="bl.test", limit=0.1))
    clock.now += 11

    async def start_probe_and_leave() -> None:
        asyncio.ensure_future(resolver.query("2.bl.test", "A", zone="bl.test"))
        await asyncio.sleep(0.05)

    run(start_probe_and_leave())
    assert resolver.breaker_state("bl.test") == "half-open"
    server.mode = "nxdomain"
    assert run(resolver.query("3.bl.test", "A", zone="bl.test")).status == "nxdomain"


# --- concurrency -------------------------------------------------------------------------------------


def test_identical_queries_in_flight_share_one_lookup(knot: DnsServer, make_delaying_proxy: MakeDelayingProxy) -> None:
    proxy = make_delaying_proxy(knot, delay=0.2)
    resolver = make_resolver(proxy)

    async def go() -> list[DnsAnswer]:
        return await asyncio.gather(*(resolver.query("two.bl.test", "A", zone="bl.test") for _ in range(10)))

    answers = run(go())
    assert {a.status for a in answers} == {"ok"}
    assert sent(proxy, "two.bl.test") == 1
    assert resolver.zones["bl.test"].queries == 1


def test_parallel_lookups_cost_about_one_delay(knot: DnsServer, make_delaying_proxy: MakeDelayingProxy) -> None:
    proxy = make_delaying_proxy(knot, delay=0.2)
    resolver = make_resolver(proxy)

    async def go() -> tuple[list[DnsAnswer], float]:
        started = time.monotonic()
        answers = await asyncio.gather(*(resolver.query(f"{i}.0.0.127.bl.test", "A") for i in range(10)))
        return answers, time.monotonic() - started

    answers, elapsed = run(go())
    assert [a.status for a in answers].count("ok") == 1  # only 2.0.0.127 is listed
    assert {a.status for a in answers} == {"ok", "nxdomain"}
    assert elapsed >= 0.19  # each answer was held back 200 ms
    # Concurrent, whatever the machine's load: all ten queries were at the server before it sent
    # the first answer (in sequence there would never be more than one in flight).
    assert len(proxy.queries) == 10 and proxy.peak_in_flight == 10


def test_a_caller_with_a_shorter_limit_stops_waiting_alone(
    knot: DnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.3)
    resolver = make_resolver(proxy)

    async def go() -> tuple[DnsAnswer, DnsAnswer]:
        patient = asyncio.ensure_future(resolver.query("two.bl.test", "A", zone="bl.test"))
        await asyncio.sleep(0.01)
        hasty = await resolver.query("two.bl.test", "A", zone="bl.test", limit=0.05)
        return await patient, hasty

    patient, hasty = run(go())
    assert (patient.status, hasty.status) == ("ok", "timeout")
    assert sent(proxy, "two.bl.test") == 1
    assert resolver.zones["bl.test"].failures == 0  # the lookup itself did not fail


def test_a_cancelled_caller_leaves_the_lookup_to_fill_the_cache(
    knot: DnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.2)
    resolver = make_resolver(proxy)

    async def go() -> DnsAnswer:
        caller = asyncio.ensure_future(resolver.query("two.bl.test", "A", zone="bl.test"))
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.sleep(0.3)
        return await resolver.query("two.bl.test", "A", zone="bl.test")

    later = run(go())
    assert later.cached and later.ok
    assert sent(proxy, "two.bl.test") == 1


# --- threads -----------------------------------------------------------------------------------------


def test_query_from_thread_shares_cache_and_breakers(counted: DelayingDnsProxy) -> None:
    resolver = make_resolver(counted)
    with pytest.raises(RuntimeError, match="bind_loop"):
        resolver.query_from_thread("two.bl.test", "A")

    async def go() -> tuple[DnsAnswer, DnsAnswer, DnsAnswer]:
        resolver.bind_loop()
        in_thread = await asyncio.to_thread(resolver.query_from_thread, "two.bl.test", "A", zone="bl.test")
        on_loop = await resolver.query("two.bl.test", "A", zone="bl.test")
        await resolver.query("short.bl.test", "A", zone="bl.test")
        cached_in_thread = await asyncio.to_thread(resolver.query_from_thread, "short.bl.test", "A")
        with pytest.raises(RuntimeError, match="own loop"):
            resolver.query_from_thread("two.bl.test", "A")
        return in_thread, on_loop, cached_in_thread

    in_thread, on_loop, cached_in_thread = run(go())
    assert in_thread.ok and not in_thread.cached
    assert on_loop.cached and cached_in_thread.cached
    assert resolver.zones["bl.test"].queries == 2
    # Once the loop is gone the thread gets an answer that says so, not an exception.
    assert resolver.query_from_thread("two.bl.test", "A").status == "error"


def test_query_from_thread_gives_up_when_the_loop_is_busy(knot: DnsServer) -> None:
    resolver = make_resolver(knot, timeout=0.1)
    answers: list[DnsAnswer] = []

    async def go() -> None:
        resolver.bind_loop()
        thread = threading.Thread(target=lambda: answers.append(resolver.query_from_thread("two.bl.test", "A")))
        thread.start()
        time.sleep(1.5)  # noqa: ASYNC251 -- blocks the loop on purpose: the thread's request cannot start
        await asyncio.to_thread(thread.join)

    run(go())
    assert answers[0].status == "timeout"


def test_blocked_mark_is_news_once(knot: DnsServer) -> None:
    resolver = make_resolver(knot)
    assert resolver.mark_blocked("bl.test") is True
    assert resolver.mark_blocked("bl.test") is False
    assert resolver.zones["bl.test"].blocked
    assert resolver.mark_blocked("bl.test", False) is True
    assert not resolver.zones["bl.test"].blocked


def test_a_guarded_resolver_found_dead_answers_from_its_cache_and_skips_the_rest(
    knot: DnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    clock = FakeClock()
    resolver = make_resolver(proxy, clock, timeout=0.3)
    breaker = resolver.guard_resolver(failures=2, cooldown=30.0)
    assert resolver.guard_resolver(failures=9, cooldown=1.0) is breaker  # one per resolver

    async def ask(name: str) -> DnsAnswer:
        return await resolver.query(name, "A")

    assert run(ask("two.bl.test")).ok  # cached from now on
    proxy.delay = 10.0  # nothing comes back in time any more, the ping included
    assert [run(ask(f"{i}.x.bl.test")).status for i in range(2)] == ["timeout"] * 2
    assert breaker.is_open and (".", "NS") in proxy.queries
    cached = run(ask("two.bl.test"))
    assert cached.ok and cached.cached
    skipped = run(ask("short.bl.test"))
    assert skipped.status == "skipped" and "DNS resolver not answering" in skipped.detail
    assert ("short.bl.test.", "A") not in proxy.queries
    proxy.delay = 0.0
    clock.now += 31  # the cool-off is over: the next lookup is the probe, and it is answered
    assert run(ask("short.bl.test")).ok and not breaker.is_open and breaker.stats.recoveries == 1


# --- ping ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "alive"), [("silent", False), ("servfail", True), ("refused", True)])
def test_ping_tells_a_resolver_that_answers_anything_from_one_that_does_not(
    make_silent_dns_server: MakeSilentDnsServer, mode: str, alive: bool
) -> None:
    server = make_silent_dns_server(mode)
    resolver = make_resolver(server)
    assert run(resolver.ping(0.5)) is alive
    assert server.queries == [(".", "NS")]


def test_ping_goes_past_the_cache(counted: DelayingDnsProxy) -> None:
    resolver = make_resolver(counted)

    async def twice() -> tuple[bool, bool]:
        return await resolver.ping(2.0), await resolver.ping(2.0)

    assert run(twice()) == (True, True)  # knotd refuses the root zone: an answer
    assert counted.queries == [(".", "NS")] * 2

"""A dead DNS resolver is not waited for (`filterd.net.dnsbreaker`): after a few client name
lookups in a row get no answer at all, new SMTP clients are greeted at once as "unknown", and
the queue manager defers remote mail at once instead of waiting for each MX lookup; one lookup
per cool-off tries the resolver again.

The breaker itself is tested on a fake clock; the rest against loopback DNS servers from the
fixtures (knotd, and a UDP socket that never answers or answers with a fixed rcode) and real
SMTP clients (smtplib, and `filterd mta` in a subprocess).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import smtplib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import dns.rdatatype
import pytest

from filterd.config import Duration, default_config
from filterd.mta.queue import Envelope, Queue
from filterd.mta.smtpd import SmtpServer
from filterd.net.dns import Resolver
from filterd.net.dnsbreaker import DnsBreaker
from tests.dns_fixture import MakeDelayingProxy, MakeDnsServer, MakeSilentDnsServer, Nameserver
from tests.mta.mta_fixture import start_mta
from tests.mta.qmgr_helpers import all_ids, enqueue, make_qmgr, mta_config, run_until

pytest_plugins = ["tests.dns_fixture"]

T = TypeVar("T")

ZONES = {
    "0.0.127.in-addr.arpa": ["10 PTR good.peer.test."],
    "peer.test": ["good A 127.0.0.10"],
}


# -- the breaker on a fake clock ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(
    failures: int = 3, cooldown: float = 30.0, confirm: Callable[[], Awaitable[bool]] | None = None
) -> tuple[DnsBreaker, Clock]:
    clock = Clock()
    return DnsBreaker(failures=failures, cooldown=cooldown, confirm=confirm, clock=clock), clock


def record(breaker: DnsBreaker, *, timed_out: bool) -> None:
    asyncio.run(breaker.record(timed_out=timed_out))


class Confirm:
    """A stand-in for `Resolver.ping`: answers ``alive``, counting the calls."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.alive


def test_dns_breaker_opens_after_consecutive_timeouts() -> None:
    breaker, _ = _breaker(failures=3)
    for _ in range(2):
        assert breaker.allow()
        record(breaker, timed_out=True)
    assert not breaker.is_open
    record(breaker, timed_out=True)
    assert breaker.is_open and not breaker.allow()
    assert breaker.stats.trips == 1 and breaker.stats.skipped == 1


def test_dns_breaker_any_answer_resets_the_count() -> None:
    breaker, _ = _breaker(failures=2)
    for _ in range(5):  # NXDOMAIN, SERVFAIL, records: all answers, between the timeouts
        record(breaker, timed_out=True)
        record(breaker, timed_out=False)
    assert not breaker.is_open and breaker.stats.trips == 0


def test_dns_breaker_lets_one_probe_through_per_cooldown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="filterd.net.dnsbreaker")
    breaker, clock = _breaker(failures=1, cooldown=30.0)
    record(breaker, timed_out=True)
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # the others wait for its outcome
    record(breaker, timed_out=True)  # still dead: another cool-off, nothing new to log
    assert breaker.is_open and not breaker.allow()
    clock.now += 30.1
    assert breaker.allow()
    record(breaker, timed_out=False)
    assert not breaker.is_open and breaker.allow()
    assert (breaker.stats.trips, breaker.stats.probes, breaker.stats.recoveries) == (1, 2, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gave no answer to 1 lookups in a row" in messages[0] and "answers again" in messages[1]


def test_dns_breaker_replaces_a_probe_that_never_reported() -> None:
    breaker, clock = _breaker(failures=1, cooldown=10.0)
    record(breaker, timed_out=True)
    clock.now += 10.0
    assert breaker.allow()  # its caller is cancelled and never records
    clock.now += 9.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_dns_breaker_trips_only_if_the_resolver_does_not_answer_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="filterd.net.dnsbreaker")
    confirm = Confirm(alive=True)
    breaker, clock = _breaker(failures=2, confirm=confirm)
    for _ in range(6):  # lame reverse zones behind a live resolver: asked once per streak
        record(breaker, timed_out=True)
    assert not breaker.is_open and breaker.allow()
    assert confirm.calls == 3 and breaker.stats.false_alarms == 3 and breaker.stats.trips == 0
    assert "but the resolver answers" in caplog.records[0].getMessage()
    confirm.alive = False  # now the resolver itself is gone
    record(breaker, timed_out=True)
    record(breaker, timed_out=True)
    assert breaker.is_open and breaker.stats.trips == 1 and confirm.calls == 4
    clock.now += 30.0
    assert breaker.allow()  # the probe times out (a lame zone again) but the resolver is back
    confirm.alive = True
    record(breaker, timed_out=True)
    assert not breaker.is_open and breaker.stats.recoveries == 1 and confirm.calls == 5


def test_dns_breaker_confirms_once_for_callers_arriving_together() -> None:
    release = asyncio.Event()
    calls = 0

    async def confirm() -> bool:
        nonlocal calls
        calls += 1
        await release.wait()
        return False

    async def main() -> DnsBreaker:
        breaker = DnsBreaker(failures=1, cooldown=30.0, confirm=confirm)
        first = asyncio.create_task(breaker.record(timed_out=True))
        await asyncio.sleep(0)  # first is asking the resolver now
        await breaker.record(timed_out=True)  # returns at once: the first one decides
        assert not breaker.is_open and not first.done()
        release.set()
        await first
        return breaker

    breaker = asyncio.run(main())
    assert calls == 1 and breaker.is_open and breaker.stats.trips == 1


def test_dns_breaker_with_zero_failures_never_opens() -> None:
    breaker, _ = _breaker(failures=0)
    for _ in range(100):
        record(breaker, timed_out=True)
    assert breaker.allow() and breaker.stats.trips == 0


# -- the SMTP server ----------------------------------------------------------------------------


def _serve(tmp_path: Path, nameserver: Nameserver, clients: Callable[[int, SmtpServer], T], **mta: Any) -> T:
    """An in-process SMTP server asking ``nameserver``, while ``clients(port, server)`` runs in a
    thread. dns.timeout is longer than any peername_timeout here: that one sets the wait."""
    defaults = default_config()
    dns_config = dataclasses.replace(defaults.dns, nameservers=(nameserver.spec,), timeout=Duration(10.0))
    config = dataclasses.replace(
        defaults.mta, local_domains=("example.net",), hostname="mx.test", mailbox="{state_dir}/mail/{user}/", **mta
    )
    queue = Queue(tmp_path / "queue")

    async def main() -> T:
        server = SmtpServer(config, queue, resolver=Resolver(dns_config))
        [(_, port)] = await server.start(["127.0.0.1:0"])
        try:
            return await asyncio.to_thread(clients, port, server)
        finally:
            await server.close()

    return asyncio.run(main())


def _session(port: int, source: str = "127.0.0.10") -> float:
    """One message over SMTP from ``source``; returns the seconds from connecting to the 220."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as smtp:
        greeted = time.monotonic() - started
        smtp.sendmail("alice@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nhello\r\n")
    return greeted


def breaker_of(server: SmtpServer) -> DnsBreaker:
    """The breaker the server installed over its resolver."""
    assert server.resolver is not None and server.resolver.resolver_breaker is not None
    return server.resolver.resolver_breaker


def _client_names(tmp_path: Path) -> list[str]:
    """The client names of the queued messages, oldest first (queue ids are time-ordered)."""
    queue = Queue(tmp_path / "queue")
    envelopes: list[Envelope] = [queue.load(qid)[0] for qid in sorted(queue.ids("incoming"))]
    return [e.client_name for e in envelopes]


TIMEOUT = 2.0  # peername_timeout in the greeting tests


def test_after_the_breaker_trips_clients_are_greeted_without_waiting(
    tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer
) -> None:
    dead = make_silent_dns_server("silent")

    def clients(port: int, server: SmtpServer) -> list[float]:
        return [_session(port) for _ in range(6)]

    delays = _serve(tmp_path, dead, clients, peername_timeout=TIMEOUT, dns_breaker_failures=2)
    # Without the breaker every one of them would wait this long.
    assert all(d > 0.8 * TIMEOUT for d in delays[:2]), delays
    assert all(d < 0.1 * TIMEOUT for d in delays[2:]), delays
    # The second timeout in a row: the resolver itself is asked (no answer); nothing once found dead.
    assert dead.queries == [("10.0.0.127.in-addr.arpa.", "PTR")] * 2 + [(".", "NS")]
    assert _client_names(tmp_path) == ["unknown"] * 6


@pytest.mark.parametrize("answer", ["nxdomain", "servfail"])
def test_answers_between_timeouts_keep_the_breaker_closed(
    tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer, answer: str
) -> None:
    dns = make_silent_dns_server("silent")

    def clients(port: int, server: SmtpServer) -> tuple[int, int]:
        # Each client from its own address: a cached answer would not reach the server.
        for n, mode in enumerate(("silent", answer, "silent", answer, "silent")):
            dns.mode = mode
            _session(port, f"127.0.0.{20 + n}")
        before = breaker_of(server).stats.trips
        dns.mode = "silent"  # a second timeout in a row: now it trips (the same setup can)
        _session(port, "127.0.0.30")
        return before, breaker_of(server).stats.trips

    trips = _serve(tmp_path, dns, clients, peername_timeout=0.5, dns_breaker_failures=2)
    assert trips == (0, 1)
    assert [q[1] for q in dns.queries] == ["PTR"] * 6 + ["NS"]  # every client was looked up; then the ping


def test_a_resolver_that_answers_again_is_used_again(tmp_path: Path, make_dns_server: MakeDnsServer) -> None:
    knotd = make_dns_server(ZONES)
    knotd.stop()  # its port no longer answers: every lookup times out
    cooldown = 1.0

    def clients(port: int, server: SmtpServer) -> list[float]:
        stats = breaker_of(server).stats
        delays = [_session(port) for _ in range(3)]  # two time out, the third is skipped
        assert stats.trips == 1 and stats.skipped == 1
        time.sleep(cooldown)
        delays.append(_session(port))  # the probe: still no answer
        delays.append(_session(port))  # skipped again
        assert stats.probes == 1 and stats.recoveries == 0 and stats.skipped == 2
        knotd.start()
        time.sleep(cooldown)
        delays += [_session(port), _session(port)]  # the probe finds it back; the next one asks too
        assert stats.probes == 2 and stats.recoveries == 1 and stats.skipped == 2 and stats.trips == 1
        return delays

    delays = _serve(
        tmp_path, knotd, clients, peername_timeout=TIMEOUT, dns_breaker_failures=2, dns_breaker_cooldown=cooldown
    )
    waited = [d > 0.8 * TIMEOUT for d in delays]
    assert waited == [True, True, False, True, False, False, False], delays
    assert all(d < 0.1 * TIMEOUT for d, w in zip(delays, waited, strict=True) if not w), delays
    assert _client_names(tmp_path) == ["unknown"] * 5 + ["good.peer.test"] * 2


def test_cached_names_are_used_while_the_resolver_is_dead(tmp_path: Path, make_dns_server: MakeDnsServer) -> None:
    knotd = make_dns_server(ZONES)

    def clients(port: int, server: SmtpServer) -> tuple[bool, int]:
        _session(port, "127.0.0.10")  # good.peer.test: its PTR and A are cached now
        knotd.stop()
        _session(port, "127.0.0.20")
        _session(port, "127.0.0.21")  # the second timeout in a row; the ping gets nothing: dead
        is_open = breaker_of(server).is_open
        _session(port, "127.0.0.10")  # from the cache, though the resolver is dead
        _session(port, "127.0.0.22")  # not cached: skipped
        return is_open, breaker_of(server).stats.skipped

    is_open, skipped = _serve(tmp_path, knotd, clients, peername_timeout=0.5, dns_breaker_failures=2)
    assert is_open and skipped == 1
    assert _client_names(tmp_path) == ["good.peer.test", "unknown", "unknown", "good.peer.test", "unknown"]


def test_lame_reverse_zones_behind_a_live_resolver_do_not_trip_it(
    tmp_path: Path, make_dns_server: MakeDnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    """Spam bots' reverse zones often never answer: the PTR lookups time out while the resolver
    answers everything else. That must not make clients 'unknown' at once and defer all outbound
    mail: the breaker asks the resolver itself (the root zone's NS; knotd refuses it: an answer)."""
    knotd = make_dns_server(ZONES)
    lame = make_delaying_proxy(knotd, delay=lambda q: 30.0 if q.question[0].rdtype == dns.rdatatype.PTR else 0.0)

    def clients(port: int, server: SmtpServer) -> tuple[list[float], bool]:
        delays = [_session(port, f"127.0.0.{20 + n}") for n in range(5)]
        return delays, breaker_of(server).is_open

    delays, is_open = _serve(tmp_path, lame, clients, peername_timeout=0.5, dns_breaker_failures=2)
    assert not is_open
    assert [q for q in lame.queries if q[1] == "PTR"] == [(f"{20 + n}.0.0.127.in-addr.arpa.", "PTR") for n in range(5)]
    assert lame.queries.count((".", "NS")) == 2  # once per two timeouts in a row, each answered
    assert all(d > 0.4 for d in delays), delays  # each client's lookup was made (and waited for)


def test_filterd_mta_logs_dead_and_back_once_and_defers_remote_mail_at_once(
    tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer
) -> None:
    dns = make_silent_dns_server("silent")
    config = f"dns: {{nameservers: ['{dns.spec}'], timeout: 1s}}\n"
    config += "mta: {local_domains: [example.net], peername_timeout: 1s, dns_breaker_failures: 2, "
    config += "dns_breaker_cooldown: 1s, min_backoff: 1h, max_backoff: 2h}\n"
    mta = start_mta(tmp_path, config=config, deliver=True)
    try:
        for name in ("a", "b", "c", "d"):  # from loopback, in mynetworks: relayed
            with smtplib.SMTP(mta.host, mta.port, timeout=30, source_address=("127.0.0.10", 0)) as smtp:
                smtp.sendmail("alice@example.net", [f"bob@{name}.remote.test"], "Subject: hi\r\n\r\nhello\r\n")
        mta.wait_for_log(r"to=<bob@d\.remote\.test>.*status=deferred")
        # Queued once the resolver was found dead (after b's connection): no MX lookup at all.
        assert ("d.remote.test.", "MX") not in dns.queries
        # The log line comes before the move into deferred/: wait for the move.
        for _ in range(500):
            deferred = {e.rcpts[0].address: e.rcpts[0] for e, _ in mta.queued("deferred")}
            if "bob@d.remote.test" in deferred:
                break
            time.sleep(0.02)
        last = deferred["bob@d.remote.test"]
        assert last.last_status == "4.4.3" and "DNS resolver not answering" in last.last_error, last
        dns.mode = "nxdomain"
        time.sleep(1.0)  # the cool-off
        with smtplib.SMTP(mta.host, mta.port, timeout=30, source_address=("127.0.0.10", 0)) as smtp:
            smtp.noop()  # the probe got an answer
        mta.wait_for_log(r"DNS resolver answers again")
    finally:
        assert mta.stop() == 0, mta.log()
    log = mta.log()
    # PTR and MX timeouts in a row (how many depends on what timed out while the ping was out).
    assert len(re.findall(r"DNS resolver gave no answer to \d+ lookups in a row", log)) == 1, log
    assert log.count("DNS resolver answers again") == 1, log


# -- the queue manager --------------------------------------------------------------------------


@pytest.mark.parametrize("dead", [False, True], ids=["breaker closed", "breaker open"])
def test_queue_manager_defers_at_once_while_dns_is_dead(
    tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer, dead: bool
) -> None:
    dns = make_silent_dns_server("silent")
    # One attempt each; five timeouts in a row before the resolver is suspected (four domains here).
    config = mta_config(tmp_path, min_backoff=3600.0, max_backoff=7200.0, dns_breaker_failures=5)
    # Open, the MX lookups must not wait at all: a long DNS timeout makes "finished in under half
    # of it" a wide margin on a loaded machine; closed, they wait it out, so it stays short.
    timeout = Duration(20.0 if dead else 1.0)
    config = dataclasses.replace(config, dns=dataclasses.replace(config.dns, nameservers=(dns.spec,), timeout=timeout))
    queue = Queue(tmp_path / "queue")
    qmgr = make_qmgr(config, queue)
    breaker = qmgr.remote.resolver.resolver_breaker
    assert breaker is not None  # the queue manager guards its resolver
    if dead:  # as the SMTP server's lookups found it: timeouts, and no answer to the ping
        for _ in range(5):
            asyncio.run(breaker.record(timed_out=True))
        assert breaker.is_open
    domains = [f"d{i}.remote.test" for i in range(4)]
    for domain in domains:
        enqueue(queue, f"bob@{domain}")

    started = time.monotonic()
    asyncio.run(run_until(qmgr, lambda: len(queue.ids("deferred")) == len(domains)))
    elapsed = time.monotonic() - started
    if dead:
        assert elapsed < 0.5 * timeout, elapsed
        assert [q for q in dns.queries if q[1] == "MX"] == []
    else:  # the MX lookups time out (together, each in its own slot); four: no trip
        assert elapsed > 0.9 * timeout, elapsed
        assert sorted(q[0] for q in dns.queries if q[1] == "MX") == sorted(f"{d}." for d in domains)
        assert not breaker.is_open
    for qid in all_ids(queue):
        [rcpt] = queue.load(qid)[0].rcpts
        assert rcpt.last_status == "4.4.3", rcpt
        assert ("DNS resolver not answering" in rcpt.last_error) is dead, rcpt

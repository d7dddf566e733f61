"""Wall times of the async checks (`Result.async_timings`): test plugins that await a known
delay, fail after it or never answer, a DNSBL lookup the DNS fixture holds back, and the same
times in the metrics text, in-process and from a real daemon after a real scan. Only lower
bounds and comparisons: what was waited for, never how fast this machine is."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from filterd.config import Duration, load_config
from filterd.daemon.metrics import Aggregate, WorkerMetrics, render_prometheus
from filterd.engine.engine import Engine
from filterd.engine.plugin import CheckSetup, Hit, Scan, ScanContext, Stage
from tests._servers import wait_until
from tests.conftest import offline_config
from tests.daemon_fixture import start_daemon
from tests.dns_fixture import MakeDelayingProxy, MakeDnsServer
from tests.test_connect_checks import LISTED, MESSAGE  # a client listed in zen, a plain message

pytest_plugins = ["tests.dns_fixture"]

DELAY = 0.2  # seconds each slow test check waits
DNS_DELAY = 0.3  # seconds the DNS proxy holds every answer back


class Sleepy:
    name: ClassVar[str] = "sleepy"
    stage: ClassVar[Stage] = Stage.BODY
    emits: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, setup: CheckSetup) -> None:
        pass

    async def run(self, scan: Scan) -> Sequence[Hit]:
        await asyncio.sleep(DELAY)
        return []


class Instant(Sleepy):
    name: ClassVar[str] = "instant"

    async def run(self, scan: Scan) -> Sequence[Hit]:
        return []


class Failing(Sleepy):
    name: ClassVar[str] = "failing"

    async def run(self, scan: Scan) -> Sequence[Hit]:
        await asyncio.sleep(DELAY)
        raise ConnectionResetError("the peer went away")


class Stuck(Sleepy):
    name: ClassVar[str] = "stuck"

    async def run(self, scan: Scan) -> Sequence[Hit]:
        await asyncio.Event().wait()  # never answers
        return []


class SlowLocal(Sleepy):
    """A synchronous check: it holds the loop, as CPU work does."""

    name: ClassVar[str] = "slow_local"

    def run(self, scan: Scan) -> Sequence[Hit]:  # type: ignore[override]
        time.sleep(DELAY)
        return []


def _engine(tmp_path: Path, *checks: type, scan_deadline: float = 10.0) -> Engine:
    """An engine with these checks alone and no rules (an empty rules directory)."""
    config = offline_config()
    rules = dataclasses.replace(config.rules, dirs=(str(tmp_path),), scan_deadline=Duration(scan_deadline))
    return Engine.load(dataclasses.replace(config, rules=rules), checks=checks)


def test_async_check_times_are_wall_times_kept_apart_from_the_steps(tmp_path: Path) -> None:
    engine = _engine(tmp_path, Sleepy, Instant, SlowLocal)
    result = engine.scan_sync(MESSAGE, ScanContext(no_autolearn=True))
    assert set(result.async_timings) == {"sleepy", "instant"}
    assert not set(result.async_timings) & set(result.timings)
    assert result.async_timings["sleepy"] >= DELAY
    assert result.timings["slow_local"] >= DELAY
    # "instant" answered before the local check started: timed at its answer, not at collection.
    assert result.async_timings["instant"] < result.timings["slow_local"]
    # "sleepy" waited while the local check ran: the two overlap, so they add up to more than the scan.
    assert result.async_timings["sleepy"] + result.timings["slow_local"] > result.scan_time


def test_failed_and_deadline_checks_are_timed_too(tmp_path: Path) -> None:
    engine = _engine(tmp_path, Stuck, Failing, Sleepy, scan_deadline=2 * DELAY)
    result = engine.scan_sync(MESSAGE, ScanContext(no_autolearn=True))
    errors = {h.rule: h.detail for h in result.hits if h.rule.startswith("CHECK_ERROR_")}
    assert errors == {"CHECK_ERROR_FAILING": "ConnectionResetError: the peer went away",
                      "CHECK_ERROR_STUCK": "deadline"}  # fmt: skip
    assert set(result.async_timings) == {"stuck", "failing", "sleepy"}
    assert result.async_timings["failing"] >= DELAY
    # "stuck" started first and was stopped after "sleepy" had answered.
    assert result.async_timings["stuck"] >= result.async_timings["sleepy"] >= DELAY


def test_staged_scan_keeps_each_stage_async_time(tmp_path: Path) -> None:
    class AtConnect(Sleepy):
        name: ClassVar[str] = "at_connect"
        stage: ClassVar[Stage] = Stage.CONNECT

    engine = _engine(tmp_path, AtConnect, Sleepy)

    async def staged() -> dict[str, float]:
        scan = engine.new_scan(ScanContext(client_ip=LISTED, no_autolearn=True))
        await engine.run_stage(scan, Stage.CONNECT)
        assert set(scan.async_timings) == {"at_connect"}
        return (await engine.finish(scan, MESSAGE)).async_timings

    timings = asyncio.run(staged())
    assert set(timings) == {"at_connect", "sleepy"} and min(timings.values()) >= DELAY


def _dnsbl_config(nameserver: str) -> str:
    return (
        "network: {enabled: true}\n"
        f"dns: {{nameservers: ['{nameserver}'], timeout: 5s}}\n"
        "auth: {spf: false, dkim: false, dmarc: false, arc: false}\n"
        "dnsbl: {zones: {dbl: {enabled: false}, uribl: {enabled: false}, surbl: {enabled: false},"
        " dnswl: {enabled: false}}}\n"
    )


def test_dnsbl_time_includes_the_delayed_answer(
    tmp_path: Path, make_dns_server: MakeDnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    server = make_dns_server({".": [], "zen.spamhaus.org": ["44.33.22.11 A 127.0.0.2"]})
    proxy = make_delaying_proxy(server, delay=DNS_DELAY)
    path = tmp_path / "filterd.yaml"
    path.write_text(_dnsbl_config(proxy.spec))
    result = Engine.load(load_config(path)).scan_sync(MESSAGE, ScanContext(no_autolearn=True))
    assert "RCVD_IN_SBL" in result.rule_names
    assert any(name.endswith(".zen.spamhaus.org.") for name, _ in proxy.queries)
    assert result.async_timings["dnsbl"] >= DNS_DELAY
    assert "dnsbl" not in result.timings


def _series(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_async_check_histograms_add_up_across_workers() -> None:
    one, two = WorkerMetrics(), WorkerMetrics()
    one.observe_async_checks({"dnsbl": 0.3, "auth": 0.004})
    one.observe_async_checks({"dnsbl": 0.03})
    two.observe_async_checks({"dnsbl": 12.0})  # past the last bound: only in +Inf
    agg = Aggregate()
    agg.update(1, one.snapshot())
    agg.update(2, two.snapshot())
    text = render_prometheus(agg, workers=2, generation=1).decode()
    assert "# TYPE filterd_async_check_seconds histogram" in text
    series = _series(text)
    dnsbl = 'filterd_async_check_seconds_bucket{check="dnsbl",le='
    assert series[dnsbl + '"0.025"}'] == 0 and series[dnsbl + '"0.05"}'] == 1
    assert series[dnsbl + '"0.5"}'] == 2 and series[dnsbl + '"10.0"}'] == 2 and series[dnsbl + '"+Inf"}'] == 3
    assert series['filterd_async_check_seconds_count{check="dnsbl"}'] == 3
    assert series['filterd_async_check_seconds_sum{check="dnsbl"}'] == 12.33
    assert series['filterd_async_check_seconds_count{check="auth"}'] == 1
    # A retired worker's observations stay; the scan-time histogram is as it was.
    agg.retire(2)
    series = _series(render_prometheus(agg, workers=1, generation=1).decode())
    assert series['filterd_async_check_seconds_count{check="dnsbl"}'] == 3
    assert series['filterd_scan_seconds_bucket{le="+Inf"}'] == 0 and series["filterd_scan_seconds_sum"] == 0


def test_daemon_metrics_carry_the_async_check_time(
    tmp_path: Path, make_dns_server: MakeDnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    server = make_dns_server({".": [], "zen.spamhaus.org": ["44.33.22.11 A 127.0.0.2"]})
    proxy = make_delaying_proxy(server, delay=DNS_DELAY)
    daemon = start_daemon(tmp_path, config=_dnsbl_config(proxy.spec), workers=1)
    try:
        reply = daemon.request(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE)
        assert b"RCVD_IN_SBL" in reply, reply
        count = 'filterd_async_check_seconds_count{check="dnsbl"}'
        series: dict[str, float] = {}

        def reported() -> bool:  # workers report about once a second
            nonlocal series
            url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                series = _series(r.read().decode())
            return series.get(count) == 1

        wait_until(reported, daemon.proc, name="daemon", waiting_for="report the scan", log=daemon.log)
        assert series['filterd_async_check_seconds_sum{check="dnsbl"}'] >= DNS_DELAY
        assert series['filterd_async_check_seconds_bucket{check="dnsbl",le="0.25"}'] == 0
    finally:
        assert daemon.stop() == 0, daemon.log()

"""Counters a worker keeps, their transport to the master, and the Prometheus text format.

Each worker keeps cumulative counters in plain dicts and sends a JSON snapshot to the master
through a pipe about once a second. The master adds up the last snapshot of every live worker
and what retired workers left behind, so totals never go backwards across restarts or reloads.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filterd.net.dns import Resolver

__all__ = ["SCAN_BUCKETS", "Aggregate", "WorkerMetrics", "render_prometheus"]

# Snapshot keys that are gauges (the state now), not counters: a retired worker's are dropped.
_GAUGES = ("dns_zone_blocked", "dns_zone_breaker_open", "connections")

# Seconds: bucket bounds of the scan-time and async-check-time histograms.
SCAN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class WorkerMetrics:
    """One worker's cumulative counters."""

    messages: Counter[str] = field(default_factory=Counter)  # verdict -> count
    requests: Counter[str] = field(default_factory=Counter)  # method -> count
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    rule_hits: Counter[str] = field(default_factory=Counter)
    scan_buckets: list[int] = field(default_factory=lambda: [0] * (len(SCAN_BUCKETS) + 1))
    scan_seconds_sum: float = 0.0
    # Per async (network) check: a histogram of its wall time, as for scans (see observe_async_checks).
    check_buckets: dict[str, list[int]] = field(default_factory=dict)
    check_seconds_sum: dict[str, float] = field(default_factory=dict)
    bytes_scanned: int = 0
    refused: int = 0
    connections: Counter[str] = field(default_factory=Counter)  # gauge: open now, by protocol
    # "milter:rejected", "policy:greylisted", ...: what the milter and the policy service answered.
    verdicts: Counter[str] = field(default_factory=Counter)
    # Per DNS zone (a DNSBL zone, "spf", ...): the resolver's counters, copied at each report.
    dns_queries: Counter[str] = field(default_factory=Counter)
    dns_failures: Counter[str] = field(default_factory=Counter)
    dns_skipped: Counter[str] = field(default_factory=Counter)
    dns_cached: Counter[str] = field(default_factory=Counter)
    dns_zone_blocked: Counter[str] = field(default_factory=Counter)  # 1: the list refuses our resolver
    dns_zone_breaker_open: Counter[str] = field(default_factory=Counter)  # 1: lookups skipped for now

    def observe_dns(self, resolver: Resolver) -> None:
        """Copy the resolver's per-zone health (its counters are cumulative already)."""
        for zone, health in resolver.zones.items():
            self.dns_queries[zone] = health.queries
            self.dns_failures[zone] = health.failures
            self.dns_skipped[zone] = health.skipped
            self.dns_cached[zone] = health.cached
            self.dns_zone_blocked[zone] = int(health.blocked)
            self.dns_zone_breaker_open[zone] = int(resolver.breaker_state(zone) != "closed")

    def observe_scan(self, verdict: str, seconds: float, rules: list[str], size: int) -> None:
        self.messages[verdict] += 1
        self.scan_buckets[bisect.bisect_left(SCAN_BUCKETS, seconds)] += 1
        self.scan_seconds_sum += seconds
        self.bytes_scanned += size
        self.rule_hits.update(rules)

    def observe_async_checks(self, timings: Mapping[str, float]) -> None:
        """Count the wall times of a scan's async checks (`Result.async_timings`): they overlap,
        so they are kept per check and never added to the scan time."""
        for name, seconds in timings.items():
            buckets = self.check_buckets.setdefault(name, [0] * (len(SCAN_BUCKETS) + 1))
            buckets[bisect.bisect_left(SCAN_BUCKETS, seconds)] += 1
            self.check_seconds_sum[name] = self.check_seconds_sum.get(name, 0.0) + seconds

    def snapshot(self) -> bytes:
        data = {
            "messages": self.messages,
            "requests": self.requests,
            "errors": self.errors,
            "rule_hits": self.rule_hits,
            "scan_buckets": self.scan_buckets,
            "scan_seconds_sum": self.scan_seconds_sum,
            "check_buckets": self.check_buckets,
            "check_seconds_sum": self.check_seconds_sum,
            "bytes_scanned": self.bytes_scanned,
            "refused": self.refused,
            "connections": self.connections,
            "verdicts": self.verdicts,
            "dns_queries": self.dns_queries,
            "dns_failures": self.dns_failures,
            "dns_skipped": self.dns_skipped,
            "dns_cached": self.dns_cached,
            "dns_zone_blocked": self.dns_zone_blocked,
            "dns_zone_breaker_open": self.dns_zone_breaker_open,
        }
        return json.dumps(data, separators=(",", ":")).encode() + b"\n"


@dataclass(slots=True)
class Aggregate:
    """The master's view: last snapshot per live worker plus retired workers' totals."""

    live: dict[int, dict[str, object]] = field(default_factory=dict)
    retired: dict[str, object] = field(default_factory=dict)
    worker_restarts: int = 0
    reloads: int = 0
    failed_reloads: int = 0

    def update(self, pid: int, line: bytes) -> None:
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict):
            self.live[pid] = data

    def retire(self, pid: int) -> None:
        data = self.live.pop(pid, None)
        if data is not None:
            counters = {k: v for k, v in data.items() if k not in _GAUGES}
            self.retired = _add(self.retired, counters)

    def total(self) -> dict[str, object]:
        result = dict(self.retired)
        for data in self.live.values():
            result = _add(result, data)
        return result


def _add(a: dict[str, object], b: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, dict):  # per rule, zone, check...: counts, or a histogram's buckets
            out[key] = _add(mine if isinstance(mine, dict) else {}, value)
        elif isinstance(value, list):
            base = mine if isinstance(mine, list) else [0] * len(value)
            out[key] = [x + y for x, y in zip(base, value, strict=False)]
        elif isinstance(value, int | float):
            out[key] = (mine if isinstance(mine, int | float) else 0) + value
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(agg: Aggregate, *, workers: int, generation: int) -> bytes:
    """The text exposition format (version 0.0.4)."""
    t = agg.total()
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def histogram(name: str, label: str, buckets: list[int], total: float) -> None:
        """One histogram's series; ``label`` is "" or one 'key="value"' pair."""
        before_le = f"{label}," if label else ""
        running = 0
        for bound, n in zip(SCAN_BUCKETS, buckets, strict=False):
            running += n
            lines.append(f'{name}_bucket{{{before_le}le="{bound}"}} {running}')
        running += buckets[-1] if len(buckets) > len(SCAN_BUCKETS) else 0
        lines.append(f'{name}_bucket{{{before_le}le="+Inf"}} {running}')
        tail = f"{{{label}}}" if label else ""
        lines.append(f"{name}_sum{tail} {total:.6f}")
        lines.append(f"{name}_count{tail} {running}")

    family("filterd_messages_total", "counter", "Messages scanned, by verdict.")
    for verdict, n in sorted(dict(t.get("messages") or {}).items()):  # type: ignore[call-overload]
        lines.append(f'filterd_messages_total{{verdict="{_label(verdict)}"}} {n}')
    family("filterd_requests_total", "counter", "spamd requests, by method.")
    for method, n in sorted(dict(t.get("requests") or {}).items()):  # type: ignore[call-overload]
        lines.append(f'filterd_requests_total{{method="{_label(method)}"}} {n}')
    family("filterd_errors_total", "counter", "Failed requests, by kind.")
    for kind, n in sorted(dict(t.get("errors") or {}).items()):  # type: ignore[call-overload]
        lines.append(f'filterd_errors_total{{kind="{_label(kind)}"}} {n}')
    family("filterd_scan_seconds", "histogram", "Time to scan one message.")
    buckets = list(t.get("scan_buckets") or [0] * (len(SCAN_BUCKETS) + 1))  # type: ignore[call-overload]
    histogram("filterd_scan_seconds", "", buckets, float(t.get("scan_seconds_sum") or 0.0))  # type: ignore[arg-type]
    family("filterd_async_check_seconds", "histogram",
           "Wall time of each asynchronous (network) check, from its start to its answer, failure or the "
           "scan deadline. They run concurrently, so they overlap and do not add up to the scan time.")  # fmt: skip
    sums = dict(t.get("check_seconds_sum") or {})  # type: ignore[call-overload]
    for check, check_buckets in sorted(dict(t.get("check_buckets") or {}).items()):  # type: ignore[call-overload]
        histogram("filterd_async_check_seconds", f'check="{_label(check)}"', list(check_buckets),
                  float(sums.get(check, 0.0)))  # fmt: skip
    family("filterd_scanned_bytes_total", "counter", "Bytes of mail scanned.")
    lines.append(f"filterd_scanned_bytes_total {t.get('bytes_scanned') or 0}")
    family("filterd_rule_hits_total", "counter", "Messages on which each rule fired.")
    for rule, n in sorted(dict(t.get("rule_hits") or {}).items()):  # type: ignore[call-overload]
        lines.append(f'filterd_rule_hits_total{{rule="{_label(rule)}"}} {n}')
    family("filterd_verdicts_total", "counter", "Milter and policy service answers, by service and verdict.")
    for key, n in sorted(dict(t.get("verdicts") or {}).items()):  # type: ignore[call-overload]
        service, _, verdict = key.partition(":")
        lines.append(f'filterd_verdicts_total{{service="{_label(service)}",verdict="{_label(verdict)}"}} {n}')
    family("filterd_connections_refused_total", "counter", "Connections refused (not in daemon.allowed_ips).")
    lines.append(f"filterd_connections_refused_total {t.get('refused') or 0}")
    family("filterd_connections_open", "gauge",
           "Connections open, by protocol (a worker with max_connections of one accepts no more of it).")  # fmt: skip
    for protocol, n in sorted(dict(t.get("connections") or {}).items()):  # type: ignore[call-overload]
        lines.append(f'filterd_connections_open{{protocol="{_label(protocol)}"}} {n}')
    dns = (
        ("filterd_dns_queries_total", "counter", "dns_queries", "DNS lookups sent, by zone (cache hits not counted)."),
        ("filterd_dns_failures_total", "counter", "dns_failures", "DNS lookups that timed out or failed, by zone."),
        ("filterd_dns_skipped_total", "counter", "dns_skipped", "DNS lookups skipped: the zone's breaker was open."),
        ("filterd_dns_cache_hits_total", "counter", "dns_cached", "DNS lookups answered from the cache, by zone."),
        ("filterd_dns_zone_blocked", "gauge", "dns_zone_blocked",
         "Workers whose resolver the DNS list refuses (its answers are ignored); 0 = usable."),
        ("filterd_dns_zone_breaker_open", "gauge", "dns_zone_breaker_open",
         "Workers skipping the zone after repeated failures (circuit breaker open)."),
    )  # fmt: skip
    for name, kind, key, help_text in dns:
        family(name, kind, help_text)
        for zone, n in sorted(dict(t.get(key) or {}).items()):  # type: ignore[call-overload]
            lines.append(f'{name}{{zone="{_label(zone)}"}} {n}')
    family("filterd_worker_restarts_total", "counter", "Workers that died and were replaced.")
    lines.append(f"filterd_worker_restarts_total {agg.worker_restarts}")
    family("filterd_reloads_total", "counter", "Configuration reloads, by result.")
    lines.append(f'filterd_reloads_total{{result="ok"}} {agg.reloads}')
    lines.append(f'filterd_reloads_total{{result="failed"}} {agg.failed_reloads}')
    family("filterd_workers", "gauge", "Worker processes serving now.")
    lines.append(f"filterd_workers {workers}")
    family("filterd_generation", "gauge", "Configuration generation (1 at start, +1 per reload).")
    lines.append(f"filterd_generation {generation}")
    return ("\n".join(lines) + "\n").encode()

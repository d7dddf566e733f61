"""DNSBL and URIBL lookups against a real DNS server (knotd on loopback serving list zones), through
the whole engine with the shipped rules, so each test shows the rule and its score in the Result.

Test relays use addresses outside the private and documentation ranges (11.22.33.44, ...): the
check never asks about non-routable ones. Nothing here leaves loopback: the only nameserver is
the fixture's."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.config import Config, DnsblConfig, DnsblZone, FrozenMap, load_config
from filterd.daemon.metrics import Aggregate, WorkerMetrics, render_prometheus
from filterd.engine.checks.dnsbl import DnsblCheck, answer_rules, reversed_ip
from filterd.engine.engine import Engine, Result, shipped_rules_dir
from filterd.engine.plugin import ScanContext, Stage
from filterd.errors import ConfigError
from filterd.net.dns import Resolver
from tests.daemon_fixture import start_daemon
from tests.dns_fixture import DelayingDnsProxy, DnsServer, MakeDelayingProxy, MakeDnsServer, MakeSilentDnsServer

pytest_plugins = ["tests.dns_fixture"]

V6 = "2a0b:1234:5678::25"
V6_LABEL = ".".join(reversed(f"{0x2A0B:04x}{0x1234:04x}{0x5678:04x}" + "0" * 16 + "0025"))

ZONES = {
    "zen.test": f"""
        44.33.22.11     A 127.0.0.2
        55.44.33.22     A 127.0.0.4
        55.44.33.22     A 127.0.0.10
        66.55.44.33     A 127.0.0.10
        77.66.55.44     A 127.0.0.3
        {V6_LABEL}      A 127.0.0.2
    """,
    "dbl.test": """
        spammy-shop.com A 127.0.1.2
        phish-login.net A 127.0.1.4
        evil-helo.com   A 127.0.1.2
        bad-sender.org  A 127.0.1.2
        from-only.info  A 127.0.1.5
    """,
    "uribl.test": """
        spammy-shop.com A 127.0.0.6
        greyish.co.uk   A 127.0.0.4
        odd.biz         A 10.0.0.1
    """,
    "refusing.test": "* A 127.255.255.254",
    # DNSWL: 127.0.<category>.<trust>; 127.0.0.255 is its "refused" code.
    "dnswl.test": """
        10.3.2.81       A 127.0.15.0
        11.3.2.81       A 127.0.5.1
        12.3.2.81       A 127.0.10.2
        13.3.2.81       A 127.0.2.3
        44.33.22.11     A 127.0.20.1
    """,
}

INTERNAL = "10.1.0.0/16"


def received(ip: str, helo: str = "client.example", by: str = "mx1.example.net") -> str:
    return (
        f"Received: from {helo} ({helo} [{ip}])\n"
        f"\tby {by} (Postfix) with ESMTP id 4AB12; Mon, 12 Jan 2026 10:00:05 +0000\n"
    )


def message(*hops: str, body: str = "Hello Dana,\n\nsee you on Tuesday.\n", extra: str = "") -> bytes:
    head = "".join(hops) + (
        "From: Alex Sender <alex@sender.example>\nTo: Dana <dana@example.net>\n"
        "Date: Mon, 12 Jan 2026 10:00:00 +0000\nMessage-ID: <abc123@sender.example>\n"
        "Subject: Tuesday\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
    )
    return (head + extra + "\n" + body).encode()


INTERNAL_HOP = received("10.1.0.5", helo="mx1.example.net", by="store.example.net")


@pytest.fixture(scope="module")
def knot(make_session_dns_server: MakeDnsServer) -> DnsServer:
    return make_session_dns_server(ZONES)


@dataclasses.dataclass
class Site:
    """A configuration directory: filterd.yaml and, when asked, a rules directory of its own."""

    path: Path

    def config(self, nameserver: str, yaml: str = "", *, only_dnsbl_rules: bool = False) -> Config:
        base = f"""
            network:
              enabled: true
              internal_networks: [{INTERNAL}]
            dns:
              nameservers: ["{nameserver}"]
              timeout: 1s
            dnsbl:
              zones:
                zen: {{zone: zen.test}}
                dbl: {{zone: dbl.test}}
                uribl: {{zone: uribl.test}}
                surbl: {{enabled: false}}
                dnswl: {{zone: dnswl.test, enabled: false}}
        """
        text = textwrap.dedent(base)
        if only_dnsbl_rules:  # the shipped DNSBL rules alone, for an engine with only this check
            rules = self.path / "rules"
            rules.mkdir(exist_ok=True)
            shutil.copy(shipped_rules_dir() / "45_dnsbl.yaml", rules)
            text += f"rules:\n  dirs: ['{rules}']\n"
        path = self.path / "filterd.yaml"
        path.write_text(_merge_yaml(text, textwrap.dedent(yaml)))
        return load_config(path)


def _merge_yaml(base: str, extra: str) -> str:
    """The base configuration with `extra` laid over it (a local.d file does this for users)."""
    import yaml as pyyaml

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b

    return pyyaml.safe_dump(merge(pyyaml.safe_load(base), pyyaml.safe_load(extra) or {}))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def scan(engine: Engine, raw: bytes, ctx: ScanContext | None = None) -> Result:
    return asyncio.run(engine.scan(raw, ctx or ScanContext(no_autolearn=True)))


def scan_twice(engine: Engine, raw: bytes, caplog: pytest.LogCaptureFixture) -> tuple[Result, Result, list[str]]:
    """Two scans of one message, and the warnings the DNSBL check logged meanwhile."""
    with caplog.at_level(logging.WARNING, logger="filterd.engine.checks.dnsbl"):
        first = scan(engine, raw)
        second = scan(engine, raw)
    return first, second, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def dnsbl_hits(result: Result) -> dict[str, tuple[float, str]]:
    return {
        h.rule: (h.score if h.score is not None else 0.0, h.detail)
        for h in result.hits
        if h.rule.startswith(("RCVD_IN_", "URIBL_", "DNSBL_"))
    }


def resolver_of(engine: Engine) -> Resolver:
    assert engine.resolver is not None
    return engine.resolver


def asked(proxy: DelayingDnsProxy, zone: str) -> list[str]:
    return [name[: -len(zone) - 2] for name, _ in proxy.queries if name.endswith(f".{zone}.")]


# --- pure parts ----------------------------------------------------------------------------------


def test_reversed_ip() -> None:
    assert reversed_ip("11.22.33.44") == "44.33.22.11"
    assert reversed_ip("::ffff:11.22.33.44") == "44.33.22.11"
    assert reversed_ip(V6) == V6_LABEL and len(V6_LABEL.split(".")) == 32
    for private in ("10.1.2.3", "192.168.0.1", "127.0.0.1", "192.0.2.7", "100.64.0.1", "2001:db8::1", "fe80::1"):
        assert reversed_ip(private) is None, private
    assert reversed_ip("not-an-ip") is None


def test_answer_rules_exact_then_bitmask_then_any() -> None:
    zone = DnsblZone(
        zone="x.test",
        answers=FrozenMap({"127.0.0.2": "EXACT", "10.9.9.9": "ODD_BUT_NAMED"}),
        bitmask=FrozenMap({"2": "BIT_2", "8": "BIT_8"}),
        any_answer="ANY",
    )
    assert answer_rules(zone, "127.0.0.2") == ["EXACT"]
    assert sorted(answer_rules(zone, "127.0.0.10")) == ["BIT_2", "BIT_8"]
    assert answer_rules(zone, "127.0.0.4") == ["ANY"]
    assert answer_rules(zone, "10.9.9.9") == ["ODD_BUT_NAMED"]
    assert answer_rules(zone, "10.0.0.1") == []  # outside 127/8: a resolver rewriting NXDOMAIN
    assert answer_rules(zone, "garbage") == []


def test_answer_rules_by_last_octet_value() -> None:
    dnswl = DnsblConfig().zones["dnswl"]  # the shipped allowlist
    assert dnswl.zone == "list.dnswl.org" and dnswl.enabled and dnswl.relays == "first_untrusted"
    assert answer_rules(dnswl, "127.0.15.0") == ["RCVD_IN_DNSWL_NONE"]
    assert answer_rules(dnswl, "127.0.5.1") == ["RCVD_IN_DNSWL_LOW"]
    assert answer_rules(dnswl, "127.0.10.2") == ["RCVD_IN_DNSWL_MED"]
    assert answer_rules(dnswl, "127.0.2.3") == ["RCVD_IN_DNSWL_HI"]  # 3 is a value here, not bits 1 and 2
    assert answer_rules(dnswl, "127.0.2.4") == []
    assert answer_rules(dnswl, "10.0.0.3") == []
    assert dnswl.blocked_answers == ("127.0.0.255",) and dnswl.blocked_rule == "RCVD_IN_DNSWL_BLOCKED"


# --- IP lists --------------------------------------------------------------------------------------


def test_last_external_relay_listed_fires_rule_with_its_score(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    result = scan(engine, message(INTERNAL_HOP, received("11.22.33.44")))
    assert dnsbl_hits(result) == {"RCVD_IN_SBL": (2.596, "listed in zen.test: 11.22.33.44 -> 127.0.0.2")}
    assert not any("dnsbl" in p for p in result.problems)


def test_each_answer_fires_its_rule(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    found = dnsbl_hits(scan(engine, message(received("22.33.44.55"))))
    assert found == {
        "RCVD_IN_XBL": (0.724, "listed in zen.test: 22.33.44.55 -> 127.0.0.4"),
        "RCVD_IN_PBL": (3.558, "listed in zen.test: 22.33.44.55 -> 127.0.0.10"),
    }


def test_last_external_versus_all_untrusted(knot: DnsServer, site: Site) -> None:
    raw = message(INTERNAL_HOP, received("33.44.55.66"), received("11.22.33.44", by="client.example"))
    last = Engine.load(site.config(knot.spec))
    assert set(dnsbl_hits(scan(last, raw))) == {"RCVD_IN_PBL"}
    every = Engine.load(site.config(knot.spec, "dnsbl: {zones: {zen: {relays: all_untrusted}}}"))
    assert set(dnsbl_hits(scan(every, raw))) == {"RCVD_IN_PBL", "RCVD_IN_SBL"}


def test_trusted_and_internal_networks_change_what_is_asked(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    raw = message(received("33.44.55.66"), received("11.22.33.44", by="relay.partner.example"))
    plain = Engine.load(site.config(proxy.spec))
    assert set(dnsbl_hits(scan(plain, raw))) == {"RCVD_IN_PBL"}
    assert asked(proxy, "zen.test") == ["66.55.44.33"]
    # 33.44.55.66 is our own relay now: the host that handed the message to it is judged.
    ours = Engine.load(site.config(proxy.spec, "network: {internal_networks: [33.44.55.0/24]}"))
    assert dnsbl_hits(scan(ours, raw)) == {"RCVD_IN_SBL": (2.596, "listed in zen.test: 11.22.33.44 -> 127.0.0.2")}
    assert asked(proxy, "zen.test")[1:] == ["44.33.22.11"]
    # Trusted but not internal (a partner's relay): believed, yet still the last external one.
    partner = Engine.load(site.config(proxy.spec, "network: {trusted_networks: [33.44.55.0/24]}"))
    assert set(dnsbl_hits(scan(partner, raw))) == {"RCVD_IN_PBL"}


def test_private_relays_are_never_asked(knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    engine = Engine.load(site.config(proxy.spec, "dnsbl: {zones: {zen: {relays: all_untrusted}}}"))
    scan(engine, message(received("192.168.4.4"), received("100.64.1.1"), received("192.0.2.7")))
    assert asked(proxy, "zen.test") == []


def test_ipv6_relay_is_asked_by_nibbles(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    raw = message(f"Received: from v6.client.example (v6.client.example [IPv6:{V6}])\n\tby mx1.example.net "
                  "(Postfix) with ESMTPS id 9Q; Mon, 12 Jan 2026 10:00:05 +0000\n")  # fmt: skip
    assert dnsbl_hits(scan(engine, raw)) == {"RCVD_IN_SBL": (2.596, f"listed in zen.test: {V6} -> 127.0.0.2")}


def test_connection_from_the_caller_is_judged(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    ctx = ScanContext(client_ip="11.22.33.44", helo="client.example", no_autolearn=True)
    assert set(dnsbl_hits(scan(engine, message(), ctx))) == {"RCVD_IN_SBL"}


# --- domain lists ----------------------------------------------------------------------------------


def test_domains_from_uris_helo_sender_and_from(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec, "dnsbl: {zones: {dbl: {sources: [uri, helo, sender, from]}}}"))
    body = (
        "Offers: http://www.spammy-shop.com/a https://spammy-shop.com/b http://shop.spammy-shop.com/c\n"
        "Log in: https://secure.phish-login.net/login and http://greyish.co.uk/ and http://clean.example.org/\n"
    )
    raw = message(received("55.66.77.88", helo="mail.evil-helo.com"), body=body,
                  extra="Reply-To: x@from-only.info\n")  # fmt: skip
    raw = raw.replace(b"From: Alex Sender <alex@sender.example>", b"From: Alex <alex@news.from-only.info>")
    ctx = ScanContext(mail_from="bounce@bad-sender.org", no_autolearn=True)
    found = dnsbl_hits(scan(engine, raw, ctx))
    assert found["URIBL_DBL_PHISH"] == (2.5, "listed in dbl.test: phish-login.net -> 127.0.1.4")
    assert found["URIBL_DBL_MALWARE"] == (2.5, "listed in dbl.test: from-only.info -> 127.0.1.5")
    # Three domains gave 127.0.1.2: the HELO's first (header domains go before URI ones).
    assert found["URIBL_DBL_SPAM"] == (2.5, "listed in dbl.test: evil-helo.com -> 127.0.1.2 (+2 more)")
    assert found["URIBL_BLACK"] == (1.7, "listed in uribl.test: spammy-shop.com -> 127.0.0.6")
    assert found["URIBL_GREY"][1] == "listed in uribl.test: spammy-shop.com -> 127.0.0.6 (+1 more)"


def test_sender_falls_back_to_return_path(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    raw = message(received("55.66.77.88"), extra="Return-Path: <bounce@bad-sender.org>\n")
    assert set(dnsbl_hits(scan(engine, raw))) == {"URIBL_DBL_SPAM"}
    # The null sender names no domain; an explicit envelope wins over the header.
    assert dnsbl_hits(scan(engine, raw, ScanContext(mail_from="", no_autolearn=True))) == {}


def test_max_domains_asks_most_frequent_first(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    engine = Engine.load(site.config(proxy.spec, "dnsbl: {max_domains: 2}"))
    body = "http://a.once.com/ http://b.twice.net/1 http://b.twice.net/2 http://x.thrice.org/1 " \
           "http://x.thrice.org/2 http://y.thrice.org/3 http://10.20.30.40/ip-literal\n"  # fmt: skip
    scan(engine, message(received("55.66.77.88"), body=body))
    assert asked(proxy, "uribl.test") == ["thrice.org", "twice.net"]
    assert not any("10.20.30.40" in name or "40.30.20.10" in name for name, _ in proxy.queries)


def test_answers_outside_127_are_ignored(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec))
    assert dnsbl_hits(scan(engine, message(received("55.66.77.88"), body="see http://odd.biz/\n"))) == {}


# --- a zone that refuses our resolver --------------------------------------------------------------


def test_blocked_answer_is_no_listing_and_is_reported_once(
    make_dns_server: MakeDnsServer, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_dns_server({"zen.test": "* 1 A 127.255.255.254"})
    engine = Engine.load(site.config(server.spec, only_dnsbl_rules=True), checks=[DnsblCheck])
    raw = message(received("11.22.33.44"))
    first, second, warnings = scan_twice(engine, raw, caplog)
    for result in (first, second):
        assert dnsbl_hits(result) == {
            "DNSBL_BLOCKED": (0.0, "zen.test answered 127.255.255.254: this resolver is refused; the list is unusable")
        }
    assert len(warnings) == 1
    assert "zen.test answered 127.255.255.254: this resolver is blocked by the list" in warnings[0]
    assert resolver_of(engine).zones["zen.test"].blocked
    # The list lets us in again: the mark goes, with a word in the log.
    server.set_zone("zen.test", "44.33.22.11 A 127.0.0.2")
    time.sleep(1.1)  # the refusal was cached for its 1 s TTL
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="filterd.engine.checks.dnsbl"):
        assert set(dnsbl_hits(scan(engine, raw))) == {"RCVD_IN_SBL"}
    assert not resolver_of(engine).zones["zen.test"].blocked
    assert "answers this resolver normally again" in caplog.text


def test_uribl_refusal_code_is_its_own(knot: DnsServer, site: Site) -> None:
    # multi.uribl.com answers 127.0.0.1 to refused resolvers; the shipped uribl entry says so.
    engine = Engine.load(site.config(knot.spec, "dnsbl: {zones: {uribl: {zone: refusing.test, "
                                                "blocked_answers: ['127.255.255.254']}}}"))  # fmt: skip
    result = scan(engine, message(received("55.66.77.88"), body="http://spammy-shop.com/\n"))
    assert "URIBL_BLACK" not in dnsbl_hits(result) and "DNSBL_BLOCKED" in dnsbl_hits(result)
    assert "URIBL_DBL_SPAM" in dnsbl_hits(result)  # the other lists still count


# --- when the network checks do not run ------------------------------------------------------------


def test_nothing_asked_when_local_only_or_network_off(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    raw = message(received("11.22.33.44"))
    engine = Engine.load(site.config(proxy.spec))
    assert dnsbl_hits(scan(engine, raw, ScanContext(local_only=True, no_autolearn=True))) == {}
    off = Engine.load(site.config(proxy.spec, "network: {enabled: false}"))
    assert off.resolver is None and dnsbl_hits(scan(off, raw)) == {}
    disabled = Engine.load(site.config(proxy.spec, "dnsbl: {enabled: false}"))
    assert dnsbl_hits(scan(disabled, raw)) == {}
    assert [q for q in proxy.queries if q[0].endswith((".zen.test.", ".dbl.test.", ".uribl.test."))] == []


# --- slow, dead and cached servers -----------------------------------------------------------------


def test_parallel_lookups_take_about_one_delay(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.2)
    engine = Engine.load(site.config(proxy.spec, only_dnsbl_rules=True), checks=[DnsblCheck])
    body = "".join(f"http://www.site{i}.com/\n" for i in range(9))
    raw = message(received("11.22.33.44"), body=body)
    started = time.monotonic()
    result = scan(engine, raw)
    elapsed = time.monotonic() - started
    # zen: the relay; dbl: its HELO and the 9 link domains; uribl: the 9 link domains.
    assert len(proxy.queries) == 20
    assert set(dnsbl_hits(result)) == {"RCVD_IN_SBL"}
    assert elapsed > 0.19, elapsed  # each answer was held back 200 ms
    # Twenty lookups at once, shown at the server instead of by the elapsed time (which a loaded
    # machine stretches): all twenty were there before it sent the first answer.
    assert proxy.peak_in_flight == 20, proxy.peak_in_flight


def test_second_scan_is_answered_from_the_cache(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    engine = Engine.load(site.config(proxy.spec, only_dnsbl_rules=True), checks=[DnsblCheck])
    raw = message(received("11.22.33.44"), body="http://spammy-shop.com/ http://nothing-here.com/\n")
    first = scan(engine, raw)
    sent = len(proxy.queries)
    health = resolver_of(engine).zones
    before = {zone: h.queries for zone, h in health.items()}
    second = scan(engine, raw)
    assert dnsbl_hits(first) == dnsbl_hits(second) and "RCVD_IN_SBL" in dnsbl_hits(second)
    assert len(proxy.queries) == sent  # listings and NXDOMAINs alike came from the cache
    assert {zone: h.queries for zone, h in health.items()} == before
    assert health["zen.test"].cached == 1 and health["dbl.test"].cached == 3  # HELO + 2 links


def test_dead_server_costs_one_timeout_then_is_skipped(make_silent_dns_server: MakeSilentDnsServer, site: Site) -> None:
    silent = make_silent_dns_server()
    config = site.config(silent.spec, "dns: {timeout: 1s, breaker_failures: 2, breaker_cooldown: 1m}",
                         only_dnsbl_rules=True)  # fmt: skip
    engine = Engine.load(config, checks=[DnsblCheck])
    raw = message(received("11.22.33.44"))
    started = time.monotonic()
    first = scan(engine, raw)
    assert time.monotonic() - started < 20 * 1.0  # no hang: the 1 s timeout ends the wait
    # All lookups time out together, shown at the server rather than by the elapsed time: the
    # second query arrived while the first was still waiting out its 1 s (in sequence it could
    # only be sent after that; the two go out within a millisecond, the rest is room for load).
    assert sorted(silent.queries) == [("44.33.22.11.zen.test.", "A"), ("client.example.dbl.test.", "A")]
    assert max(silent.arrived) - min(silent.arrived) < 1.0
    assert dnsbl_hits(first) == {}
    assert any("zen.test: lookups failed (1 timeout)" in p for p in first.problems)
    scan(engine, raw)  # the second failure in a row opens each zone's breaker
    resolver = resolver_of(engine)
    assert resolver.breaker_state("zen.test") == "open"
    asked_before = len(silent.queries)
    third = scan(engine, raw)
    assert len(silent.queries) == asked_before  # skipped without asking: nothing to wait for
    assert any("zen.test: lookups failed (1 skipped)" in p for p in third.problems)


def test_check_returns_what_it_has_at_the_scan_deadline(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    # zen answers at once, the domain lists take 30 s: the scan ends at its 0.6 s deadline with
    # the zen listing and a note about the rest.
    def slow_domains(query: Any) -> float:
        return 0.0 if str(query.question[0].name).endswith(".zen.test.") else 30.0

    proxy = make_delaying_proxy(knot, delay=slow_domains)
    config = site.config(proxy.spec, "{dns: {timeout: 5s}, rules: {scan_deadline: 600ms}}", only_dnsbl_rules=True)
    engine = Engine.load(config, checks=[DnsblCheck])
    started = time.monotonic()
    result = scan(engine, message(received("11.22.33.44"), body="http://spammy-shop.com/\n"))
    elapsed = time.monotonic() - started
    assert set(dnsbl_hits(result)) == {"RCVD_IN_SBL"}
    # It waited for the slow lists until (about) the deadline. The domain lists are held 30 s, so
    # only the 0.6 s deadline or the 5 s DNS timeout can end their lookups: finishing before the
    # timeout means the deadline did (8x headroom for a loaded machine); that the slow answers
    # were not used is the note below, that the check itself stopped in time is no CHECK_ERROR.
    assert 0.5 < elapsed < 5.0, elapsed
    assert not any(h.rule.startswith("CHECK_ERROR") for h in result.hits)  # we finished before the engine gave up
    assert any("dbl.test" in p and "uribl.test" in p for p in result.problems), result.problems


# --- a site's own list -----------------------------------------------------------------------------


def test_site_list_with_its_own_negative_rule(knot: DnsServer, site: Site, make_dns_server: MakeDnsServer) -> None:
    local_rules = site.path / "local-rules"
    local_rules.mkdir()
    (local_rules / "90_site.yaml").write_text(
        "RCVD_IN_SITE_WL:\n  eval: dnsbl\n  describe: Relay in our partners' welcome list\n"
        "  tflags: [net, nice]\n  score: -2.3\n"
    )
    knot_zones = dict(ZONES, **{"wl.test": "44.33.22.11 A 127.0.10.2"})
    server = make_dns_server(knot_zones)
    yaml = f"""
        rules: {{extra_dirs: ['{local_rules}']}}
        dnsbl: {{zones: {{sitewl: {{zone: wl.test, answers: {{"127.0.10.2": RCVD_IN_SITE_WL}}}}}}}}
    """
    engine = Engine.load(site.config(server.spec, yaml))
    found = dnsbl_hits(scan(engine, message(received("11.22.33.44"))))
    assert found["RCVD_IN_SITE_WL"] == (-2.3, "listed in wl.test: 11.22.33.44 -> 127.0.10.2")
    assert "RCVD_IN_SBL" in found


# --- DNSWL, an allowlist ---------------------------------------------------------------------------

DNSWL_ON = "dnsbl: {zones: {dnswl: {enabled: true}}}"
REFUSED = ": this resolver is refused; the list is unusable"


@pytest.mark.parametrize(
    ("ip", "rule", "score", "answer"),
    [
        ("81.2.3.10", "RCVD_IN_DNSWL_NONE", -0.0001, "127.0.15.0"),
        ("81.2.3.11", "RCVD_IN_DNSWL_LOW", -0.7, "127.0.5.1"),
        ("81.2.3.12", "RCVD_IN_DNSWL_MED", -2.3, "127.0.10.2"),
        ("81.2.3.13", "RCVD_IN_DNSWL_HI", -5.0, "127.0.2.3"),
    ],
)
def test_dnswl_trust_level_fires_its_nice_rule(
    knot: DnsServer, site: Site, ip: str, rule: str, score: float, answer: str
) -> None:
    engine = Engine.load(site.config(knot.spec, DNSWL_ON))
    raw = message(INTERNAL_HOP, received(ip))
    result = scan(engine, raw)
    assert dnsbl_hits(result) == {rule: (score, f"listed in dnswl.test: {ip} -> {answer}")}
    assert "nice" in engine.rules.info[rule].tflags and "net" in engine.rules.info[rule].tflags
    assert not any("dnsbl" in p for p in result.problems)
    # Everything else equal (the same site without the allowlist), the message scores that much less
    # (totals are rounded to 3 decimals: NONE's -0.0001 shows in the report, hardly in the total).
    without = scan(Engine.load(site.config(knot.spec)), raw)
    assert result.score == pytest.approx(without.score + score, abs=1e-3)


def test_dnswl_unlisted_relay_fires_nothing(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    engine = Engine.load(site.config(proxy.spec, DNSWL_ON))
    result = scan(engine, message(INTERNAL_HOP, received("81.2.3.99")))
    assert dnsbl_hits(result) == {}
    assert asked(proxy, "dnswl.test") == ["99.3.2.81"]  # asked, and not listed
    assert not any("dnsbl" in p for p in result.problems)


def test_dnswl_refusal_fires_only_its_blocked_rule_and_is_logged_once(
    make_dns_server: MakeDnsServer, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_dns_server({"dnswl.test": "* 1 A 127.0.0.255", "zen.test": [], "dbl.test": [], "uribl.test": []})
    engine = Engine.load(site.config(server.spec, DNSWL_ON, only_dnsbl_rules=True), checks=[DnsblCheck])
    raw = message(received("81.2.3.13"))
    first, second, warnings = scan_twice(engine, raw, caplog)
    for result in (first, second):
        assert dnsbl_hits(result) == {"RCVD_IN_DNSWL_BLOCKED": (0.0, f"dnswl.test answered 127.0.0.255{REFUSED}")}
        assert result.score == 0.0
        assert not any("dnsbl" in p for p in result.problems)
    assert len(warnings) == 1
    assert "dnswl.test answered 127.0.0.255: this resolver is blocked by the list" in warnings[0]
    assert resolver_of(engine).zones["dnswl.test"].blocked
    # Answered normally again: the trust level counts again, and the mark goes.
    server.set_zone("dnswl.test", "13.3.2.81 A 127.0.2.3")
    time.sleep(1.1)  # the refusal was cached for its 1 s TTL
    assert dnsbl_hits(scan(engine, raw)) == {"RCVD_IN_DNSWL_HI": (-5.0, "listed in dnswl.test: 81.2.3.13 -> 127.0.2.3")}
    assert not resolver_of(engine).zones["dnswl.test"].blocked


def test_dnswl_and_a_blocklist_refused_together_are_told_apart(make_dns_server: MakeDnsServer, site: Site) -> None:
    server = make_dns_server({"dnswl.test": "* 1 A 127.0.0.255", "zen.test": "* 1 A 127.255.255.254"})
    engine = Engine.load(site.config(server.spec, DNSWL_ON, only_dnsbl_rules=True), checks=[DnsblCheck])
    found = dnsbl_hits(scan(engine, message(received("81.2.3.13"))))
    assert found == {
        "DNSBL_BLOCKED": (0.0, f"zen.test answered 127.255.255.254{REFUSED}"),
        "RCVD_IN_DNSWL_BLOCKED": (0.0, f"dnswl.test answered 127.0.0.255{REFUSED}"),
    }


def test_dnswl_asks_only_the_last_external_relay(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    # 81.2.3.13 (high trust) handed the message to 81.2.3.99 (unlisted), which handed it to us.
    raw = message(INTERNAL_HOP, received("81.2.3.99"), received("81.2.3.13", by="relay.elsewhere.example"))
    engine = Engine.load(site.config(proxy.spec, DNSWL_ON))
    assert dnsbl_hits(scan(engine, raw)) == {}
    assert asked(proxy, "dnswl.test") == ["99.3.2.81"]
    # The connection beats the headers: a listed client is judged, not the hosts behind it.
    ctx = ScanContext(client_ip="81.2.3.12", helo="client.example", no_autolearn=True)
    assert set(dnsbl_hits(scan(engine, raw, ctx))) == {"RCVD_IN_DNSWL_MED"}
    # Once 81.2.3.99 is our own relay, the host behind it is the last external one and counts.
    ours = Engine.load(site.config(proxy.spec, f"{{network: {{internal_networks: [{INTERNAL}, 81.2.3.99/32]}}, "
                                               f"{DNSWL_ON}}}"))  # fmt: skip
    assert dnsbl_hits(scan(ours, raw)) == {"RCVD_IN_DNSWL_HI": (-5.0, "listed in dnswl.test: 81.2.3.13 -> 127.0.2.3")}
    assert asked(proxy, "dnswl.test") == ["99.3.2.81", "12.3.2.81", "13.3.2.81"]


def test_behind_a_trusted_partner_relay_dnswl_vouches_for_its_client_a_blocklist_for_the_partner(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    """A partner's relay (trusted, not internal) handed us what 11.22.33.44 gave it. The
    blocklist judges the last external relay, the partner; the allowlist the host the trusted
    part received the message from, whose address a trusted relay wrote down (SpamAssassin's
    -lastexternal and -firsttrusted). At connect, only the blocklist asks about the partner."""
    proxy = make_delaying_proxy(knot, delay=0.0)
    raw = message(INTERNAL_HOP, received("33.44.55.66"), received("11.22.33.44", by="relay.partner.example"))
    partner = f"{{network: {{trusted_networks: [33.44.55.0/24]}}, {DNSWL_ON}}}"
    engine = Engine.load(site.config(proxy.spec, partner))
    assert dnsbl_hits(scan(engine, raw)) == {
        "RCVD_IN_PBL": (3.558, "listed in zen.test: 33.44.55.66 -> 127.0.0.10"),
        "RCVD_IN_DNSWL_LOW": (-0.7, "listed in dnswl.test: 11.22.33.44 -> 127.0.20.1"),
    }
    assert asked(proxy, "zen.test") == ["66.55.44.33"] and asked(proxy, "dnswl.test") == ["44.33.22.11"]
    # The partner connecting (a milter's CONNECT): the blocklist asks about it there and then,
    # the allowlist waits for the headers to name the host behind it.
    ctx = ScanContext(client_ip="33.44.55.66", helo="relay.partner.example", no_autolearn=True)

    async def staged(fresh: Engine) -> tuple[list[str], Result]:
        staged_scan = fresh.new_scan(ctx)
        at_connect = [h.rule for h in await fresh.run_stage(staged_scan, Stage.CONNECT)]
        return at_connect, await fresh.finish(staged_scan, raw)

    before = len(proxy.queries)
    at_connect, result = asyncio.run(staged(Engine.load(site.config(proxy.spec, partner))))  # a cold cache
    assert at_connect == ["RCVD_IN_PBL"]
    assert {"RCVD_IN_PBL", "RCVD_IN_DNSWL_LOW"} <= set(dnsbl_hits(result))
    later = [name for name, _ in proxy.queries[before:] if name.endswith((".zen.test.", ".dnswl.test."))]
    assert sorted(later) == ["44.33.22.11.dnswl.test.", "66.55.44.33.zen.test."]  # each asked once
    # In last_external mode the allowlist asks about the partner instead: not listed.
    before = len(proxy.queries)
    last = "{network: {trusted_networks: [33.44.55.0/24]}, dnsbl: {zones: {dnswl: "
    last += "{enabled: true, relays: last_external}}}}"
    assert "RCVD_IN_DNSWL_LOW" not in dnsbl_hits(scan(Engine.load(site.config(proxy.spec, last)), raw))
    dnswl_asked = [name for name, _ in proxy.queries[before:] if name.endswith(".dnswl.test.")]
    assert dnswl_asked == ["66.55.44.33.dnswl.test."]


def test_dnswl_and_a_blocklist_on_the_same_relay(knot: DnsServer, site: Site) -> None:
    # One relay, two lists: each says its own (SpamAssassin adds them up the same way).
    engine = Engine.load(site.config(knot.spec, DNSWL_ON))
    found = dnsbl_hits(scan(engine, message(INTERNAL_HOP, received("11.22.33.44"))))
    assert found == {
        "RCVD_IN_SBL": (2.596, "listed in zen.test: 11.22.33.44 -> 127.0.0.2"),
        "RCVD_IN_DNSWL_LOW": (-0.7, "listed in dnswl.test: 11.22.33.44 -> 127.0.20.1"),
    }


def test_dnswl_not_asked_when_network_off_local_only_or_zone_off(
    knot: DnsServer, site: Site, make_delaying_proxy: MakeDelayingProxy
) -> None:
    proxy = make_delaying_proxy(knot, delay=0.0)
    raw = message(received("81.2.3.13"))
    off = Engine.load(site.config(proxy.spec, f"{{network: {{enabled: false}}, {DNSWL_ON}}}"))
    assert off.resolver is None and dnsbl_hits(scan(off, raw)) == {}
    on = Engine.load(site.config(proxy.spec, DNSWL_ON))
    assert dnsbl_hits(scan(on, raw, ScanContext(local_only=True, no_autolearn=True))) == {}
    assert dnsbl_hits(scan(Engine.load(site.config(proxy.spec, "dnsbl: {enabled: false}")), raw)) == {}
    assert dnsbl_hits(scan(Engine.load(site.config(proxy.spec)), raw)) == {}  # dnswl: {enabled: false}
    assert asked(proxy, "dnswl.test") == []
    assert set(dnsbl_hits(scan(on, raw))) == {"RCVD_IN_DNSWL_HI"}  # the same engine, network allowed
    assert asked(proxy, "dnswl.test") == ["13.3.2.81"]


def test_last_octet_values_are_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text("dnsbl:\n  zones:\n    mine:\n      zone: wl.test\n      last_octet: {'256': MINE, 'x': MINE_X}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "dnsbl.zones.mine.last_octet: expected last-octet values 0..255, got '256'" in text
    assert "got 'x'" in text


# --- metrics ---------------------------------------------------------------------------------------


def test_zone_health_reaches_the_prometheus_text(knot: DnsServer, site: Site) -> None:
    engine = Engine.load(site.config(knot.spec, only_dnsbl_rules=True), checks=[DnsblCheck])
    scan(engine, message(received("11.22.33.44")))
    resolver = resolver_of(engine)
    resolver.mark_blocked("dbl.test")
    metrics = WorkerMetrics()
    metrics.observe_dns(resolver)
    agg = Aggregate()
    agg.update(1, metrics.snapshot())
    agg.update(2, metrics.snapshot())
    text = render_prometheus(agg, workers=2, generation=1).decode()
    assert 'filterd_dns_queries_total{zone="zen.test"} 2' in text  # one lookup in each of 2 workers
    assert 'filterd_dns_zone_blocked{zone="dbl.test"} 2' in text
    assert 'filterd_dns_zone_blocked{zone="zen.test"} 0' in text
    assert 'filterd_dns_zone_breaker_open{zone="zen.test"} 0' in text
    assert "# TYPE filterd_dns_failures_total counter" in text
    # A worker that is gone keeps its counts, but its gauges go with it.
    agg.retire(2)
    text = render_prometheus(agg, workers=1, generation=1).decode()
    assert 'filterd_dns_queries_total{zone="zen.test"} 2' in text
    assert 'filterd_dns_zone_blocked{zone="dbl.test"} 1' in text


@pytest.fixture
def dnsbl_daemon(tmp_path: Path, knot: DnsServer) -> Iterator[Any]:
    config = f"""
network: {{enabled: true}}
dns: {{nameservers: ["{knot.spec}"], timeout: 1s}}
dnsbl:
  zones: {{zen: {{zone: zen.test}}, dbl: {{zone: dbl.test}}, uribl: {{zone: uribl.test}}, surbl: {{enabled: false}}}}
"""
    daemon = start_daemon(tmp_path, config=config, workers=1)
    yield daemon
    daemon.stop()


def test_daemon_metrics_show_dns_zones(dnsbl_daemon: Any) -> None:
    raw = message(received("11.22.33.44"))
    reply = dnsbl_daemon.request(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(raw) + raw)
    assert b"RCVD_IN_SBL" in reply
    time.sleep(1.5)  # workers report about once a second
    with urllib.request.urlopen(f"http://127.0.0.1:{dnsbl_daemon.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'filterd_dns_queries_total{zone="zen.test"} 1' in text
    assert 'filterd_dns_zone_blocked{zone="zen.test"} 0' in text
    assert 'filterd_rule_hits_total{rule="RCVD_IN_SBL"} 1' in text


def test_zone_answer_codes_are_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text(
        "dnsbl:\n  zones:\n    mine:\n      zone: wl.test\n"
        "      answers: {'127.0.10': RCVD_IN_MINE}\n      bitmask: {'0x8': MINE_BIT}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "dnsbl.zones.mine.answers: expected IPv4 answer addresses such as 127.0.0.2, got '127.0.10'" in text
    assert "dnsbl.zones.mine.bitmask: expected last-octet bit values 1..255" in text

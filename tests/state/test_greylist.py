"""Greylisting over both store backends, with the clock injected (no waiting for minutes)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from filterd.config import Duration, GreylistConfig, default_config, load_config
from filterd.errors import ConfigError, StateError
from filterd.greylist import Greylist, GreylistDecision, normalize_sender
from filterd.state import RedisStateStore
from tests.redis_fixture import MakeRedisServer
from tests.state.conftest import MakeStore

pytest_plugins = ["tests.redis_fixture"]

T = TypeVar("T")
T0 = 1_700_000_000.0
MINUTE, DAY = 60.0, 86400.0
IP = "192.0.2.10"
FROM, TO = "sender@example.org", "user@example.net"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def grey_config(**changes: Any) -> GreylistConfig:
    return dataclasses.replace(GreylistConfig(enabled=True), **changes)


Scenario = Callable[[Greylist], Coroutine[Any, Any, None]]


def with_greylist(make_store: MakeStore, scenario: Scenario, **changes: Any) -> None:
    async def go() -> None:
        store = make_store()
        try:
            await scenario(Greylist(grey_config(**changes), store))
        finally:
            await store.close()

    run(go())


def test_defaults_and_config_problems(tmp_path: Path) -> None:
    cfg = default_config().greylist
    assert (cfg.enabled, cfg.delay, cfg.retry_window, cfg.expiry) == (False, Duration(300), 2 * DAY, 35 * DAY)
    assert (cfg.ipv4_prefix, cfg.ipv6_prefix, cfg.auto_whitelist_after, cfg.normalize_sender) == (24, 64, 5, True)
    assert cfg.message == "451 4.7.1 Greylisted, please try again later" and cfg.exempt_networks == ()
    path = tmp_path / "filterd.yaml"
    path.write_text("greylist:\n  delay: 3d\n")
    with pytest.raises(ConfigError, match="greylist.delay: expected a duration between 0s and 1d, got '3d'"):
        load_config(path)
    path.write_text("greylist:\n  message: 550 5.7.1 go away\n")
    with pytest.raises(ConfigError, match="greylist.message: expected '4xx 4.x.x text', got '550 5.7.1 go away'"):
        load_config(path)
    path.write_text("greylist:\n  delay: 10m\n  retry_window: 5m\n")
    with pytest.raises(ConfigError, match="greylist.retry_window: expected a duration >= delay"):
        load_config(path)
    path.write_text("greylist:\n  exempt_networks: [198.51.100.0/24]\n  message: 450 4.2.0 later\n")
    loaded = load_config(path).greylist
    assert loaded.exempt_networks == (ipaddress.ip_network("198.51.100.0/24"),) and loaded.message == "450 4.2.0 later"


def test_first_sight_defers_early_retry_defers_late_retry_passes(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        first = await grey.decide(IP, FROM, TO, now=T0)
        assert first == GreylistDecision("defer", "first seen", 300.0, "451 4.7.1 Greylisted, please try again later")
        assert first.deferred
        early = await grey.decide(IP, FROM, TO, now=T0 + 2 * MINUTE)
        assert (early.action, early.delay_left, early.reason) == ("defer", 180.0, "retried too early, 180s left")
        late = await grey.decide(IP, FROM, TO, now=T0 + 5 * MINUTE)
        assert (late.action, late.reason, late.reply) == ("pass", "retried after 300s", "")
        later = await grey.decide(IP, FROM, TO, now=T0 + 3 * DAY)
        assert (later.action, later.reason) == ("pass", "triplet known")
        # Each part of the triplet counts.
        assert (await grey.decide(IP, "other@example.org", TO, now=T0 + 3 * DAY)).deferred
        assert (await grey.decide(IP, FROM, "other@example.net", now=T0 + 3 * DAY)).deferred

    with_greylist(make_store, scenario)


def test_clients_are_grouped_by_prefix(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide("192.0.2.10", FROM, TO, now=T0)).deferred
        assert not (await grey.decide("192.0.2.200", FROM, TO, now=T0 + 6 * MINUTE)).deferred  # same /24
        assert (await grey.decide("192.0.3.10", FROM, TO, now=T0 + 6 * MINUTE)).deferred  # another /24
        assert (await grey.decide("::ffff:192.0.2.99", FROM, TO, now=T0 + 7 * MINUTE)).action == "pass"
        assert (await grey.decide("2001:db8:1:2::1", FROM, TO, now=T0)).deferred
        assert not (await grey.decide("2001:db8:1:2:ffff::9", FROM, TO, now=T0 + 6 * MINUTE)).deferred  # same /64
        assert (await grey.decide("2001:db8:1:3::1", FROM, TO, now=T0 + 6 * MINUTE)).deferred

    with_greylist(make_store, scenario)


def test_prefix_lengths_are_configurable(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide("192.0.2.10", FROM, TO, now=T0)).deferred
        assert (await grey.decide("192.0.2.11", FROM, TO, now=T0 + 6 * MINUTE)).deferred  # /32: another client
        assert (await grey.decide("2001:db8::1", FROM, TO, now=T0)).deferred
        assert not (await grey.decide("2001:db8:ffff::1", FROM, TO, now=T0 + 6 * MINUTE)).deferred  # same /32

    with_greylist(make_store, scenario, ipv4_prefix=32, ipv6_prefix=32)


def test_sender_variants_fold_into_one_triplet(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide(IP, "list+bounces-1234@lists.example.org", TO, now=T0)).deferred
        for variant in ("<List+bounces-98765@Lists.Example.org>", "prvs=0123456789=list@lists.example.org"):
            assert (await grey.decide(IP, variant, TO, now=T0 + 6 * MINUTE)).action == "pass", variant
        assert (await grey.decide(IP, "SRS0=HHH1=TT=example.com=alice@fwd.example", TO, now=T0)).deferred
        srs = "SRS0=zZz9=XY=example.com=alice@fwd.example"
        assert (await grey.decide(IP, srs, TO, now=T0 + 6 * MINUTE)).action == "pass"

    with_greylist(make_store, scenario)


def test_normalize_sender() -> None:
    assert normalize_sender("<Alice+Tag@Example.COM>") == "alice@example.com"
    assert normalize_sender("bounce-12345-678@list.example") == "bounce-#-#@list.example"
    assert normalize_sender("prvs=1a2b3c4d5e=bob@example.com") == "bob@example.com"
    assert normalize_sender("SRS0=abcd=T4=example.com=bob@fwd.example") == "srs0=example.com=bob@fwd.example"
    srs1 = "SRS1=x1y2=fwd1.example==abcd=T4=example.com=bob@fwd2.example"
    assert normalize_sender(srs1) == "srs1=fwd1.example==example.com=bob@fwd2.example"
    assert normalize_sender("") == normalize_sender("<>") == ""
    assert normalize_sender("+only@example.com") == "+only@example.com"
    assert normalize_sender("postmaster") == "postmaster"


def test_sender_normalisation_can_be_turned_off(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide(IP, "list+1@example.org", TO, now=T0)).deferred
        assert (await grey.decide(IP, "list+2@example.org", TO, now=T0 + 6 * MINUTE)).deferred
        assert (await grey.decide(IP, "LIST+1@example.org", TO, now=T0 + 6 * MINUTE)).action == "pass"

    with_greylist(make_store, scenario, normalize_sender=False)


def test_null_sender_is_greylisted_by_its_triplet(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide(IP, "<>", TO, now=T0)).deferred
        assert (await grey.decide(IP, "", TO, now=T0 + 6 * MINUTE)).action == "pass"

    with_greylist(make_store, scenario)


def test_a_client_whose_retries_passed_n_times_is_auto_whitelisted(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide(IP, "sa@example.org", TO, now=T0)).deferred
        assert (await grey.decide(IP, "sa@example.org", TO, now=T0 + 6 * MINUTE)).action == "pass"  # 1 pass
        # The same triplet again does not count twice.
        assert (await grey.decide(IP, "sa@example.org", TO, now=T0 + 7 * MINUTE)).reason == "triplet known"
        assert (await grey.decide(IP, "sc@example.org", TO, now=T0 + 7 * MINUTE)).deferred
        assert (await grey.decide(IP, "sb@example.org", TO, now=T0)).deferred
        assert (await grey.decide(IP, "sb@example.org", TO, now=T0 + 6 * MINUTE)).action == "pass"  # 2 passes
        # Now a new triplet from the network passes at once.
        fresh = await grey.decide("192.0.2.99", "new@example.com", "x@example.net", now=T0 + 8 * MINUTE)
        assert (fresh.action, fresh.reason) == ("pass", "client 192.0.2.0/24 auto-whitelisted after 2 retries")
        # Another network is not.
        assert (await grey.decide("198.51.100.1", "new@example.com", TO, now=T0 + 8 * MINUTE)).deferred
        # The whitelisting lasts while the client keeps coming within the expiry, and ends after.
        later = T0 + 8 * MINUTE + 30 * DAY
        assert (await grey.decide(IP, "z@example.com", TO, now=later)).action == "pass"
        assert (await grey.decide(IP, "y@example.com", TO, now=later + 36 * DAY)).deferred

    with_greylist(make_store, scenario, auto_whitelist_after=2)


def test_auto_whitelisting_off(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        for name in "abcd":  # (digits would fold into one sender)
            assert (await grey.decide(IP, f"{name}@example.org", TO, now=T0)).deferred
            assert (await grey.decide(IP, f"{name}@example.org", TO, now=T0 + 6 * MINUTE)).action == "pass"
        assert (await grey.decide(IP, "fresh@example.org", TO, now=T0 + 7 * MINUTE)).deferred

    with_greylist(make_store, scenario, auto_whitelist_after=0)


def test_exemptions(make_store: MakeStore) -> None:
    exempt = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:e::/48"))

    async def go() -> None:
        store = make_store()
        try:
            config = default_config()
            config = dataclasses.replace(
                config,
                greylist=grey_config(exempt_networks=exempt),
                network=dataclasses.replace(config.network, trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),)),
            )
            grey = Greylist.from_config(config, store)
            cases = {
                ("198.51.100.7", False, False): "client 198.51.100.7 is in an exempt or trusted network",
                ("2001:db8:e:1::5", False, False): "client 2001:db8:e:1::5 is in an exempt or trusted network",
                ("10.1.2.3", False, False): "client 10.1.2.3 is in an exempt or trusted network",
                ("127.0.0.1", False, False): "client 127.0.0.1 is in an exempt or trusted network",
                ("::1", False, False): "client ::1 is in an exempt or trusted network",
                (IP, True, False): "authenticated sender",
                (IP, False, True): "sender is welcome-listed",
                ("unknown", False, False): "client address 'unknown' unknown",
            }
            for (ip, auth, welcome), reason in cases.items():
                decision = await grey.decide(ip, FROM, TO, now=T0, authenticated=auth, welcomelisted=welcome)
                assert decision == GreylistDecision("exempt", reason), (ip, auth, welcome)
            assert [e async for e in grey.entries()] == []  # exemptions remember nothing
            off = Greylist(GreylistConfig(), store)  # the default: off
            assert await off.decide(IP, FROM, TO) == GreylistDecision("exempt", "greylisting is off")
        finally:
            await store.close()

    run(go())


def test_known_triplets_expire_and_unretried_ones_start_over(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        assert (await grey.decide(IP, FROM, TO, now=T0)).deferred
        assert (await grey.decide(IP, FROM, TO, now=T0 + 6 * MINUTE)).action == "pass"
        assert (await grey.decide(IP, FROM, TO, now=T0 + 6 * MINUTE + 35 * DAY)).action == "pass"  # within expiry
        gone = await grey.decide(IP, FROM, TO, now=T0 + 6 * MINUTE + 71 * DAY)  # 36 days unseen
        assert (gone.action, gone.reason) == ("defer", "first seen")
        # A triplet that does not retry within the retry window starts over.
        assert (await grey.decide(IP, "slow@example.org", TO, now=T0)).deferred
        restart = await grey.decide(IP, "slow@example.org", TO, now=T0 + 2 * DAY + 1)
        assert (restart.action, restart.reason) == ("defer", "first seen")
        assert (await grey.decide(IP, "slow@example.org", TO, now=T0 + 2 * DAY + 6 * MINUTE)).action == "pass"

    with_greylist(make_store, scenario)


def test_two_greylists_on_one_backend_share_state(make_store: MakeStore) -> None:
    """As two workers (or, on Redis, two machines) do."""

    async def go() -> None:
        stores = [make_store(), make_store()]
        try:
            one, two = (Greylist(grey_config(), s) for s in stores)
            assert (await one.decide(IP, FROM, TO, now=T0)).deferred
            assert (await two.decide(IP, FROM, TO, now=T0 + MINUTE)).delay_left == 240
            assert (await two.decide(IP, FROM, TO, now=T0 + 6 * MINUTE)).action == "pass"
            assert (await one.decide(IP, FROM, TO, now=T0 + 7 * MINUTE)).reason == "triplet known"
        finally:
            for store in stores:
                await store.close()

    run(go())


def test_entries_and_remove(make_store: MakeStore) -> None:
    async def scenario(grey: Greylist) -> None:
        await grey.decide(IP, FROM, TO, now=T0)
        await grey.decide(IP, FROM, TO, now=T0 + 6 * MINUTE)
        await grey.decide("198.51.100.1", "<>", TO, now=T0)
        entries = sorted([e async for e in grey.entries()], key=lambda e: e.client)
        assert [(e.client, e.sender, e.recipient, e.first, e.last, e.passed) for e in entries] == [
            ("192.0.2.0/24", FROM, TO, T0, T0 + 6 * MINUTE, True),
            ("198.51.100.0/24", "", TO, T0, T0, False),
        ]
        assert entries[0].key == grey.triplet_key(IP, FROM, TO)
        assert await grey.remove("192.0.2.77") == 2  # the triplet and the pass count
        assert await grey.remove("198.51.100.0/24") == 1
        assert [e async for e in grey.entries()] == []
        assert (await grey.decide(IP, FROM, TO, now=T0 + 7 * MINUTE)).reason == "first seen"
        with pytest.raises(ValueError, match="not an IP address"):
            await grey.remove("mail.example.com")

    with_greylist(make_store, scenario)


def test_a_failing_store_raises_state_error(make_redis_server: MakeRedisServer) -> None:
    server = make_redis_server()
    url = server.url
    server.stop()

    async def go() -> None:
        store = RedisStateStore(url, timeout=0.5)
        try:
            with pytest.raises(StateError):
                await Greylist(grey_config(), store).decide(IP, FROM, TO)
        finally:
            await store.close()

    run(go())

"""Sender reputation: the REPUTATION rule in real engine results, on both store backends, and
`filterd reputation show|remove` as a user runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from filterd.config import Config, Duration, default_config
from filterd.engine.checks.lists import ListsCheck
from filterd.engine.checks.reputation import ReputationCheck, reputation_of
from filterd.engine.engine import Engine, Result, shipped_rules_dir
from filterd.engine.plugin import ScanContext
from filterd.state import RedisStateStore
from tests.conftest import offline_config
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]

T = TypeVar("T")

RULES = """\
SPAMMY:
  body: '/\\bbuy now\\b/i'
  describe: Test rule worth 6
  score: 6
NOAWL_TEST:
  body: '/\\bnoawl-marker\\b/i'
  describe: A rule that keeps its message out of reputation
  tflags: [noawl]
  score: 0.5
"""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def message(sender: str = "Alice <Alice@Example.com>", body: str = "hello there", received_ip: str = "") -> bytes:
    date = "Mon, 1 Jan 2024 00:00:00 +0000"
    head = f"Received: from relay.example (relay.example [{received_ip}]) by mx.test; {date}\r\n" if received_ip else ""
    return (f"{head}From: {sender}\r\nTo: bob@example.net\r\nSubject: test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <x@example.com>\r\n\r\n{body}\r\n").encode()  # fmt: skip


def rep_config(tmp_path: Path, **reputation: Any) -> Config:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "10_test.yaml").write_text(RULES)
    for name in ("75_lists.yaml", "76_reputation.yaml"):
        (rules / name).write_text((shipped_rules_dir() / name).read_text())
    cfg = offline_config()
    return dataclasses.replace(
        cfg,
        rules=dataclasses.replace(cfg.rules, dirs=(str(rules),)),
        reputation=dataclasses.replace(cfg.reputation, enabled=True, **reputation),
        lists=dataclasses.replace(cfg.lists, welcomelist_from=("friend@example.com",)),
    )


class Scanner:
    """An engine with the lists and reputation checks, closed at the end of the test."""

    def __init__(self, config: Config, state_dir: Path | str) -> None:
        self.engine = Engine.load(config, checks=[ListsCheck, ReputationCheck], state_dir=str(state_dir))
        check = self.engine.check("reputation")
        assert isinstance(check, ReputationCheck)
        self.check = check

    async def scan(self, raw: bytes, ip: str = "203.0.113.5", **ctx: Any) -> Result:
        return await self.engine.scan(raw, ScanContext(client_ip=ip, **ctx))

    async def history(self, address: str) -> list[tuple[str, int, float]]:
        return [(e.block, e.count, round(e.mean, 3)) for e in await reputation_of(self.check.store(), address)]


def rep(result: Result) -> tuple[float | None, str] | None:
    hit = next((h for h in result.hits if h.rule == "REPUTATION"), None)
    return None if hit is None else (hit.score, hit.detail)


@pytest.fixture(params=["sqlite", "redis"])
def config_and_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Config, Path]:
    cfg = rep_config(tmp_path)
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = dataclasses.replace(cfg.state, backend="redis", redis_url=server.url)
        cfg = dataclasses.replace(cfg, state=dataclasses.replace(state, redis_key_prefix=server.unique_prefix()))
    return cfg, tmp_path / "state"


def test_defaults() -> None:
    cfg = default_config().reputation
    assert (cfg.enabled, cfg.factor, cfg.ipv4_prefix, cfg.ipv6_prefix, cfg.expiry) == (
        False,
        0.5,
        16,
        48,
        Duration(180 * 86400),
    )
    assert default_config().state.backend == "sqlite"


def test_a_spammy_history_raises_a_clean_message_and_a_clean_one_lowers_spam(
    config_and_dir: tuple[Config, Path],
) -> None:
    async def go() -> None:
        s = Scanner(*config_and_dir)
        try:
            first = await s.scan(message(body="buy now"))
            assert first.score == 6.0 and rep(first) is None  # no history yet: only recorded
            for _ in range(2):
                await s.scan(message(body="buy now"))
            clean = await s.scan(message())
            assert rep(clean) == (3.0, "mean 6.0 over 3 messages from alice@example.com / 203.0.0.0/16")
            assert clean.score == 3.0
            assert "REPUTATION" in clean.rule_names
            # The history holds scores without the reputation delta: 6, 6, 6, 0.
            assert await s.history("alice@example.com") == [("203.0.0.0/16", 4, 4.5)]

            for _ in range(3):
                await s.scan(message(sender="carol@example.org"))
            spam = await s.scan(message(sender="carol@example.org", body="buy now"))
            assert rep(spam) == (-3.0, "mean 0.0 over 3 messages from carol@example.org / 203.0.0.0/16")
            assert spam.score == 3.0
        finally:
            await s.check.aclose()

    run(go())


def test_the_factor_sets_how_far_the_score_moves(tmp_path: Path) -> None:
    async def go() -> None:
        for factor, expected in ((1.0, -6.0), (0.25, -1.5), (0.0, 0.0)):
            s = Scanner(rep_config(tmp_path, factor=factor), tmp_path / f"state{factor}")
            try:
                await s.scan(message())
                result = await s.scan(message(body="buy now"))
                hit = rep(result)
                assert hit is not None and hit[0] == expected
                assert result.score == 6.0 + expected
            finally:
                await s.check.aclose()

    run(go())


def test_each_network_has_its_own_history(config_and_dir: tuple[Config, Path]) -> None:
    async def go() -> None:
        s = Scanner(*config_and_dir)
        try:
            await s.scan(message(body="buy now"), ip="203.0.113.5")
            assert rep(await s.scan(message(), ip="203.0.200.1")) is not None  # the same /16
            assert rep(await s.scan(message(), ip="198.51.100.7")) is None  # another: no history there
            await s.scan(message(), ip="2001:db8:1:2::1")
            ipv6 = await s.scan(message(), ip="2001:db8:1:ffff::9")  # the same /48
            assert rep(ipv6) == (0.0, "mean 0.0 over 1 message from alice@example.com / 2001:db8:1::/48")
            assert await s.history("Alice@Example.com") == [
                ("198.51.0.0/16", 1, 0.0), ("2001:db8:1::/48", 2, 0.0), ("203.0.0.0/16", 2, 3.0)
            ]  # fmt: skip
        finally:
            await s.check.aclose()

    run(go())


def test_without_a_client_the_last_external_relay_counts(tmp_path: Path) -> None:
    async def go() -> None:
        s = Scanner(rep_config(tmp_path), tmp_path / "state")
        try:
            await s.scan(message(body="buy now", received_ip="192.0.2.44"), ip="")
            result = await s.scan(message(received_ip="192.0.77.1"), ip="")
            assert rep(result) == (3.0, "mean 6.0 over 1 message from alice@example.com / 192.0.0.0/16")
            await s.scan(message(), ip="")  # no relay known at all: a history of its own
            assert [b for b, _, _ in await s.history("alice@example.com")] == ["192.0.0.0/16", "none"]
        finally:
            await s.check.aclose()

    run(go())


def test_skipped_for_lists_noawl_and_no_sender_and_read_only_without_autolearn(tmp_path: Path) -> None:
    async def go() -> None:
        s = Scanner(rep_config(tmp_path), tmp_path / "state")
        try:
            await s.scan(message(sender="friend@example.com", body="buy now"))
            await s.scan(message(sender="friend@example.com"))
            assert await s.history("friend@example.com") == []  # the welcome list decides alone
            await s.scan(message(body="buy now noawl-marker"))
            assert await s.history("alice@example.com") == []
            no_sender = message(sender="undisclosed-recipients:;")
            assert rep(await s.scan(no_sender)) is None
            assert [k async for k, _ in s.check.store().scan("rep:")] == []
            # The envelope sender stands in for a From without an address.
            await s.scan(no_sender, mail_from="Bounce@Example.net")
            assert await s.history("bounce@example.net") == [("203.0.0.0/16", 1, 0.0)]
            # A one-off check reads the history but adds nothing to it.
            await s.scan(message(body="buy now"))
            peek = await s.scan(message(), no_autolearn=True)
            assert rep(peek) == (3.0, "mean 6.0 over 1 message from alice@example.com / 203.0.0.0/16")
            assert await s.history("alice@example.com") == [("203.0.0.0/16", 1, 6.0)]
        finally:
            await s.check.aclose()

    run(go())


def test_off_by_default_and_silent_without_a_state_directory(tmp_path: Path) -> None:
    async def go() -> None:
        off = dataclasses.replace(rep_config(tmp_path), reputation=default_config().reputation)
        no_dir = rep_config(tmp_path)
        for cfg, state_dir in ((off, tmp_path / "state"), (no_dir, "")):
            s = Scanner(cfg, state_dir)
            assert not s.check.active
            for _ in range(2):
                assert rep(await s.scan(message(body="buy now"))) is None
        assert not (tmp_path / "state").exists()

    run(go())


def test_the_engine_opens_no_store_until_a_scan(tmp_path: Path) -> None:
    """The daemon builds the engine before forking workers: no thread or file may exist yet."""
    s = Scanner(rep_config(tmp_path), tmp_path / "state")
    assert s.check._store is None and not (tmp_path / "state").exists()


def test_two_daemons_on_one_redis_share_histories(tmp_path: Path, redis_server: RedisServer) -> None:
    cfg = rep_config(tmp_path)
    state = dataclasses.replace(cfg.state, backend="redis", redis_url=redis_server.url)
    cfg = dataclasses.replace(cfg, state=dataclasses.replace(state, redis_key_prefix=redis_server.unique_prefix()))

    async def go() -> None:
        one, two = Scanner(cfg, ""), Scanner(cfg, "")  # Redis needs no state directory
        try:
            await one.scan(message(body="buy now"))
            shared = rep(await two.scan(message()))
            assert shared == (3.0, "mean 6.0 over 1 message from alice@example.com / 203.0.0.0/16")
            assert isinstance(one.check.store(), RedisStateStore)
        finally:
            await one.check.aclose()
            await two.check.aclose()

    run(go())


def test_reputation_in_the_shipped_engine(tmp_path: Path) -> None:
    """With every shipped check and rule: REPUTATION is declared, scored by the check, and shown."""
    cfg = offline_config()
    cfg = dataclasses.replace(cfg, reputation=dataclasses.replace(cfg.reputation, enabled=True))
    engine = Engine.load(cfg, state_dir=str(tmp_path))
    info = engine.info("REPUTATION")
    assert info is not None and info.tflags == frozenset({"userconf", "noautolearn"}) and info.score == 0

    async def go() -> tuple[Result, Result]:
        try:
            first = await engine.scan(message(), ScanContext(client_ip="203.0.113.5"))
            second = await engine.scan(message(), ScanContext(client_ip="203.0.113.5"))
            return first, second
        finally:
            check = engine.check("reputation")
            assert isinstance(check, ReputationCheck)
            await check.aclose()

    first, second = run(go())
    assert "REPUTATION" not in first.rule_names
    assert rep(second) == (0.0, f"mean {first.score:.1f} over 1 message from alice@example.com / 203.0.0.0/16")


def _filterd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filterd", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_show_and_remove(tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def learn() -> None:
        s = Scanner(rep_config(tmp_path), state)
        try:
            for ip, body in (("203.0.113.5", "buy now"), ("203.0.113.6", "hi"), ("198.51.100.1", "hi")):
                await s.scan(message(body=body), ip=ip)
        finally:
            await s.check.aclose()

    run(learn())
    shown = _filterd("reputation", "show", "--state-dir", str(state), "ALICE@example.com")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        f"{'address':<32} {'network':<24} {'messages':>8} {'mean':>7}",
        f"{'alice@example.com':<32} {'198.51.0.0/16':<24} {1:>8} {0.0:>7.2f}",
        f"{'alice@example.com':<32} {'203.0.0.0/16':<24} {2:>8} {3.0:>7.2f}",
    ]
    removed = _filterd("reputation", "remove", "--state-dir", str(state), "alice@example.com")
    assert (removed.returncode, removed.stdout) == (0, "removed 2 histories of alice@example.com\n")
    again = _filterd("reputation", "show", "--state-dir", str(state), "alice@example.com")
    assert (again.returncode, again.stdout) == (1, "no history for alice@example.com\n")


def test_cli_greylist_list_and_remove(tmp_path: Path) -> None:
    from filterd.greylist import Greylist
    from filterd.state import open_state_store

    state = tmp_path / "state"
    cfg = default_config()

    async def seed() -> None:
        store = open_state_store(cfg, state)
        try:
            grey = Greylist(dataclasses.replace(cfg.greylist, enabled=True), store)
            await grey.decide("192.0.2.7", "", "user@example.net", now=1_700_000_000)
        finally:
            await store.close()

    run(seed())
    listed = _filterd("greylist", "list", "--state-dir", str(state))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == ["192.0.2.0/24", "<>", "user@example.net"]
    assert listed.stdout.splitlines()[1].endswith("waiting")
    removed = _filterd("greylist", "remove", "--state-dir", str(state), "192.0.2.99")
    assert (removed.returncode, removed.stdout) == (0, "removed 1 greylist records of 192.0.2.99\n")
    assert _filterd("greylist", "list", "--state-dir", str(state)).returncode == 1
    bad = _filterd("greylist", "remove", "--state-dir", str(state), "mail.example.com")
    assert bad.returncode == 64 and "not an IP address" in bad.stderr


def test_cli_reports_an_unreachable_store(tmp_path: Path) -> None:
    config = tmp_path / "filterd.yaml"
    config.write_text(textwrap.dedent("""\
        state:
          backend: redis
          redis_url: redis://127.0.0.1:1/0
          timeout: 200ms
        """))  # fmt: skip
    failed = _filterd("reputation", "show", "--config", str(config), "a@example.com")
    assert failed.returncode == 69 and "state store redis://127.0.0.1:1/0" in failed.stderr

"""Shared fixtures: small factories, never global state."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.resolver
import pytest

from filterd.config import Config, default_config
from filterd.engine.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin"

MakeEngine = Callable[..., Engine]


def offline_config(config: Config | None = None) -> Config:
    """``config`` (default: the built-in one) with network checks off: tests that want DNS
    start the local DNS server fixture and point ``dns.nameservers`` at it."""
    config = config or default_config()
    return dataclasses.replace(config, network=dataclasses.replace(config.network, enabled=False))


@pytest.fixture(autouse=True)
def _never_the_system_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in a test may ask the resolvers of /etc/resolv.conf (the brief's rule)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to use the system resolver; configure dns.nameservers")

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", refuse)


@pytest.fixture
def make_engine(tmp_path: Path) -> MakeEngine:
    """Build an engine over rule files written for the test (no shipped checks by default)."""
    counter = iter(range(1000))

    def factory(files: dict[str, str] | str, *, checks: list[type] | None = None, **rules_settings: Any) -> Engine:
        rules_dir = tmp_path / f"rules{next(counter)}"
        rules_dir.mkdir()
        if isinstance(files, str):
            files = {"10_test.yaml": files}
        for name, text in files.items():
            (rules_dir / name).write_text(textwrap.dedent(text))
        cfg = offline_config()
        cfg = dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, dirs=(str(rules_dir),), **rules_settings))
        return Engine.load(cfg, checks=checks or [])

    return factory


@pytest.fixture(scope="session")
def shipped_engine() -> Engine:
    """The engine with the shipped rule set and checks, loaded once per test session."""
    return Engine.load(offline_config())

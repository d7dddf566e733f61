"""Shared fixtures: small factories, never global state."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from filterd.config import default_config
from filterd.engine.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin"

MakeEngine = Callable[..., Engine]


@pytest.fixture
def make_engine(tmp_path: Path) -> MakeEngine:
    """Build an engine over rule files written for the test (no shipped checks by default)."""
    counter = iter(range(1000))

    def factory(files: dict[str, str] | str, *, checks: list[type] | None = None, **rules_settings: object) -> Engine:
        rules_dir = tmp_path / f"rules{next(counter)}"
        rules_dir.mkdir()
        if isinstance(files, str):
            files = {"10_test.yaml": files}
        for name, text in files.items():
            (rules_dir / name).write_text(textwrap.dedent(text))
        cfg = default_config()
        cfg = dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, dirs=(str(rules_dir),), **rules_settings))
        return Engine.load(cfg, checks=checks or [])

    return factory


@pytest.fixture(scope="session")
def shipped_engine() -> Engine:
    """The engine with the shipped rule set and checks, loaded once per test session."""
    return Engine.load()

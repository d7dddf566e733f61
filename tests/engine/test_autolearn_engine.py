"""Autolearn through the engine: clear ham and spam are learnt on the fly, in batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from filterd.engine.bayes import BayesStore
from filterd.engine.engine import Engine
from tests.conftest import offline_config

ROOT = Path(__file__).resolve().parents[2]


def test_autolearn_learns_clear_cases_and_says_so(tmp_path: Path) -> None:
    cfg = dataclasses.replace(offline_config(), state_dir=str(tmp_path))
    engine = Engine.load(cfg, state_dir=str(tmp_path))
    gtube = b"Subject: t\nFrom: a@example.org\n\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
    outcomes = {}
    for path in sorted((ROOT / "corpora").rglob("*.eml")) + [Path("gtube")]:
        raw = gtube if path.name == "gtube" else path.read_bytes()
        result = engine.scan_sync(raw)
        outcomes[path.name] = result.autolearn
    # GTUBE is noautolearn: never learnt however high it scores.
    assert outcomes["gtube"] == "no"
    learnt = [name for name, how in outcomes.items() if how in ("ham", "spam")]
    assert learnt, outcomes
    assert all(outcomes[n] == "ham" for n in learnt if n in {p.name for p in (ROOT / "corpora" / "ham").glob("*")})
    assert engine.flush_learning()
    store = BayesStore.open(tmp_path / "bayes.sqlite", cfg.bayes)
    try:
        nspam, nham = store.counts()
    finally:
        store.close()
    assert (nspam, nham) == (sum(v == "spam" for v in outcomes.values()), sum(v == "ham" for v in outcomes.values()))


def test_autolearn_off_leaves_the_store_alone(tmp_path: Path) -> None:
    cfg = dataclasses.replace(offline_config(), state_dir=str(tmp_path))
    cfg = dataclasses.replace(cfg, bayes=dataclasses.replace(cfg.bayes, autolearn=False))
    engine = Engine.load(cfg, state_dir=str(tmp_path))
    result = engine.scan_sync((ROOT / "corpora" / "ham" / "17-one-line-lunch.eml").read_bytes())
    assert result.autolearn == "disabled"

"""The Bayes check plugin: BAYES_00 ... BAYES_999 from the store's spam probability.

Bands as SpamAssassin's ``check_bayes(min, max)``: a rule fires when min < p <= max, and the
lowest band also takes p = 0. BAYES_999 (p > 0.999) fires together with BAYES_99. Nothing
fires until the store holds min_spam spam and min_ham ham messages.

The store lives in ``<state_dir>/bayes.sqlite``, the state directory given to the engine (or
``state_dir`` of the configuration); without one the check stays silent. It is opened on first
use, so that each worker process opens its own connection after fork, and refreshed at most
once a second, which bounds how stale a worker's counts can be. Scanning never creates the
file (a filter that has learnt nothing has nothing to say); `BayesCheck.store`, used to
learn, does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from filterd.engine.bayes.store import BayesStore
from filterd.engine.plugin import CheckSetup, Hit, Scan, Stage

__all__ = ["BANDS", "BayesCheck", "bayes_rules"]

STORE_FILE = "bayes.sqlite"
_REFRESH_INTERVAL = 1.0  # seconds

BANDS: tuple[tuple[str, float, float], ...] = (
    ("BAYES_00", 0.0, 0.01),
    ("BAYES_05", 0.01, 0.05),
    ("BAYES_20", 0.05, 0.20),
    ("BAYES_40", 0.20, 0.40),
    ("BAYES_50", 0.40, 0.60),
    ("BAYES_60", 0.60, 0.80),
    ("BAYES_80", 0.80, 0.95),
    ("BAYES_95", 0.95, 0.99),
    ("BAYES_99", 0.99, 1.00),
    ("BAYES_999", 0.999, 1.00),
)
"""(rule, min, max): the rule fires when min < p <= max (or p == min == 0)."""


def bayes_rules(probability: float) -> list[str]:
    """The BAYES_xx rules a probability fires (one, or BAYES_99 and BAYES_999)."""
    return [
        name for name, low, high in BANDS if (low < probability or probability == low == 0.0) and probability <= high
    ]


class BayesCheck:
    """Scores the message with the Bayes store; see the module docstring."""

    name: ClassVar[str] = "bayes"
    stage: ClassVar[Stage] = Stage.BODY
    emits: ClassVar[frozenset[str]] = frozenset(name for name, _, _ in BANDS)

    def __init__(self, setup: CheckSetup) -> None:
        self.config = setup.config.bayes
        state_dir = setup.state_dir or setup.config.state_dir
        self.path: Path | None = Path(state_dir) / STORE_FILE if state_dir and self.config.enabled else None
        self._store: BayesStore | None = None
        self._pid = 0
        self._refreshed = 0.0
        self._looked = -_REFRESH_INTERVAL  # when scanning last found no store file

    @property
    def store(self) -> BayesStore | None:
        """The store, opened (and created) on first use in this process; None without a state
        directory or with Bayes disabled."""
        if self.path is None:
            return None
        if self._store is None or self._pid != os.getpid():
            # After fork the parent's connection must not be used; a fresh one is opened.
            self._store = BayesStore.open(self.path, self.config)
            self._pid = os.getpid()
            self._refreshed = time.monotonic()
        return self._store

    def _store_for_scan(self, now: float) -> BayesStore | None:
        """The store if its file exists (looked for at most once a second)."""
        if self.path is None:
            return None
        if self._store is None or self._pid != os.getpid():
            if now - self._looked < _REFRESH_INTERVAL:
                return None
            if not self.path.exists():
                self._looked = now
                return None
        return self.store

    def run(self, scan: Scan) -> Sequence[Hit]:
        now = time.monotonic()
        store = self._store_for_scan(now)
        if store is None:
            return ()
        if now - self._refreshed >= _REFRESH_INTERVAL:
            store.refresh()
            self._refreshed = now
        probability = store.spam_probability(scan.message)
        if probability is None:
            return ()
        detail = f"score: {probability:.4f}"
        return [Hit(rule, detail) for rule in bayes_rules(probability)]

    def close(self) -> None:
        """Close the store (workers on their way out; tests)."""
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None

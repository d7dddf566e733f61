"""The Bayes check plugin: BAYES_00 ... BAYES_999 from the store's spam probability.

Bands as SpamAssassin's ``check_bayes(min, max)``: a rule fires when min < p <= max, and the
lowest band also takes p = 0. BAYES_999 (p > 0.999) fires together with BAYES_99. Nothing
fires until the store holds min_spam spam and min_ham ham messages.

The store is the one `open_bayes_store` picks: ``<state_dir>/bayes.sqlite`` in the state
directory given to the engine (or ``state_dir`` of the configuration; without one the check
stays silent), or Redis with ``state.backend: redis``. It is opened on first use, so that each
worker process opens its own connection after fork, and refreshed at most once a second, which
bounds how stale a worker's counts can be. Scanning never creates the store (a filter that has
learnt nothing has nothing to say); `BayesCheck.store`, used to learn, does.

When Redis cannot be reached, scans go on with the counts this process last read (or without
Bayes if it never read any) and the store is tried again 10 s later, so a dead server costs a
worker one timeout per 10 s rather than one per message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from filterd.engine.bayes.backend import STORE_FILE, open_bayes_store, open_existing_bayes_store
from filterd.engine.bayes.base import BayesStoreBase
from filterd.engine.plugin import CheckSetup, Hit, Scan, Stage
from filterd.errors import StateError

__all__ = ["BANDS", "STORE_FILE", "BayesCheck", "bayes_rules"]

log = logging.getLogger(__name__)

_REFRESH_INTERVAL = 1.0  # seconds
_RETRY_AFTER = 10.0  # seconds without trying an unreachable store again

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
        self._full_config = setup.config
        self.state_dir = setup.state_dir or setup.config.state_dir
        redis = setup.config.state.backend == "redis"
        self.active = self.config.enabled and (redis or bool(self.state_dir))
        self.path: Path | None = Path(self.state_dir) / STORE_FILE if self.active and not redis else None
        self._store: BayesStoreBase | None = None
        self._pid = 0
        self._refreshed = 0.0
        self._looked = -_REFRESH_INTERVAL  # when scanning last found no store
        self._retry_at = 0.0  # when an unreachable store may be tried again

    @property
    def store(self) -> BayesStoreBase | None:
        """The store, opened (and created) on first use in this process; None without a state
        directory (SQLite) or with Bayes disabled."""
        if not self.active:
            return None
        if self._store is None or self._pid != os.getpid():
            # After fork the parent's connection must not be used; a fresh one is opened.
            self._adopt(open_bayes_store(self._full_config, self.state_dir))
        return self._store

    def _adopt(self, store: BayesStoreBase) -> None:
        self._store = store
        self._pid = os.getpid()
        self._refreshed = time.monotonic()

    def _opened(self) -> BayesStoreBase | None:
        """The store this process opened, if any."""
        return self._store if self._store is not None and self._pid == os.getpid() else None

    def _store_for_scan(self, now: float) -> BayesStoreBase | None:
        """The store if it exists (looked for at most once a second), refreshed at most once a
        second."""
        store = self._opened()
        if store is None:
            if not self.active or now - self._looked < _REFRESH_INTERVAL:
                return None
            found = open_existing_bayes_store(self._full_config, self.state_dir)
            if found is None:
                self._looked = now
                return None
            self._adopt(found)
            return found
        if now - self._refreshed >= _REFRESH_INTERVAL:
            self._refreshed = now
            store.refresh()
        return store

    def run(self, scan: Scan) -> Sequence[Hit]:
        now = time.monotonic()
        store = self._opened()
        if now >= self._retry_at:
            try:
                store = self._store_for_scan(now)
            except StateError as exc:
                self._retry_at = now + _RETRY_AFTER
                log.warning("Bayes store unavailable (%s); scanning with the counts last read for %.0fs",
                            exc, _RETRY_AFTER)  # fmt: skip
        if store is None:
            return ()
        probability = store.spam_probability(scan.message)
        if probability is None:
            return ()
        detail = f"score: {probability:.4f}"
        return [Hit(rule, detail) for rule in bayes_rules(probability)]

    def expire_if_due(self) -> int | None:
        """Expire the store if `bayes.expiry_period` has passed since its last expiry; the buckets
        dropped, or None when nothing ran. Only a store that exists is opened (as for a scan),
        an unreachable one is not tried again before the scans' back-off ends, and nothing is
        raised: upkeep must not stop a worker."""
        now = time.monotonic()
        if now < self._retry_at:
            return None
        try:
            store = self._store_for_scan(now)
            if store is None:
                return None
            dropped = store.expire_if_due()
        except StateError as exc:
            self._retry_at = now + _RETRY_AFTER
            log.warning("Bayes expiry failed: %s", exc)
            return None
        except Exception as exc:  # a broken file: say so, keep serving
            log.warning("Bayes expiry failed: %s", exc)
            return None
        if dropped:
            log.info("Bayes expiry dropped %d tokens beyond bayes.max_tokens", dropped)
        return dropped

    def close(self) -> None:
        """Close the store (workers on their way out; tests)."""
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None

"""Which Bayes store a configuration names; the one place that decides, for the Bayes check (so
scanning, spamd TELL and autolearn) and `filterd learn`.

``state.backend: redis``: `RedisBayesStore` at ``state.redis_url``, its keys under
``state.redis_key_prefix`` + ``bayes:`` (next to greylisting's and reputation's); otherwise
`BayesStore` in ``bayes.sqlite`` of the state directory.
"""

from __future__ import annotations

from pathlib import Path

from filterd.config import Config
from filterd.engine.bayes.base import BayesStoreBase
from filterd.engine.bayes.store import BayesStore

__all__ = ["REDIS_NAMESPACE", "STORE_FILE", "open_bayes_store", "open_existing_bayes_store", "sqlite_store_path"]

STORE_FILE = "bayes.sqlite"
REDIS_NAMESPACE = "bayes:"


def sqlite_store_path(config: Config, state_dir: str | Path = "") -> Path:
    """Where the SQLite store lives: ``state_dir``, else the configuration's state directory."""
    return Path(state_dir or config.state_path) / STORE_FILE


def open_bayes_store(
    config: Config,
    state_dir: str | Path = "",
    *,
    timeout: float | None = None,
    upkeep: bool = True,
    write_only: bool = False,
) -> BayesStoreBase:
    """Open the store ``config`` names, creating it if missing. ``timeout`` (seconds) bounds each
    Redis reply and each wait for SQLite's write lock (default ``state.timeout``); tools moving
    whole stores want more. ``upkeep``: `BayesStoreBase.upkeep`. ``write_only``: a handle that
    keeps no counts (`BayesStoreBase`), for writers that never score."""
    state = config.state
    wait = timeout or state.timeout
    if state.backend == "redis":
        from filterd.engine.bayes.redis_store import RedisBayesStore  # redis only for sites that use it

        store: BayesStoreBase = RedisBayesStore.open(
            state.redis_url, state.redis_key_prefix + REDIS_NAMESPACE, config.bayes, timeout=wait,
            write_only=write_only,
        )  # fmt: skip
        store.upkeep = upkeep
        return store
    return BayesStore.open(
        sqlite_store_path(config, state_dir), config.bayes, upkeep=upkeep, write_only=write_only, timeout=wait
    )


def open_existing_bayes_store(
    config: Config, state_dir: str | Path = "", *, upkeep: bool = True, write_only: bool = False
) -> BayesStoreBase | None:
    """The store if something created it already (learning did), else None; creates nothing.
    The arguments are `open_bayes_store`'s."""
    state = config.state
    if state.backend == "redis":
        from filterd.engine.bayes.redis_store import RedisBayesStore

        found = RedisBayesStore.open_existing(
            state.redis_url, state.redis_key_prefix + REDIS_NAMESPACE, config.bayes, timeout=state.timeout,
            write_only=write_only,
        )  # fmt: skip
        if found is not None:
            found.upkeep = upkeep
        return found
    path = sqlite_store_path(config, state_dir)
    if not path.exists():
        return None
    return BayesStore.open(path, config.bayes, upkeep=upkeep, write_only=write_only, timeout=state.timeout)

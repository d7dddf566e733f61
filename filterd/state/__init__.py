"""Learnt state shared by every worker, and with Redis by every machine: greylist triplets,
sender reputation (and later Bayes tokens), behind one small async interface.

    store = open_state_store(config, state_dir)       # nothing is opened yet
    counts = await store.incr_fields("rep:a@example.com 192.0.2.0/16", {"count": 1, "total": 3.2}, ttl=...)
    await store.close()

`StateStore` (in `filterd.state.base`) says what every backend guarantees. `SqliteStateStore`
is the embedded default, a file in the state directory; `RedisStateStore` is for sites with
several filterd machines. Keys are namespaced by their user: ``grey:`` for greylisting,
``rep:`` for reputation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from filterd.state.base import FieldValue, StateStore, format_number, ip_block
from filterd.state.sqlite_store import SqliteStateStore

if TYPE_CHECKING:
    from filterd.config import Config
    from filterd.state.redis_store import RedisStateStore

__all__ = [
    "SQLITE_FILE",
    "FieldValue",
    "RedisStateStore",
    "SqliteStateStore",
    "StateStore",
    "format_number",
    "ip_block",
    "open_state_store",
    "sqlite_path",
]

SQLITE_FILE = "state.sqlite"


def sqlite_path(config: Config, state_dir: str | Path = "") -> Path:
    """Where the SQLite store lives: ``state.sqlite_path`` (relative to the state directory),
    or state.sqlite in the state directory (``state_dir``, else the configuration's)."""
    base = Path(state_dir or config.state_path)
    return base / (config.state.sqlite_path or SQLITE_FILE)


def open_state_store(config: Config, state_dir: str | Path = "") -> StateStore:
    """The store ``config.state`` asks for. No file, socket or thread is opened until the first
    operation, so it may be made before the daemon forks."""
    cfg = config.state
    if cfg.backend == "redis":
        from filterd.state.redis_store import RedisStateStore  # the redis client costs ~0.2 s to import

        return RedisStateStore(cfg.redis_url, key_prefix=cfg.redis_key_prefix, timeout=cfg.timeout)
    return SqliteStateStore(sqlite_path(config, state_dir), timeout=cfg.timeout, sweep_period=cfg.sweep_period)


def __getattr__(name: str) -> object:
    """`RedisStateStore` is imported on first use only (the redis client is slow to import)."""
    if name == "RedisStateStore":
        from filterd.state.redis_store import RedisStateStore

        return RedisStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Fixtures of the state tests: stores on each backend (SQLite in tmp, a real redis-server).

Test modules using `make_store` also say ``pytest_plugins = ["tests.redis_fixture"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from filterd.state import RedisStateStore, SqliteStateStore, StateStore
from tests.redis_fixture import RedisServer

MakeStore = Callable[[], StateStore]
"""Another store on the same backend and data (same file, same Redis server and prefix)."""


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """A factory of stores sharing one backend; each test closes what it opens."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "state.sqlite"
        return lambda: SqliteStateStore(path, sweep_period=0.2)
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = server.unique_prefix()
    return lambda: RedisStateStore(server.url, key_prefix=prefix)

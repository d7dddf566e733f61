"""The state-store contract, run against both backends: SQLite in a temporary directory and a
real redis-server (tests/redis_fixture.py). Every test here must pass on each."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import sys
import threading
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from filterd.config import default_config
from filterd.errors import StateError
from filterd.state import (
    RedisStateStore,
    SqliteStateStore,
    StateStore,
    format_number,
    ip_block,
    open_state_store,
    sqlite_path,
)
from tests.redis_fixture import MakeRedisServer
from tests.state.conftest import MakeStore

pytest_plugins = ["tests.redis_fixture"]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_set_get_merge_and_delete(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        try:
            assert await store.get_fields("grey:x") is None
            await store.set_fields("grey:x", {"first": 1700000000.5, "passed": 0, "note": "a b"})
            assert await store.get_fields("grey:x") == {"first": "1700000000.5", "passed": "0", "note": "a b"}
            await store.set_fields("grey:x", {"passed": 1})  # merged: other fields stay
            assert await store.get_fields("grey:x") == {"first": "1700000000.5", "passed": "1", "note": "a b"}
            assert await store.delete("grey:x") is True
            assert await store.delete("grey:x") is False
            assert await store.get_fields("grey:x") is None
            with pytest.raises(ValueError, match="at least one field"):
                await store.set_fields("grey:x", {})
        finally:
            await store.close()

    run(go())


def test_incr_fields_creates_adds_and_returns_new_values(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        try:
            assert await store.incr_fields("rep:a", {"count": 1, "total": 2.5}) == {"count": 1.0, "total": 2.5}
            assert await store.incr_fields("rep:a", {"count": 1, "total": -4.0}) == {"count": 2.0, "total": -1.5}
            assert await store.get_fields("rep:a") == {"count": "2", "total": "-1.5"}
            await store.set_fields("rep:a", {"label": "text"})
            with pytest.raises(ValueError, match="float|number"):
                await store.incr_fields("rep:a", {"label": 1})
            assert (await store.get_fields("rep:a") or {})["count"] == "2"  # the failed increment changed nothing
        finally:
            await store.close()

    run(go())


def test_concurrent_increments_from_two_stores_lose_nothing(make_store: MakeStore) -> None:
    """Many tasks on two store instances (two connections or two Redis clients) at once."""

    async def go() -> None:
        stores = [make_store(), make_store()]
        try:
            await asyncio.gather(*(
                stores[i % 2].incr_fields("rep:hot", {"count": 1, "total": 0.5}, ttl=60) for i in range(400)
            ))  # fmt: skip
            assert await stores[0].get_fields("rep:hot") == {"count": "400", "total": "200"}
        finally:
            for store in stores:
                await store.close()

    run(go())


_CHILD = """
import asyncio, sys
from filterd.state import RedisStateStore, SqliteStateStore
backend, where, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def main():
    store = SqliteStateStore(where) if backend == "sqlite" else RedisStateStore(where, key_prefix=prefix)
    await store.set_fields("grey:from-child", {"seen": 1})
    await asyncio.gather(*(store.incr_fields("rep:shared", {"count": 1}) for _ in range(n)))
    await store.close()
asyncio.run(main())
"""


def test_two_processes_see_each_others_writes(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        if isinstance(store, SqliteStateStore):
            argv = ["sqlite", str(store.path), ""]
        else:
            assert isinstance(store, RedisStateStore)
            argv = ["redis", store.url, store.key_prefix]
        try:
            await store.set_fields("grey:from-parent", {"seen": 1})
            child = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD, *argv, "300")
            for _ in range(300):
                await store.incr_fields("rep:shared", {"count": 1})
            assert await child.wait() == 0
            assert await store.get_fields("rep:shared") == {"count": "600"}
            assert await store.get_fields("grey:from-child") == {"seen": "1"}
        finally:
            await store.close()

    run(go())


def test_ttl_expires_records(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        try:
            await store.set_fields("grey:short", {"a": 1}, ttl=0.4)
            await store.incr_fields("grey:short-count", {"n": 1}, ttl=0.4)
            await store.set_fields("grey:forever", {"a": 1})
            assert await store.get_fields("grey:short") == {"a": "1"}
            await asyncio.sleep(0.6)
            assert await store.get_fields("grey:short") is None
            assert await store.get_fields("grey:short-count") is None
            assert [k async for k, _ in store.scan("grey:")] == ["grey:forever"]
            assert await store.delete("grey:short") is False
            # An expired record starts afresh: no fields, no expiry carried over.
            assert await store.incr_fields("grey:short-count", {"n": 1}) == {"n": 1.0}
            await asyncio.sleep(0.5)
            assert await store.get_fields("grey:short-count") == {"n": "1"}
        finally:
            await store.close()

    run(go())


def test_ttl_none_keeps_the_expiry_and_a_new_ttl_replaces_it(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        try:
            await store.set_fields("grey:kept", {"a": 1}, ttl=0.5)
            await store.set_fields("grey:kept", {"b": 2})  # no ttl: still expires
            await store.set_fields("grey:renewed", {"a": 1}, ttl=0.5)
            await asyncio.sleep(0.3)
            await store.incr_fields("grey:renewed", {"n": 1}, ttl=0.6)  # renewed for 0.6 s from now
            await asyncio.sleep(0.35)
            assert await store.get_fields("grey:kept") is None
            assert await store.get_fields("grey:renewed") == {"a": "1", "n": "1"}
        finally:
            await store.close()

    run(go())


def test_scan_lists_a_prefix_only_literally_and_in_full(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        try:
            for i in range(1203):  # more than one batch of SQLite's and of Redis SCAN's
                await store.set_fields(f"rep:bulk{i:04d}", {"i": i})
            await store.set_fields("rep:a*b? [x]\\ 192.0.2.0/16", {"n": 1})
            await store.set_fields("rep:a*b? [x]\\ 198.51.0.0/16", {"n": 2})
            await store.set_fields("rep:aXb! [x]\\ 192.0.2.0/16", {"n": 3})  # would match the prefix as a glob
            await store.set_fields("grey:a", {"n": 4})
            listed = {k: v async for k, v in store.scan("rep:a*b? [x]\\ ")}
            assert listed == {"rep:a*b? [x]\\ 192.0.2.0/16": {"n": "1"}, "rep:a*b? [x]\\ 198.51.0.0/16": {"n": "2"}}
            bulk = [k async for k, _ in store.scan("rep:bulk")]
            assert sorted(bulk) == [f"rep:bulk{i:04d}" for i in range(1203)]
            assert len([k async for k, _ in store.scan("")]) == 1207
        finally:
            await store.close()

    run(go())


def test_a_closed_store_refuses_work(make_store: MakeStore) -> None:
    async def go() -> None:
        store = make_store()
        await store.set_fields("grey:x", {"a": 1})
        await store.close()
        await store.close()  # twice is fine
        with pytest.raises(StateError, match="closed"):
            await store.get_fields("grey:x")

    run(go())


def test_sqlite_sweep_deletes_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"

    def rows() -> int:
        with sqlite3.connect(path) as db:
            count: int = db.execute("SELECT count(*) FROM state").fetchone()[0]
        return count

    async def go() -> None:
        store = SqliteStateStore(path, sweep_period=0.2)
        try:
            for i in range(30):
                await store.set_fields(f"grey:{i}", {"a": 1}, ttl=0.1 if i % 3 else None)
            assert rows() == 30
            await asyncio.sleep(0.5)  # the sweeper ran at least once meanwhile
            assert rows() == 10
            assert await store.sweep() == 0
        finally:
            await store.close()

    run(go())


def test_sqlite_lazy_expiry_with_an_injected_clock(tmp_path: Path) -> None:
    now = [1000.0]

    async def go() -> None:
        store = SqliteStateStore(tmp_path / "s.sqlite", clock=lambda: now[0])
        try:
            await store.set_fields("rep:x", {"a": 1}, ttl=86400)
            now[0] += 86399
            assert await store.get_fields("rep:x") == {"a": "1"}
            now[0] += 1
            assert await store.get_fields("rep:x") is None
            assert await store.sweep() == 1
        finally:
            await store.close()

    run(go())


def test_redis_down_is_a_state_error(make_redis_server: MakeRedisServer) -> None:
    server = make_redis_server()
    url = server.url
    server.stop()

    async def go() -> None:
        store = RedisStateStore(url, timeout=0.5)
        try:
            with pytest.raises(StateError, match=r"state store redis://127\.0\.0\.1:\d+/0: .*Connection"):
                await store.incr_fields("rep:x", {"count": 1})
        finally:
            await store.close()

    run(go())


def test_redis_password_never_in_messages() -> None:
    async def go() -> None:
        store = RedisStateStore("redis://:s3cret@127.0.0.1:1/0", timeout=0.2)
        try:
            with pytest.raises(StateError) as info:
                await store.get_fields("rep:x")
            assert "s3cret" not in str(info.value) and "//***@127.0.0.1:1" in str(info.value)
        finally:
            await store.close()

    run(go())


def test_sqlite_unusable_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite").write_bytes(b"this is not a database" * 100)

    async def go() -> None:
        store = SqliteStateStore(tmp_path / "state.sqlite")
        try:
            with pytest.raises(StateError, match="state.sqlite"):
                await store.get_fields("rep:x")
        finally:
            await store.close()

    run(go())


def test_open_state_store_opens_nothing_until_first_use(tmp_path: Path) -> None:
    config = default_config()
    # Compare thread identities, not counts: a thread of an earlier test may end meanwhile.
    threads = {t.ident for t in threading.enumerate()}
    store = open_state_store(config, tmp_path / "dir")
    assert isinstance(store, SqliteStateStore) and store.backend == "sqlite"
    assert store.path == tmp_path / "dir" / "state.sqlite" == sqlite_path(config, tmp_path / "dir")
    assert not (tmp_path / "dir").exists() and {t.ident for t in threading.enumerate()} <= threads
    relative = dataclasses.replace(config, state=dataclasses.replace(config.state, sqlite_path="sub/greylist.db"))
    assert sqlite_path(relative, tmp_path) == tmp_path / "sub" / "greylist.db"
    redis_state = dataclasses.replace(config.state, backend="redis", redis_url="redis://127.0.0.1:1/3")
    redis_cfg = dataclasses.replace(config, state=dataclasses.replace(redis_state, redis_key_prefix="x:"))
    store = open_state_store(redis_cfg)
    assert isinstance(store, RedisStateStore) and (store.url, store.key_prefix) == ("redis://127.0.0.1:1/3", "x:")
    assert {t.ident for t in threading.enumerate()} <= threads
    assert isinstance(store, StateStore)


def test_a_store_made_before_fork_works_in_the_child(tmp_path: Path) -> None:
    """The daemon builds its engine (and so its stores) before forking workers."""
    store = SqliteStateStore(tmp_path / "state.sqlite")
    run(store.set_fields("grey:parent", {"a": 1}))  # used in the parent too: its thread stays there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ warns on fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            run(store.set_fields("grey:child", {"b": 2}))
            code = 0 if run(store.get_fields("grey:parent")) == {"a": "1"} else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert run(store.get_fields("grey:child")) == {"b": "2"}
    run(store.close())


def test_format_number_and_ip_block() -> None:
    assert [format_number(x) for x in (3, 3.0, -0.5, 1e20, 2.5e-7)] == ["3", "3", "-0.5", "1e+20", "2.5e-07"]
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="finite"):
            format_number(bad)
    assert ip_block("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert ip_block("::ffff:192.0.2.77", 16, 64) == "192.0.0.0/16"
    assert ip_block("[2001:db8:1:2:3::4]", 24, 48) == "2001:db8:1::/48"
    assert ip_block("unknown", 24, 64) is None

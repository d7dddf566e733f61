"""The write-only store handle (a worker's Bayes writer, an expiry): it holds no counts, neither
when it opens nor after it writes, and what it learns is as exact as through a full handle and
seen by the readers; Redis errors on its paths come out as StateError; the SQLite store waits for
another writer's lock as long as ``state.timeout`` says.

Real stores: SQLite files, and a real redis-server (tests/redis_fixture.py).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from filterd.config import Config
from filterd.config.schema import StateConfig
from filterd.engine.bayes import BayesStore, LearnResult, open_bayes_store, open_existing_bayes_store
from filterd.engine.bayes import store as store_module
from filterd.engine.bayes.check import ExpiryJob
from filterd.engine.bayes.writer import BayesWriter
from filterd.errors import StateError
from tests.conftest import offline_config
from tests.engine.bayes_helpers import bayes_config, check_consistent, make_msg
from tests.redis_fixture import MakeRedisServer, RedisServer

pytest_plugins = ["tests.redis_fixture"]

N_FEATURES = 1 << 20  # 4 MB per count array: a handle that loaded them could not hide it


def make_config(state_dir: Path, **state: Any) -> Config:
    cfg = offline_config()
    return dataclasses.replace(
        cfg,
        state=dataclasses.replace(cfg.state, **state),
        state_dir=str(state_dir),
        bayes=bayes_config(n_features=N_FEATURES),
    )


@pytest.fixture(params=["sqlite", "redis"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """A trained store of either backend: 10 spam, 10 ham."""
    if request.param == "sqlite":
        cfg = make_config(tmp_path)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        cfg = make_config(tmp_path, backend="redis", redis_url=server.url, redis_key_prefix=server.unique_prefix())
    with open_bayes_store(cfg) as store:
        store.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(20)])
    return cfg


def counts_of(cfg: Config) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], tuple[int, int]]:
    """The counts as a handle opened now loads them."""
    with open_bayes_store(cfg, upkeep=False) as fresh:
        return fresh._spam.copy(), fresh._ham.copy(), fresh.counts()


def test_write_only_handle_holds_no_counts(config: Config) -> None:
    with open_bayes_store(config, write_only=True) as warm:  # what the first use imports is not counted
        warm.write_seen_marks(np.array([1], dtype=np.int64))
    tracemalloc.start()
    try:
        with open_bayes_store(config, write_only=True) as store:
            assert store.write_only and store.mirror_nbytes == 0
            assert store.learn(make_msg(100, True), True) is LearnResult.LEARNED
            store.add_seen_marks(np.array([3, 5, 7], dtype=np.int64))
            store.write_seen_marks(np.array([5, 9], dtype=np.int64))
            store.refresh()
            assert store.mirror_nbytes == 0
            with pytest.raises(RuntimeError, match="write-only"):
                store.spam_probability(make_msg(101, True))
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Opening, learning and writing atimes never loaded a count array (4 MB), even for a while.
    assert peak < N_FEATURES, peak
    with open_bayes_store(config, upkeep=False) as reader:  # a full handle, for comparison
        assert reader.mirror_nbytes >= 9 * N_FEATURES


def test_the_writer_threads_handle_is_write_only(config: Config) -> None:
    writer = BayesWriter(config, config.state_dir)
    try:
        assert writer.submit(lambda s: (s.write_only, s.mirror_nbytes)).result() == (True, 0)
    finally:
        assert writer.stop()


def test_learning_through_a_write_only_handle_is_exact_and_seen_by_readers(config: Config) -> None:
    spam0, ham0, (nspam, nham) = counts_of(config)
    msg = make_msg(200, True)
    with (
        open_bayes_store(config, write_only=True) as writer,
        open_bayes_store(config, upkeep=False) as reader,
        open_bayes_store(config, upkeep=False) as full,
    ):
        assert writer.learn(msg, True) is LearnResult.LEARNED
        spam1, ham1, counts = counts_of(config)
        assert counts == (nspam + 1, nham)
        assert full.learn(msg, True) is LearnResult.ALREADY  # a full handle agrees: counted once
        assert writer.learn(msg, True) is LearnResult.ALREADY
        assert counts_of(config)[2] == (nspam + 1, nham)
        # What a full handle learning it would have counted: every bucket of the message once.
        added = np.flatnonzero(spam1 != spam0)
        assert added.size > 0 and np.all(spam1[added] - spam0[added] == 1) and np.array_equal(ham1, ham0)
        reader.refresh()  # the readers catch up through the change log, as with any other writer
        assert np.array_equal(reader._spam, spam1) and np.array_equal(reader._ham, ham1)
        assert reader.counts() == (nspam + 1, nham)

        assert writer.learn(msg, False) is LearnResult.MOVED
        spam2, ham2, counts = counts_of(config)
        assert counts == (nspam, nham + 1)
        assert np.array_equal(spam2, spam0) and np.array_equal(ham2[added], ham0[added] + 1)
        reader.refresh()
        assert np.array_equal(reader._spam, spam2) and np.array_equal(reader._ham, ham2)

        assert writer.forget(msg) is LearnResult.FORGOTTEN
        assert writer.forget(msg) is LearnResult.NOT_KNOWN
        spam3, ham3, counts = counts_of(config)
        assert counts == (nspam, nham)
        assert np.array_equal(spam3, spam0) and np.array_equal(ham3, ham0)  # exactly what learning added
        reader.refresh()
        assert np.array_equal(reader._spam, spam0) and np.array_equal(reader._ham, ham0)
        assert writer.mirror_nbytes == 0
    if config.state.backend == "sqlite":
        check_consistent(Path(config.state_dir) / "bayes.sqlite")


def test_a_write_only_handle_writes_the_snapshot_learning_made_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the snapshot a writer's learning makes due is written, from counts loaded for it
    and dropped; a handle opening afterwards starts from it and has the table's counts."""
    cfg = make_config(tmp_path)
    path = tmp_path / "bayes.sqlite"
    with open_bayes_store(cfg) as store:
        store.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(10)])
    monkeypatch.setattr(store_module, "_SNAPSHOT_AFTER_CHANGES", 5)
    with open_bayes_store(cfg, write_only=True) as writer:
        for i in range(6):
            writer.learn(make_msg(300 + i, i % 2 == 0), i % 2 == 0)
        assert writer.mirror_nbytes == 0
    conn = sqlite3.connect(path)
    try:
        (snapshot_seq,) = conn.execute("SELECT seq FROM snapshot").fetchone()
        (seq,) = conn.execute("SELECT seq FROM state").fetchone()
        spam = np.zeros(N_FEATURES, dtype=np.int32)
        ham = np.zeros(N_FEATURES, dtype=np.int32)
        for bucket, s, h in conn.execute("SELECT id, spam, ham FROM buckets"):
            spam[bucket], ham[bucket] = s, h
    finally:
        conn.close()
    assert seq - 5 <= snapshot_seq <= seq and snapshot_seq > 1  # written by the writer's learning
    with BayesStore.open(path, cfg.bayes, upkeep=False) as fresh:
        assert np.array_equal(fresh._spam, spam) and np.array_equal(fresh._ham, ham)
    check_consistent(path)


def test_a_write_only_handle_snapshots_a_new_store(tmp_path: Path) -> None:
    """SQLite: a store a worker's writer creates and learns into first gets a snapshot at once (as
    when the writer loaded the counts itself), so that readers do not read the whole table."""
    cfg = make_config(tmp_path)
    path = tmp_path / "bayes.sqlite"
    with open_bayes_store(cfg, write_only=True) as writer:
        writer.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(10)])
        writer.learn(make_msg(400, True), True)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM snapshot").fetchone() == (1,)  # readers start from it
    finally:
        conn.close()
    with BayesStore.open(path, cfg.bayes, upkeep=False) as reader:
        assert reader._snapshot_due is False  # it loaded the snapshot, not the table
    check_consistent(path)


# -- Redis errors on the writer's and the expiry's paths -----------------------------------------------


def redis_config(tmp_path: Path, server: RedisServer) -> Config:
    return make_config(tmp_path, backend="redis", redis_url=server.url, redis_key_prefix="t:", timeout=2.0)


@pytest.mark.parametrize("write_only", [True, False])
def test_redis_errors_writing_atimes_are_state_errors(
    tmp_path: Path, make_redis_server: MakeRedisServer, write_only: bool
) -> None:
    server = make_redis_server()
    cfg = redis_config(tmp_path, server)
    with open_bayes_store(cfg) as trainer:
        trainer.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(4)])
        learnt = np.flatnonzero(trainer._spam | trainer._ham)  # buckets with an atime to write
    store = open_bayes_store(cfg, write_only=write_only)
    try:
        server.stop()
        with pytest.raises(StateError, match="Bayes store"):
            store.write_seen_marks(learnt[:3])  # the writer's atime job
        store.add_seen_marks(learnt[3:4])
        store._touched_since -= 700  # ten minutes have passed: refresh writes them
        with pytest.raises(StateError):
            store.refresh()
        with pytest.raises(StateError):
            store.expire()
        with pytest.raises(StateError):
            store.expiry_due()
    finally:
        store.close()  # the atimes it could not write are given up, not raised


def test_redis_errors_in_an_expiry_job_are_state_errors(tmp_path: Path, make_redis_server: MakeRedisServer) -> None:
    server = make_redis_server()
    cfg = redis_config(tmp_path, server)
    with open_bayes_store(cfg) as trainer:
        trainer.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(4)])
    server.stop()
    with pytest.raises(StateError):
        ExpiryJob(cfg, cfg.state_dir, np.array([1], dtype=np.int64)).run()


# -- state.timeout: how long the SQLite store waits for another writer's lock --------------------------


@pytest.mark.parametrize("write_only", [True, False])
def test_sqlite_store_waits_for_the_lock_as_long_as_state_timeout(tmp_path: Path, write_only: bool) -> None:
    cfg = make_config(tmp_path, timeout=0.3)
    path = tmp_path / "bayes.sqlite"
    with open_bayes_store(cfg) as store:
        store.learn_many([(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(4)])
    found = open_existing_bayes_store(cfg, write_only=write_only)
    assert found is not None
    with open_bayes_store(cfg, write_only=write_only) as store, found:
        assert isinstance(store, BayesStore) and isinstance(found, BayesStore)
        assert store.timeout == found.timeout == 0.3
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # another writer
            started = time.monotonic()
            with pytest.raises(StateError, match=r"longer than 0\.3s \(state\.timeout\)"):
                store.learn(make_msg(500, True), True)
            # Waited, then gave up long before the 30 s of a handle opened without a timeout.
            assert 0.2 < time.monotonic() - started < 15
        finally:
            lock.execute("COMMIT")
            lock.close()
        assert store.learn(make_msg(500, True), True) is LearnResult.LEARNED  # nothing half done
    check_consistent(path)


def test_a_tools_timeout_overrides_state_timeout(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, timeout=0.3)
    with open_bayes_store(cfg, timeout=45.0) as store:
        assert isinstance(store, BayesStore) and store.timeout == 45.0


def test_state_timeout_doc_names_the_bayes_store() -> None:
    (info,) = (f.metadata for f in dataclasses.fields(StateConfig) if f.name == "timeout")
    assert "Bayes" in str(info) and "SQLite's write lock" in str(info), info
